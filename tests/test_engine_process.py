"""The served model in an engine process of its own (danlu.serve.engine_process): same answers as the worker thread,
errors and cancellations crossing the pipe, a failed load or a dead engine reported, not hung on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from danlu import DanluError
from danlu.generate import SamplingParams
from danlu.serve.engine_process import ProcessWorker, engine_threads
from danlu.serve.routing import load_served_model
from tests.conftest import answer, answers_joining_midway, mixed_requests


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path):
    """The tiny checkpoint twice: in an engine process (what `danlu serve` runs) and in a thread of this one."""
    process = load_served_model("tiny", str(tiny_checkpoint), max_active=4, engine="process", threads=1)
    thread = load_served_model("tiny", str(tiny_checkpoint), max_active=4, engine="thread")
    yield process, thread
    process.worker.close()
    thread.worker.close()


def test_the_engine_process_answers_what_the_worker_thread_answers(engines) -> None:
    """Six requests over 4 slots, greedy and seeded sampling, some joining while others run: the same tokens and
    texts from the engine process as from the thread (whose answers equal unbatched decoding,
    test_batched_decode), the streamed deltas adding up to each text; the engine's counters reach the server."""
    process, thread = engines
    assert isinstance(process.worker, ProcessWorker) and process.worker.batched
    assert process.tokenizer.encode("你好") == thread.tokenizer.encode("你好")
    assert process.context_length == thread.context_length and process.meta == thread.meta
    requests = mixed_requests(process.tokenizer)
    before = process.worker.stats["finished"]
    got, want = (
        answers_joining_midway(process.worker, requests),
        answers_joining_midway(thread.worker, requests),
    )
    for (text, completion), (want_text, want_completion) in zip(got, want):
        assert completion.token_ids == want_completion.token_ids
        assert completion.text == want_completion.text == text == want_text
        assert completion.logprobs == pytest.approx(want_completion.logprobs, abs=1e-5)
    assert process.worker.stats["finished"] - before == len(requests)
    assert process.worker.stats["tokens"] >= sum(len(c.token_ids) for _, c in got)


def test_a_bad_prompt_fails_its_own_request_and_a_cancelled_one_leaves(engines) -> None:
    """An empty prompt raises the engine's DanluError in its own request only; a client that stops reading a
    long stream frees its slot in the engine (counted as cancelled there)."""
    worker = engines[0].worker
    ok = SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[])

    async def run() -> tuple:
        bad, good = worker.submit([], ok), worker.submit([5, 6, 7], ok)
        outcomes = await asyncio.gather(answer(worker, bad), answer(worker, good), return_exceptions=True)
        long = worker.submit([5, 6], SamplingParams(max_tokens=200, temperature=0.0, stop_token_ids=[]))
        stream = worker.iterate(long)
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        return outcomes, first

    cancelled = worker.stats["cancelled"]
    (bad, good), first = asyncio.run(run())
    assert isinstance(bad, DanluError) and "empty prompt" in str(bad)
    assert len(good[1].token_ids) == 5 and isinstance(first, str)
    deadline = time.monotonic() + 30
    while worker.stats["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stats["cancelled"] == cancelled + 1
    assert worker.active == 0


def test_the_server_serves_through_the_engine_process(engines) -> None:
    """The HTTP layer over a ProcessWorker: a streamed chat answer and a completion, the bound on streams (429)."""
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.server import BackgroundServer

    served = engines[0]
    with BackgroundServer(create_app([served], ServeOptions())) as url:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6,
                "temperature": 0.0, "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat, timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        done = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "中国", "max_tokens": 4,
                                                        "temperature": 0.0}, timeout=60)  # fmt: skip
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
        held = served.worker.reserve(served.worker.max_active + served.worker.max_queued)
        try:
            full = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "中国"}, timeout=60)
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        finally:
            held.release()


