"""danlu synth: ROUGE-L against an independent LCS, the filters, the endpoint teacher's retries and errors against
deliberately failing local servers, the generators against `danlu serve` through the `openai` client and a local
checkpoint, and resume after a real kill."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from danlu import DanluError
from danlu.synth.endpoint import EndpointTeacher
from danlu.synth.filters import Filters
from danlu.synth.instruct import InstructConfig, build_prompt, parse_list, run_instruct
from danlu.synth.prompts import read_prompts
from danlu.synth.rouge import RougeIndex, lcs_length, rouge_l, rouge_tokens
from danlu.synth.store import SynthStore, log_path
from danlu.synth.teacher import Reply, Sampling
from tests.conftest import overfit_chat_model

pytest.importorskip("openai")

QUESTIONS = [
    "中国最高的山是什么?",
    "What is the capital of Japan?",
    "长江有多长?",
    "Name the largest planet.",
]
SEEDS = ["Translate 你好 into English.", "列出三种水果。", "Summarize the story of Mulan."]
LIST = "\n".join(f"{i}. {q}" for i, q in enumerate(QUESTIONS, 1))


# ───────────────────────── ROUGE-L ─────────────────────────


def dp_lcs(a: list[str], b: list[str]) -> int:
    """The textbook O(mn) table, written independently of the bit-parallel one."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def dp_rouge_l(a: list[str], b: list[str]) -> float:
    lcs = dp_lcs(a, b)
    if not lcs:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def test_rouge_l_equals_dp_lcs_on_zh_and_en():
    assert rouge_tokens("中国最高的山,是什么?") == list("中国最高的山是什么")
    assert rouge_tokens("Write a POEM, about the sea!") == ["write", "a", "poem", "about", "the", "sea"]
    pairs = [
        ("中国最高的山是珠穆朗玛峰", "珠穆朗玛峰是中国最高的山"),
        ("请写一首关于大海的诗", "写一首诗,关于秋天的大海"),
        ("Write a short poem about the sea.", "Write a poem about the autumn sea, please."),
        ("Translate 你好 into English", "把 hello 翻译成中文"),
    ]
    for x, y in pairs:
        a, b = rouge_tokens(x), rouge_tokens(y)
        assert lcs_length(a, b) == dp_lcs(a, b)
        assert rouge_l(a, b) == pytest.approx(dp_rouge_l(a, b))
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == dp_lcs(a, b)


def test_rouge_index_finds_near_duplicates_zh_by_characters():
    index = RougeIndex(["中国最高的山是什么?", "Write a poem about the sea."])
    score, other = index.most_similar("中国最高的山叫什么?", 0.7)
    assert score > 0.7 and other == "中国最高的山是什么?"  # 8 of 9 characters: whitespace splitting sees 0
    assert index.most_similar("日本的首都是哪里?", 0.7)[0] <= 0.7
    assert index.most_similar("Write a poem about the sea!", 0.7)[0] == pytest.approx(1.0)


def test_filters_each_reason():
    f = Filters(languages=frozenset({"zh", "en"}))
    idx = RougeIndex(["中国最高的山是什么?"])
    assert f.instruction("", "stop", idx)[0] == "malformed"
    assert f.instruction("Explain gravity to a child", "length", idx)[0] == "malformed"
    assert f.instruction("<|im_start|>user hi there friend", "stop", idx)[0] == "malformed"
    assert f.instruction("Hi", "stop", idx)[0] == "length"
    assert f.instruction("Объясните гравитацию ребенку простыми словами", "stop", idx)[0] == "language"
    assert f.instruction("Draw a picture of a cat", "stop", idx)[0] == "blocked_words"
    assert f.instruction("请描述这张图片里的内容", "stop", idx)[0] == "blocked_words"
    assert f.instruction("Write a profile of a scientist", "stop", idx) is None  # "file" only as a whole word
    assert f.instruction("中国最高的山叫什么?", "stop", idx)[0] == "rouge_l"
    assert f.answer("", "stop")[0] == "answer_malformed"
    assert f.answer("an answer cut off at the", "length")[0] == "answer_malformed"
    assert f.answer("broken \ufffd character", "stop") == (
        "answer_malformed",
        "contains U+FFFD (broken UTF-8)",
    )
    assert f.instruction("Explain \ufffd gravity to a child", "stop", idx)[0] == "malformed"
    assert parse_list("Sure!\n1. First task here\n2、第二个任务\n- third one", 8) == [
        "First task here", "第二个任务", "third one"
    ]  # fmt: skip


