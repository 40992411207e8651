"""The server end to end through the official `openai` client on a free loopback port, plus its pieces.

Two checkpoints: a random-init one (shapes, streaming, limits, cancellation) and one overfitted in a few seconds on
two tool-calling dialogs, so that the built-in tool loop and OpenAI `tool_calls` are exercised by a real model.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import time
from pathlib import Path

import httpx
import pytest

from danlu.serve.app import ServeOptions, create_app, safe_static_path
from danlu.serve.chat import ToolCallHold, date_system_prompt, with_date
from danlu.serve.feedback import FeedbackStore
from danlu.serve.memory import CorrectionMemory, similarity, with_memory
from danlu.serve.routing import load_served_model, parse_fallbacks, parse_model_specs
from danlu.serve.server import BackgroundServer
from danlu.tools import TOOL_SCHEMAS, run_tool, tool_call_text

openai = pytest.importorskip("openai")

NOW = dt.datetime(2026, 11, 21, 14, 5)
STEPS = 250
CALC_Q = "1234*5678 等于多少?"
CALC_A = "1234*5678 = 7006652。"
TEXTS = [
    "中国最高的山是珠穆朗玛峰。The highest mountain in China is Mount Everest. 1234*5678 = 7006652。",
    "今天是2026-11-21 星期六。Today is 2026-11-21 (Saturday). 等于多少? calculator expression",
] * 30


def _calc_dialog() -> list[dict]:
    call = {
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "1234*5678"}'},
    }
    return [
        {"role": "user", "content": CALC_Q},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {
            "role": "tool",
            "name": "calculator",
            "content": run_tool("calculator", {"expression": "1234*5678"}),
        },
        {"role": "assistant", "content": CALC_A},
    ]


def make_checkpoint(path: Path, *, context: int = 512, train: bool = False) -> Path:
    """A danlu checkpoint with a 1-layer model; `train` overfits it on the calculator dialog (with and without
    a client `tools` list in the prompt), a few seconds on CPU."""
    import torch

    from danlu.io import save_model_dir
    from danlu.model import IGNORE_INDEX, ModelConfig, Transformer
    from danlu.tokenizer import Tokenizer

    rendered = Tokenizer.train(TEXTS, vocab_size=300).apply_chat_template(_calc_dialog(), tools=TOOL_SCHEMAS)
    tok = Tokenizer.train(TEXTS + [rendered] * 30, vocab_size=800)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=2, max_position_embeddings=context)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if train:
        rows = []
        for tools in (None, TOOL_SCHEMAS):
            ids, mask = tok.render_chat(
                with_date(_calc_dialog(), NOW), tools=tools
            )  # as the server renders it
            targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            rows.append((ids[:-1], targets))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(STEPS):
            loss = sum(model(torch.tensor([x]), torch.tensor([y])) for x, y in rows) / len(rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    save_model_dir(path, model.state_dict(), cfg, tok, {"stage": "test"}, chat=True)
    return path


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve_random"))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve_trained"), train=True)


@pytest.fixture(scope="module")
def server(random_ckpt: Path, trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two models on one server: `tiny` (random) and `calc` (trained), with feedback and memory."""
    models = [load_served_model("tiny", str(random_ckpt)), load_served_model("calc", str(trained_ckpt))]
    db = tmp_path_factory.mktemp("serve_db") / "feedback.sqlite3"
    options = ServeOptions(feedback=FeedbackStore(db), memory=CorrectionMemory(0.8), now=lambda: NOW)
    app = create_app(models, options)
    with BackgroundServer(app) as url:
        yield url, app, options
    for m in models:
        m.worker.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "calc"]
    assert client.models.retrieve("calc").id == "calc"
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "calc"}