def test_a_checkpoint_that_does_not_load_is_reported_by_the_server(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DanluError, match="config.json"):
        load_served_model("broken", str(tmp_path), engine="process")
    with pytest.raises(DanluError, match="no such checkpoint folder"):
        load_served_model("missing", str(tmp_path / "missing"), engine="process")
    with pytest.raises(DanluError, match="engine must be process or thread"):
        load_served_model("broken", str(tmp_path), engine="fiber")


def test_requests_fail_with_the_reason_when_the_engine_dies(tiny_checkpoint: Path) -> None:
    """An engine killed mid-stream: its open request ends with an error naming the engine, not a hang, the next
    request is refused with the same reason, and /health answers 503."""
    served = load_served_model("doomed", str(tiny_checkpoint), engine="process", threads=1)
    worker = served.worker
    long = SamplingParams(max_tokens=100_000, temperature=0.0, stop_token_ids=[])

    async def run() -> tuple[list, BaseException, BaseException]:
        job = worker.submit([5, 6], long)
        stream, seen = worker.iterate(job), []
        try:
            async for item in stream:
                seen.append(item)
                if len(seen) == 3:
                    worker._process.kill()
        except DanluError as e:
            during = e
        await asyncio.sleep(0.2)
        try:
            await answer(worker, worker.submit([5], long))
        except DanluError as e:
            after = e
        return seen, during, after

    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.server import BackgroundServer

    try:
        with BackgroundServer(create_app([served], ServeOptions())) as url:
            assert httpx.get(url + "/health").json()["models"]["doomed"]["engine"] == "running"
            seen, during, after = asyncio.run(asyncio.wait_for(run(), 60))
            health = httpx.get(url + "/health")
    finally:
        worker.close()
    assert len(seen) >= 3
    assert "engine process of model 'doomed' exited" in str(during)
    assert "engine process of model 'doomed' exited" in str(after)
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert health.json()["models"]["doomed"]["engine"] == "exited"


def test_an_engine_that_does_not_read_holds_up_no_event_loop(tiny_checkpoint: Path) -> None:
    """Jobs far bigger than the pipe holds, sent while the engine is stopped (as in a long prefill): every submit
    returns at once, and once the engine runs again it gets them all, intact and in order (each prompt is longer
    than the context: the engine's own refusal names its length), then answers a normal request."""
    import os
    import signal
    import threading

    served = load_served_model("stalled", str(tiny_checkpoint), engine="process", threads=1)
    worker, ok = served.worker, SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=[])
    sizes = [300_000 + i for i in range(8)]  # ~600 KB each on the pipe, ~5 MB in all
    submitted, outcomes = threading.Event(), []

    async def run() -> None:
        jobs = [worker.submit([5] * size, ok) for size in sizes]
        submitted.set()
        outcomes.extend(await asyncio.gather(*(answer(worker, j) for j in jobs), return_exceptions=True))
        outcomes.append(await answer(worker, worker.submit([5, 6, 7], ok)))

    os.kill(worker._process.pid, signal.SIGSTOP)
    client = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    try:
        client.start()
        all_sent = submitted.wait(timeout=60)  # before the engine runs again
        os.kill(worker._process.pid, signal.SIGCONT)
        client.join(timeout=120)
    finally:
        os.kill(worker._process.pid, signal.SIGCONT)
        worker.close()
    assert all_sent, "a submit waited for the stopped engine"
    assert not client.is_alive() and len(outcomes) == len(sizes) + 1
    for size, outcome in zip(sizes, outcomes):
        assert isinstance(outcome, DanluError) and str(size) in str(outcome)
    assert len(outcomes[-1][1].token_ids) == 3


def test_an_engine_leaves_one_core_to_the_http_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import danlu.cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(danlu.cpu_threads, "usable_cores", lambda: 8)
    assert engine_threads(None, "cpu")[0] == 7
    assert engine_threads(3, "cpu")[0] == 3
    assert engine_threads(None, "cuda")[0] is None
    monkeypatch.setattr(danlu.cpu_threads, "usable_cores", lambda: 1)
    assert engine_threads(None, "cpu")[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert engine_threads(None, "cpu")[0] is None
    with pytest.raises(DanluError, match="--threads 0"):
        engine_threads(0, "cpu")