def test_prompt_files_and_unknown_format(tmp_path: Path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "hello there"},
        {"instruction": "翻译成英文", "input": "你好"},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]) + "\n")  # fmt: skip
    got = read_prompts(p)
    assert [m[-1]["content"] for _, m in got] == ["hello there", "翻译成英文\n你好", "q2", "hi"]
    assert len(got[2][1]) == 3 and got[0][0] == f"{p}:1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(DanluError, match=r"bad.jsonl:1: not a prompt \(keys: question\)"):
        read_prompts(bad)
    csv = tmp_path / "seeds.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DanluError, match="seeds.csv: unknown file type"):
        read_prompts(csv)


# ───────────────────────── deliberately failing servers ─────────────────────────


def _completion(text: str, finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}  # fmt: skip


class Scripted:
    """A local HTTP server answering /v1/chat/completions from a script of behaviours: 500, sleep, junk, text."""

    def __init__(self, script: list[str], default: str = "ok") -> None:
        self.script, self.default, self.calls = list(script), default, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model",
                                                                        "created": 0, "owned_by": "x"}]}).encode())  # fmt: skip

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.calls += 1
                what = outer.script.pop(0) if outer.script else outer.default
                if what == "500":
                    self._send(500, b'{"error": {"message": "overloaded"}}')
                elif what == "sleep":
                    time.sleep(1.5)
                    self._send(200, json.dumps(_completion("late")).encode())
                elif what == "junk":
                    self._send(200, b"{not json at all", "application/json")
                elif what == "toolong":  # what `danlu serve` and OpenAI answer for a prompt over the context
                    self._send(400, json.dumps({"error": {"message": "the prompt is 300 tokens; model 'm' has a "
                                                          "context of 256 tokens", "type": "invalid_request_error",
                                                          "code": "context_length_exceeded"}}).encode())  # fmt: skip
                elif what == "nochoices":
                    self._send(200, json.dumps({**_completion("x"), "choices": []}).encode())
                elif what == "empty":
                    self._send(200, json.dumps(_completion("")).encode())
                else:
                    self._send(200, json.dumps(_completion("fine answer")).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _teacher(url: str, **kw: object) -> EndpointTeacher:
    t = EndpointTeacher(url, backoff=0.01, **kw)  # type: ignore[arg-type]
    t.check()
    return t


def test_retries_on_5xx_and_timeouts():
    with Scripted(["500", "500", "ok", "sleep", "ok"]) as s:
        t = _teacher(s.url, timeout=0.5, retries=3, concurrency=1)
        msgs = [{"role": "user", "content": "hi"}]
        assert t.chat([msgs], Sampling())[0] == Reply("fine answer", "stop")
        assert t.stats["retries"] == 2 and t.stats["http_500"] == 2
        assert t.chat([msgs], Sampling())[0].text == "fine answer"
        assert t.stats["timeouts"] == 1 and t.stats["retries"] == 3
    with Scripted([], default="500") as s:
        t = _teacher(s.url, retries=2)
        with pytest.raises(DanluError, match=r"failed after 3 tries \(last: HTTP 500: overloaded\)"):
            t.chat([msgs], Sampling())


def test_rate_limit_spaces_requests():
    with Scripted([]) as s:
        t = _teacher(s.url, rps=20, concurrency=4)
        start = time.monotonic()
        t.chat([[{"role": "user", "content": "hi"}]] * 6, Sampling())
        assert time.monotonic() - start >= 5 / 20 * 0.95  # 6 starts, 1/20 s apart at least


def test_unreachable_junk_and_empty_teachers(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(DanluError, match=rf"127.0.0.1:{port}/v1: cannot connect"):
        _teacher(f"http://127.0.0.1:{port}")
    with Scripted(["junk"]) as s, pytest.raises(DanluError, match="not the JSON of the OpenAI API"):
        _teacher(s.url).chat([[{"role": "user", "content": "hi"}]], Sampling())
    out = tmp_path / "empty.jsonl"
    from danlu.synth.answer import run_answer

    prompts = [(f"p:{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    with Scripted([], default="empty") as s, pytest.raises(DanluError, match="returned empty text for all 3"):
        run_answer(_teacher(s.url), prompts, SynthStore(out, {}), Filters(), Sampling(), progress=False)
    assert not out.exists() and not log_path(out).exists()  # nothing half-written
    with pytest.raises(DanluError, match="MY_KEY_VAR is not set"):
        EndpointTeacher("http://127.0.0.1:1", api_key_env="MY_KEY_VAR")
    with Scripted(["nochoices"]) as s, pytest.raises(DanluError, match="came back without choices"):
        _teacher(s.url).chat([[{"role": "user", "content": "hi"}]], Sampling())


def test_a_prompt_over_the_context_fails_its_row_only(tmp_path: Path):
    from danlu.synth.answer import run_answer

    prompts = [(f"p:{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    out = tmp_path / "a.jsonl"
    with Scripted(["ok", "toolong", "ok"]) as s:
        t = _teacher(s.url, concurrency=1)
        run_answer(t, prompts, SynthStore(out, {}), Filters(), Sampling(), progress=False)
        assert t.stats["too_long"] == 1 and "retries" not in t.stats  # refused at once, never retried
    assert [r["meta"]["source"] for r in _rows(out)] == ["p:0", "p:2"]
    [rejected] = [r for e in _rows(log_path(out))[1:] for r in e["rejected"]]
    assert (
        rejected["meta"]["source"] == "p:1"
        and rejected["meta"]["why"] == "the prompt exceeds the teacher's context"
    )
    with Scripted([], default="toolong") as s, pytest.raises(DanluError, match="all 3 prompts of the first round "
                                                                                 "exceed its context"):  # fmt: skip
        run_answer(_teacher(s.url), prompts, SynthStore(tmp_path / "b.jsonl", {}), Filters(), Sampling(),
                   progress=False)  # fmt: skip
    assert not (tmp_path / "b.jsonl").exists() and not log_path(tmp_path / "b.jsonl").exists()


def test_bad_teachers_and_seed_files_write_nothing_through_the_cli(tmp_path: Path, capsys):
    """Each bad input of the issue through `danlu synth`: one clear line on stderr, exit 2, no output file."""
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(SEEDS) + "\n", encoding="utf-8")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    csv = tmp_path / "seeds.csv"
    csv.write_text("task\nlist three fruits\n", encoding="utf-8")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "x"}\n', encoding="utf-8")
    cases = [
        (dead, seeds, "cannot connect"),
        (None, csv, "seeds.csv: unknown file type"),
        (None, wrong, r"wrong.jsonl:1: not a prompt \(keys: question\)"),
        ("junk", seeds, "not the JSON of the OpenAI API"),
        ("empty", seeds, "returned empty text for all 2 requests"),
    ]
    for i, (teacher, seed_file, message) in enumerate(cases):
        out = tmp_path / f"out{i}.jsonl"
        with Scripted([], default=teacher if teacher in ("junk", "empty") else "ok") as s:
            url = s.url if teacher in (None, "junk", "empty") else teacher
            argv = ["synth", "instruct", "--teacher", url, "--seed", str(seed_file), "--n", "2", "--out", str(out),
                    "--batch-size", "2", "--retries", "0"]  # fmt: skip
            assert _cli(*argv) == 2, message
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
        assert err.count("\n") == 1  # one line
        assert not out.exists() and not log_path(out).exists(), message  # nothing half-written


# ───────────────────────── a real teacher: a tiny chat model, in process and behind `danlu serve` ─────────


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer chat model overfitted (a few seconds) to write QUESTIONS as user turns and LIST as answers."""

    from danlu.tokenizer import Tokenizer

    cfg = InstructConfig(n=3, per_request=4, seed=0)
    asks = [build_prompt(SEEDS, [], j, cfg) for j in range(2)]  # what test_self_instruct asks first
    dialogs = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": LIST}] for q in QUESTIONS + asks
    ]
    tok = Tokenizer.train([LIST * 3] + QUESTIONS * 10 + asks, vocab_size=1000)
    rows = []
    for d in dialogs:
        ids = tok.render_chat(d)[0]
        rows += [ids, [tok.bos_id, *ids]]  # /v1/completions prompts start with bos
    return overfit_chat_model(tok, rows, tmp_path_factory.mktemp("synth_teacher"))


@pytest.fixture(scope="module")
def served(teacher_ckpt: Path):
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    model = load_served_model("teacher", str(teacher_ckpt))
    app = create_app([model], ServeOptions(api_key="right-key", date_prompt=False))
    with BackgroundServer(app) as url:
        yield url
    model.worker.close()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cli(*argv: str) -> int:
    from danlu.cli import main

    return main(list(argv))


def test_answer_and_magpie_against_danlu_serve(served: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("TEACHER_KEY", "right-key")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    common = ["--teacher", served, "--api-key-env", "TEACHER_KEY", "--max-tokens", "80", "--temperature", "0"]
    assert (
        _cli("synth", "answer", *common, "--prompts", str(prompts), "--out", str(out), "--batch-size", "3")
        == 0
    )
    rows = _rows(out)
    assert [r["messages"][0]["content"] for r in rows] == QUESTIONS
    assert all(r["messages"][1]["content"] == LIST for r in rows)
    assert rows[0]["meta"]["teacher"] == f"{served}/v1#teacher" and rows[0]["meta"]["prompt"] == QUESTIONS[0]
    assert rows[0]["meta"]["filters"] == ["answer_malformed", "answer_length"]
    mag = tmp_path / "magpie.jsonl"
    assert _cli("synth", "magpie", *common, "--n", "3", "--out", str(mag), "--random-seed", "1") == 0
    rows = _rows(mag)
    assert len(rows) == 3 and len({r["messages"][0]["content"] for r in rows}) == 3
    assert any(r["messages"][0]["content"] in QUESTIONS for r in rows)  # the user turns it was trained on
    assert rows[0]["meta"]["prompt"] == "<|im_start|>user\n" and "rouge_l" in rows[0]["meta"]["filters"]
    journal = _rows(log_path(mag))
    fails = [r["meta"]["failed"] for e in journal[1:] for r in e["rejected"]]
    assert set(fails) <= {"rouge_l", "malformed", "length", "surplus"}
    capsys.readouterr()
    monkeypatch.setenv("TEACHER_KEY", "wrong-key")
    assert (
        _cli("synth", "answer", *common, "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl")) == 2
    )
    assert "refused the API key ($TEACHER_KEY): HTTP 401" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.log.jsonl").exists()


def test_self_instruct_with_local_teacher(teacher_ckpt: Path, tmp_path: Path):
    from danlu.synth.local import LocalTeacher

    out = tmp_path / "instruct.jsonl"
    teacher = LocalTeacher(teacher_ckpt, batch_size=4)
    cfg = InstructConfig(n=3, per_request=4, jobs_per_round=2, seed=0,
                         instruction_sampling=Sampling(max_tokens=80, temperature=0.0),
                         answer_sampling=Sampling(max_tokens=80, temperature=0.0))  # fmt: skip
    run_instruct(teacher, SEEDS, SynthStore(out, {"n": 3}), Filters(), cfg, progress=False)
    rows = _rows(out)
    assert [r["messages"][0]["content"] for r in rows] == QUESTIONS[:3]  # the list's items, each kept once
    assert rows[0]["meta"]["kind"] == "self-instruct" and "Translate" in rows[0]["meta"]["prompt"]
    assert rows[0]["meta"]["filters"][-3:] == ["rouge_l", "answer_malformed", "answer_length"]
    journal = _rows(log_path(out))
    assert journal[0] == {"settings": {"n": 3}}
    assert [r["meta"]["failed"] for r in journal[1]["rejected"]] == ["surplus"]  # the 4th item of the round
    with pytest.raises(DanluError, match="started with other settings"):
        SynthStore(out, {"n": 4})


def test_resume_after_kill_loses_and_duplicates_nothing(teacher_ckpt: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{q} #{i}" for i in range(10) for q in QUESTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "a.jsonl"
    cmd = [sys.executable, "-m", "danlu", "synth", "answer", "--teacher", str(teacher_ckpt), "--prompts",
           str(prompts), "--out", str(out), "--batch-size", "2", "--temperature", "0", "--max-tokens", "80"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = log_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 4:  # settings + 3 jobs committed
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    done_before = len(_rows(log)) - 1
    assert 3 <= done_before < 40, "the run was not killed midway"
    # what a kill between the two writes, or in the middle of one, leaves behind
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [], "meta": {"job": 39}}) + "\n" + '{"messages": [{"ro')
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"job": 3')
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    rows = _rows(out)
    jobs = [r["meta"]["job"] for r in rows] + [
        r["meta"]["job"] for e in _rows(log)[1:] for r in e["rejected"]
    ]
    assert sorted(jobs) == list(range(40))  # every prompt once: none lost, none twice
    assert [r["meta"]["source"] for r in rows] == [f"{prompts}:{r['meta']['job'] + 1}" for r in rows]