def test_chat_non_streaming_n_seed_and_usage(client):
    msgs = [{"role": "user", "content": "中国最高的山是什么?"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, seed=7, n=2, temperature=1.0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in r.choices)
    assert (
        r.usage.prompt_tokens > 0
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )
    again = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, seed=7, n=2, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_chat_streaming_matches_non_streaming(client):
    msgs = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_completions_stop_echo_logprobs(client):
    base = client.completions.create(
        model="tiny", prompt="中国最高的山", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    assert base.object == "text_completion" and base.usage.completion_tokens == 30
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip() and stop in text:
        cut = client.completions.create(
            model="tiny", prompt="中国最高的山", max_tokens=30, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    echoed = client.completions.create(
        model="tiny", prompt="中国", max_tokens=3, echo=True, logprobs=1, temperature=0
    )
    assert echoed.choices[0].text.startswith("中国")
    assert len(echoed.choices[0].logprobs.token_logprobs) == echoed.usage.completion_tokens
    assert all(lp <= 0 for lp in echoed.choices[0].logprobs.token_logprobs)
    streamed = client.completions.create(model="tiny", prompt="中国最高的山", max_tokens=30, temperature=0,
                                         extra_body={"ignore_eos": True}, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_builtin_tool_is_executed_and_answer_uses_it(server, client):
    r = client.chat.completions.create(
        model="calc", messages=[{"role": "user", "content": CALC_Q}], max_tokens=60, temperature=0,
        store=True, metadata={"conversation_id": "conv-tools"},
    )  # fmt: skip
    assert r.choices[0].message.content == CALC_A
    assert r.choices[0].message.tool_calls is None and "<tool_call>" not in r.choices[0].message.content
    stored = server[2].feedback.response(r.id)
    assert stored["params"]["tools"] == [{"name": "calculator", "arguments": '{"expression": "1234*5678"}',
                                          "result": "7006652"}]  # fmt: skip
    streamed = client.chat.completions.create(
        model="calc",
        messages=[{"role": "user", "content": CALC_Q}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == CALC_A


def test_client_tools_are_returned_not_executed(client):
    kw = {"model": "calc", "messages": [{"role": "user", "content": CALC_Q}], "max_tokens": 40, "temperature": 0,
          "tools": TOOL_SCHEMAS}  # fmt: skip
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {
        "expression": "1234*5678"
    }
    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "calculator"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_bad_input_is_4xx_in_openai_shape(server, client):
    url = server[0] + "/v1/chat/completions"
    ok_msg = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": "nope", "messages": ok_msg}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "tiny", "messages": ok_msg, "max_tokens": 100_000}).encode(), 400, "max_tokens_exceeded"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "山 " * 2000}]}).encode(), 400,
         "context_length_exceeded"),
        (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "messages": ok_msg, "n": 99}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "messages": ok_msg, "temperature": "hot"}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "messages": []}).encode(), 400, "invalid_value"),
        (b"x" * 1_100_000, 413, "request_too_large"),
    ]  # fmt: skip
    for body, status, code in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "prompt": "山 " * 2000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"  # the field to shorten, as the request named it
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ok_msg)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="山 " * 2000)
    assert httpx.get(server[0] + "/v1/nothing").status_code == 404
    assert httpx.get(url).status_code == 405


def test_static_files_stay_in_their_folder(server):
    host, port = server[0].removeprefix("http://").split(":")
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static//etc/passwd",
                 "/static/%2e%2e/%2e%2e/__init__.py"):  # fmt: skip
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)  # sent as is: http.client does not normalize `..`
        resp = conn.getresponse()
        assert resp.status == 404, path
        assert b"import" not in resp.read()
        conn.close()
    assert safe_static_path("../app.py") is None and safe_static_path("/etc/passwd") is None
    assert safe_static_path("index.html") is not None
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "cdn" not in page.text.lower()


def test_api_key(random_ckpt: Path):
    models = [load_served_model("tiny", str(random_ckpt))]
    app = create_app(models, ServeOptions(api_key="s3cret"))
    try:
        with BackgroundServer(app) as url:
            assert httpx.get(url + "/health").status_code == 200
            for path in ("/v1/models", "/", "/static/index.html"):
                r = httpx.get(url + path)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert (
                httpx.get(url + "/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
            )
            assert (
                httpx.get(url + "/", auth=("user", "s3cret")).status_code == 200
            )  # the browser's Basic prompt
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
            ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
            assert ok.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    finally:
        models[0].worker.close()


def test_disconnect_stops_generation(server):
    url, app, _ = server
    worker = app.state.models["tiny"].worker
    before = dict(worker.stats)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(4)]  # role chunk and the first deltas, then hang up
    assert got[0].startswith("data: ")
    deadline = time.monotonic() + 30
    while worker.stats["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.stats["cancelled"] == before["cancelled"] + 1
    assert worker.stats["finished"] == before["finished"]  # it never ran to its 400 tokens


def test_concurrent_streams_progress_together(server):
    """Two long streams interleave: the second one's first token arrives before the first one ends."""
    import threading

    url = server[0]
    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        body = {"model": "tiny", "prompt": "中国", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    with lock:
                        events.append((name, time.monotonic()))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [n for n, _ in events]
    first_b, last_a = names.index("b"), len(names) - 1 - names[::-1].index("a")
    assert first_b < last_a


def test_feedback_routes_store_and_memory(server, client):
    url, _, options = server
    q = "中国最高的山是什么?"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=8,
                                       store=True, metadata={"conversation_id": "conv-1"})  # fmt: skip
    assert httpx.post(url + "/v1/feedback", json={"response_id": r.id, "rating": -1}).json()["ok"]
    fix = httpx.post(url + "/v1/feedback", json={"response_id": r.id, "correction": "珠穆朗玛峰。"})
    assert fix.status_code == 200
    assert (
        httpx.post(url + "/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": 1}).status_code
        == 404
    )
    assert httpx.post(url + "/v1/feedback", json={"response_id": r.id}).status_code == 400
    stats = httpx.get(url + "/v1/feedback/stats").json()
    assert stats["thumbs_down"] >= 1 and stats["corrections"] >= 1
    # the memory: the same question, phrased a little differently, gets the correction in context
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "中国最高的山是什么？"}], max_tokens=2
    )
    assert float(raw.headers["x-danlu-memory"]) >= 0.8
    plain = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "日本的首都是哪里?"}], max_tokens=2
    )
    assert "x-danlu-memory" not in plain.headers
    assert raw.parse().usage.prompt_tokens > plain.parse().usage.prompt_tokens


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_feedback_store_export(tmp_path: Path):
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    prompt = [{"role": "user", "content": "日本的首都是哪里?"}]
    store.record_response("r1", model="m", messages=prompt, answer="北京", conversation_id="c")
    store.record_response("r2", model="m", messages=prompt, answer="东京", conversation_id="c")
    store.record_response("r3", model="m", messages=prompt, answer="大阪")
    store.rate("r1", -1)
    store.correct("r1", "东京。")
    store.rate("r2", 1)
    store.rate("r3", -1)
    with pytest.raises(KeyError):
        store.rate("missing", 1)
    counts = store.export(tmp_path / "out")
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    pref = [json.loads(x) for x in (tmp_path / "out" / "preference.jsonl").read_text().splitlines()]
    assert counts == {"sft": 1, "preference": 3}
    assert sft[0]["messages"] == [*prompt, {"role": "assistant", "content": "东京。"}]
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref} == {
        ("东京。", "北京"), ("东京", "北京"), ("东京", "大阪")
    }  # fmt: skip
    assert all(p["prompt"] == prompt for p in pref)
    import sqlite3

    with sqlite3.connect(tmp_path / "fb.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_feedback_cli(tmp_path: Path, capsys):
    from danlu.cli import main

    store = FeedbackStore(tmp_path / "fb.sqlite3")
    store.record_response("r1", model="m", messages=[{"role": "user", "content": "q"}], answer="a")
    store.correct("r1", "b")
    assert (
        main(["feedback", "export", "--db", str(tmp_path / "fb.sqlite3"), "--out", str(tmp_path / "x")]) == 0
    )
    assert "1 SFT dialogs" in capsys.readouterr().out
    assert (
        main(["feedback", "export", "--db", str(tmp_path / "missing.sqlite3"), "--out", str(tmp_path)]) == 2
    )
    assert "no such feedback database" in capsys.readouterr().err


def test_memory_matching():
    assert similarity("中国最高的山是什么?", "中国最高的山是什么？") == pytest.approx(1.0)
    assert similarity("What is the capital of Japan?", "what is the capital of japan") == pytest.approx(1.0)
    assert similarity("中国最高的山是什么?", "日本的首都是哪里?") < 0.3
    mem = CorrectionMemory(0.8)
    mem.add("中国最长的河是什么?", "长江。")
    assert mem.recall("中国最长的河是什么") is not None and mem.recall("日本最长的河是什么?") is None
    msgs = with_memory(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        mem.recall("中国最长的河是什么"),
    )
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and msgs[2][
        "content"
    ] == "长江。"


def test_date_prompt_and_tool_hold():
    assert (
        date_system_prompt(NOW, [{"role": "user", "content": "今天几号?"}])
        == "今天是2026-11-21 星期六。现在时间14:05。"
    )
    assert date_system_prompt(NOW, [{"role": "user", "content": "date?"}]).startswith(
        "Today is 2026-11-21 (Saturday)"
    )
    merged = with_date([{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "x"}], NOW)
    assert len(merged) == 2 and merged[0]["content"].endswith("\n你是助手。")
    hold = ToolCallHold()
    text = "好的" + tool_call_text("get_date", {}) + "tail"
    shown = "".join(hold.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    assert shown == "好的"
    hold = ToolCallHold()
    assert "".join(hold.feed(c) for c in "a <tool x") + hold.finish("a <tool x") == "a <tool x"


def test_calculator_is_arithmetic_only():
    assert run_tool("calculator", {"expression": "(2+3)*4"}) == "20"
    for bad in (
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "[x for x in ()]",
        "9**9**9",
    ):
        assert run_tool("calculator", {"expression": bad}).startswith("error")


def test_model_specs():
    from danlu import DanluError

    assert parse_model_specs(["/x/ckpt"], ["b=/y"]) == [("ckpt", "/x/ckpt"), ("b", "/y")]
    with pytest.raises(DanluError, match="NAME=CHECKPOINT"):
        parse_model_specs([], ["oops"])
    with pytest.raises(DanluError, match="twice"):
        parse_model_specs([], ["a=/x", "a=/y"])
    with pytest.raises(DanluError, match="no model"):
        parse_model_specs([], [])
    assert parse_fallbacks(["a=b"], ["a", "b"]) == {"a": "b"}
    with pytest.raises(DanluError, match="no served model"):
        parse_fallbacks(["a=c"], ["a", "b"])


def test_confidence_fallback_routes_to_base(random_ckpt: Path, trained_ckpt: Path):
    calc, tiny = load_served_model("calc", str(trained_ckpt)), load_served_model("tiny", str(random_ckpt))
    calc.fallback = "tiny"
    app = create_app([calc, tiny], ServeOptions(now=lambda: NOW))
    msgs = [{"role": "user", "content": CALC_Q}]
    try:
        with BackgroundServer(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            calc.min_logprob = -1.0  # the overfitted model is sure of this answer: it keeps it
            r = client.chat.completions.create(model="calc", messages=msgs, max_tokens=60, temperature=0)
            assert r.model == "calc" and r.choices[0].message.content == CALC_A
            calc.min_logprob = 0.0  # no answer is that sure: the base model answers instead
            r = client.chat.completions.create(model="calc", messages=msgs, max_tokens=5, temperature=0)
            assert r.model == "tiny"
            chunks = list(
                client.chat.completions.create(model="calc", messages=msgs, max_tokens=5, stream=True)
            )
            assert [c.model for c in chunks if c.choices and c.choices[0].finish_reason] == ["tiny"]
    finally:
        calc.worker.close()
        tiny.worker.close()


def test_sixteen_concurrent_streaming_clients(server):
    """The load test, small: 16 streams at once, no errors, every stream complete (finish chunk + [DONE])."""
    import asyncio

    url = server[0]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[bool, bool, int]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 24,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "seed": i}  # fmt: skip
        done = finished = False
        tokens = 0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk
                    finished = finished or any(c["finish_reason"] for c in chunk["choices"])
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return done, finished, tokens

    async def run() -> list[tuple[bool, bool, int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(16))), 120)

    assert asyncio.run(run()) == [(True, True, 24)] * 16
