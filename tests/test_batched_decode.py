"""The batched decode step (`Transformer.decode_rows`, `SlotBatch`) and continuous batching in the server: rows at
different positions compute what each row computes alone, rows join and leave between steps, every request keeps
its own sampling params and seed, and a full worker answers 429 with Retry-After."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from danlu.compiler import compiler_available
from danlu.generate import Generator, SamplingParams, SlotBatch, slot_count
from danlu.model import ModelConfig, Transformer
from tests.conftest import IdsTokenizer, answers_joining_midway, mixed_requests


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, depth=2, max_position_embeddings=64, **kw)
    return Transformer(cfg).eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


def _alone(gen: Generator, prompt: list[int], params: SamplingParams):  # noqa: ANN202
    items = list(gen.stream(prompt, params))
    return "".join(s for s in items if isinstance(s, str)), items[-1]


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False, "qkv_bias": True, "qk_norm": True}])
def test_rows_at_different_positions_get_their_single_row_logits(kw: dict) -> None:
    model = _model(**kw)
    lengths = [5, 17, 1, 30]
    prompts = _prompts([n + 6 for n in lengths])
    with torch.no_grad():
        alone = []
        for p, n in zip(prompts, lengths):  # each row alone through the plain cache path
            cache = model.new_cache(1, 48)
            model(torch.tensor([p[:n]]), cache=cache)
            alone.append([model(torch.tensor([[t]]), cache=cache)[0, -1] for t in p[n:]])
        slots = model.new_cache(4, 48)
        for b, (p, n) in enumerate(zip(prompts, lengths)):
            cache = model.new_cache(1, n)
            model(torch.tensor([p[:n]]), cache=cache)
            for layer in range(2):
                slots.k[layer][b, :, :n] = cache.k[layer][0]
                slots.v[layer][b, :, :n] = cache.v[layer][0]
        for step in range(6):  # every row one token further per step, each at its own position
            token = torch.tensor([[p[n + step]] for p, n in zip(prompts, lengths)])
            got = model.decode_rows(token, torch.tensor(lengths) + step, slots.k, slots.v)
            want = torch.stack([a[step] for a in alone])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefill_through_the_batch_graph_is_the_models_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts prefilled by `decode_rows` with several tokens a row (left-aligned, in chunks) give the logits and the
    keys/values of the model's plain forward, one prompt at a time; identical prompts are computed once."""
    import danlu.generate

    model = _model()
    gen = Generator(model, IdsTokenizer())
    prompts = _prompts([7, 30, 1, 12])
    prompts.append(list(prompts[1]))  # a GRPO group's copy
    with torch.no_grad():
        want, caches = [], []
        for p in prompts:
            cache = model.new_cache(1, len(p))
            want.append(model(torch.tensor([p]), cache=cache)[0, -1])
            caches.append(cache)
        calls: list[torch.Size] = []
        rows = gen._rows
        monkeypatch.setattr(gen, "_rows", lambda *a, **k: calls.append(a[0].shape) or rows(*a, **k))
        for chunk in (512, 8):  # one pass, and chunks of 8 positions (prompts end in different chunks)
            monkeypatch.setattr(danlu.generate, "PREFILL_CHUNK", chunk)
            calls.clear()
            logits, cache = gen._prefill(prompts)
            torch.testing.assert_close(logits, torch.stack(want), atol=1e-5, rtol=1e-5)
            for i, (p, alone) in enumerate(zip(prompts, caches)):
                for layer in range(2):
                    torch.testing.assert_close(cache.k[layer][i, :, : len(p)], alone.k[layer][0], atol=1e-5, rtol=0)
                    torch.testing.assert_close(cache.v[layer][i, :, : len(p)], alone.v[layer][0], atol=1e-5, rtol=0)
            assert all(shape[0] == 4 for shape in calls)  # five prompts, four distinct
            assert len(calls) == (1 if chunk == 512 else 4)
        calls.clear()  # one token alone, or one past a chunk: still prefilled two positions wide (the step is one)
        for chunk, prompt in ((512, prompts[2]), (8, prompts[0][:1] + prompts[3][:8])):
            monkeypatch.setattr(danlu.generate, "PREFILL_CHUNK", chunk)
            cache = model.new_cache(1, len(prompt))
            want = model(torch.tensor([prompt]), cache=cache)[0, -1]
            torch.testing.assert_close(gen._prefill([prompt])[0][0], want, atol=1e-5, rtol=1e-5)
        assert [shape[1] for shape in calls] == [2, 8, 2]


def test_a_prefix_cache_prefills_only_what_it_has_not_seen() -> None:
    """A server's prompts share a system prompt: later prompts reuse its blocks' keys/values (the same logits and
    tokens as prefilling all of it), a prompt is never taken whole (its last token's logits are needed), prompts
    near the context start from 0, and the cache keeps to its budget, oldest blocks out first."""
    from danlu.prefix_cache import BLOCK, PrefixCache

    model = _model()
    plain, cached = Generator(model, IdsTokenizer()), Generator(model, IdsTokenizer(), prefix_cache=PrefixCache())
    system = _prompts([2 * BLOCK + 5], seed=4)[0]
    prompts = [system + tail for tail in _prompts([3, 9, 1], seed=5)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(cached._prefill(prompts)[0], plain._prefill(prompts)[0], atol=1e-5, rtol=1e-5)
        assert cached.prefix_cache.tokens_reused == 3 * 2 * BLOCK  # the second call: two blocks of each prompt
        exact = prompts[0][: 2 * BLOCK]  # exactly two cached blocks: the second is computed again, not reused
        assert len(cached.prefix_cache.match(exact, torch.float32)) == 1
        one_past = [prompts[0][: 2 * BLOCK + 1]]  # two blocks cached, one token to compute
        torch.testing.assert_close(cached._prefill(one_past)[0], plain._prefill(one_past)[0], atol=1e-5, rtol=1e-5)
        near = [prompts[1] + [7] * 12, [5] * 40]  # the first near the context (64), the second's rest is long
        torch.testing.assert_close(cached._prefill(near)[0], plain._prefill(near)[0], atol=1e-5, rtol=1e-5)
        assert [c.token_ids for c in cached.generate(prompts, params)] == [
            c.token_ids for c in plain.generate(prompts, params)
        ]
    keys = model.new_cache(1, 5 * BLOCK)
    block_bytes = sum(t[0, :, :BLOCK].nbytes for t in keys.k + keys.v)
    small = PrefixCache(budget_bytes=3 * block_bytes)
    ids = list(range(1, 5 * BLOCK + 1))
    small.add(ids, keys.k, keys.v, 0, 0)
    assert len(small) == 3 and not small.match(ids, torch.float32)  # the first blocks went first
    small.add(ids[: 2 * BLOCK], keys.k, keys.v, 0, 0)
    assert len(small.match(ids[: 2 * BLOCK + 1], torch.float32)) == 2
    assert not small.match(ids[: 2 * BLOCK + 1], torch.bfloat16) and len(small) == 0  # another dtype: dropped


def test_slot_counts_are_few() -> None:
    assert [slot_count(n, 64) for n in (0, 1, 2, 4, 5, 16, 17, 64)] == [1, 1, 4, 4, 16, 16, 64, 64]
    assert slot_count(5, 5) == 5 and slot_count(3, 2) == 3


def test_rows_join_and_leave_between_steps() -> None:
    """A row alone, then three join (one finishing at once, one with a stop string), one is dropped: every row
    streams exactly what `Generator.stream` streams for it alone."""
    model = _model()
    gen = Generator(model, IdsTokenizer())
    prompts = _prompts([4, 9, 2, 13])
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    _, first = _alone(gen, prompts[2], greedy)
    stop_at = "".join(f"<{t}>" for t in first.token_ids[3:5])  # a stop string that the third row will meet
    params = [greedy, SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=12, temperature=0.0,
              stop=[stop_at]), SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=11)]  # fmt: skip
    rows = [gen.row(p, sp) for p, sp in zip(prompts, params)]
    streamed = {id(r): "" for r in rows}
    batch = SlotBatch(gen, most=4)

    def note(events: list) -> None:
        for row, delta in events:
            streamed[id(row)] = streamed.get(id(row), "") + delta

    note(batch.admit(rows[:1]))
    for _ in range(3):
        note(batch.advance())
    note(batch.admit(rows[1:]))
    assert rows[1].done and len(batch) == 3  # max_tokens=1: finished at its prefill, never took a slot
    dropped = gen.row(prompts[0], greedy)
    note(batch.admit([dropped]))
    note(batch.advance())
    batch.drop(dropped)
    while len(batch):
        note(batch.advance())
    assert len(dropped.token_ids) == 2  # its prefill token and one step, then it left
    for row, prompt, sp in zip(rows, prompts, params):
        text, want = _alone(gen, prompt, sp)
        tail, got = row.close()
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert streamed[id(row)] + tail == text == got.text
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert rows[2].finish == "stop" and stop_at not in rows[2].text


def test_generate_rows_are_the_prompts_alone_and_seeded_per_row() -> None:
    model = _model()
    gen = Generator(model, IdsTokenizer())
    prompts = _prompts([3, 11, 7, 20, 5])
    for params in (SamplingParams(max_tokens=15, temperature=0.0),
                   SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=3)):  # fmt: skip
        got = gen.generate(prompts, params)
        for i, (p, c) in enumerate(zip(prompts, got)):
            seeded = SamplingParams(
                **{**params.__dict__, "seed": None if params.seed is None else params.seed + i}
            )
            assert c.token_ids == _alone(gen, p, seeded)[1].token_ids
        legacy = Generator(model, IdsTokenizer())
        legacy.batches = False  # the path of models without decode_rows: one shrinking left-padded cache
        assert [c.token_ids for c in legacy.generate(prompts, params)] == [c.token_ids for c in got]


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_compiled_batch_gives_the_eager_tokens() -> None:
    """One dynamic batch graph: batches of other sizes and lengths, rows leaving, and weights changed in place (a
    policy between RL steps) all give the eager tokens, without compiling again."""
    from torch._dynamo.utils import counters

    model = _model()
    compiled = Generator(model, IdsTokenizer(), compile=True)
    frames = counters["stats"]["unique_graphs"]
    for lengths, tokens in (([3, 11, 7], 10), ([5, 9, 2, 14, 6, 8], 18), ([4, 12, 3, 10, 7], 12)):
        prompts = _prompts(lengths)
        params = SamplingParams(max_tokens=tokens, temperature=0.0)
        eager = Generator(model, IdsTokenizer()).generate(prompts, params)
        got = compiled.generate(prompts, params)
        assert compiled._decode is not None  # it ran compiled, not through the eager fallback
        assert [c.token_ids for c in got] == [c.token_ids for c in eager]
        with torch.no_grad():  # an optimizer step: the next batch must see the new weights
            model.lm_head.weight.mul_(1.5).add_(0.01)
    # the batch graph (steps and prompts) with its specializations, and the one-row step per cache length: a handful
    assert counters["stats"]["unique_graphs"] - frames <= 4


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_frozen_batch_graph_gives_the_eager_tokens_and_keeps_to_its_model() -> None:
    """A server's batch graph holds its weights as constants (`frozen_weights`): it gives the eager tokens, and a
    plain compiled generator of another model in the same process decodes with that model's own weights. Plain
    batch graphs compiled by the tests before this one must not stand in for the frozen graph: after a's weights
    change, its decode steps still use the old ones."""
    a = _model()
    b = _model()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.3).add_(0.02)
    prompts = _prompts([3, 11, 7, 9, 5])
    params = SamplingParams(max_tokens=12, temperature=0.0)

    def eager(model: Transformer) -> list[list[int]]:
        return [c.token_ids for c in Generator(model, IdsTokenizer()).generate(prompts, params)]

    want_a, want_b = eager(a), eager(b)
    assert want_a != want_b
    frozen_a = Generator(a, IdsTokenizer(), compile=True, frozen_weights=True)
    assert [c.token_ids for c in frozen_a.generate(prompts, params)] == want_a
    assert frozen_a._decode is not None  # compiled, not the eager fallback
    with torch.no_grad():  # the frozen graph keeps a's weights as they were: why only a server may freeze
        for p in a.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    # prompts and steps both run the frozen graph, which keeps the old weights
    assert [c.token_ids for c in frozen_a.generate(prompts, params)] != eager(a)
    plain_b = Generator(b, IdsTokenizer(), compile=True)
    assert [c.token_ids for c in plain_b.generate(prompts, params)] == want_b


def test_a_server_freezes_only_where_a_copy_of_the_weights_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freezing packs a copy of the weights: the server takes it while the memory available holds the weights
    twice, and not where the memory cannot be told (0)."""
    import danlu.machine
    from danlu.serve.engine_process import _room_for_a_copy

    model = _model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for available, fits in ((0, False), (2 * weights - 1, False), (2 * weights, True)):
        monkeypatch.setattr(danlu.machine, "available_memory", lambda n=available: n)
        assert _room_for_a_copy(model) is fits


# ---- the server: continuous batching ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path):
    from danlu.serve.routing import load_served_model

    model = load_served_model("tiny", str(tiny_checkpoint), max_active=4)
    yield model
    model.worker.close()


def test_concurrent_requests_get_what_each_gets_alone(served) -> None:
    """Six requests (more than the 4 slots), different lengths and params, some joining while others run: the
    greedy ones get exactly the tokens they get alone, the seeded sampled ones too (each its own generator)."""
    worker, tok = served.worker, served.tokenizer
    assert worker.batched
    requests = mixed_requests(tok)
    got = answers_joining_midway(worker, requests)
    alone = Generator(worker.generator.model, tok)
    for (text, completion), (p, sp) in zip(got, requests):
        want_text, want = _alone(alone, p, sp)
        assert completion.token_ids == want.token_ids
        assert completion.text == want.text
        assert text == completion.text  # the streamed deltas add up to the final text
    assert worker.stats["peak_active"] >= 3


def test_a_full_worker_answers_429_with_retry_after(tiny_checkpoint: Path) -> None:
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.engine import ModelWorker
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    model = load_served_model("tiny", str(tiny_checkpoint), max_active=1)
    worker = model.worker
    assert isinstance(worker, ModelWorker)
    worker.max_queued = 1
    body = {"model": "tiny", "prompt": "中国", "max_tokens": 4}
    try:
        with BackgroundServer(create_app([model], ServeOptions())) as url:
            assert httpx.post(url + "/v1/completions", json={**body, "n": 2}, timeout=60).status_code == 200
            held = worker.reserve(2)  # two streams running or waiting: the bound of 1 + 1 is reached
            assert held is not None and worker.reserve(1) is None
            for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"stream": True})):
                payload = (
                    {**body, **extra}
                    if path == "/v1/completions"
                    else {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                        **extra,
                    }
                )
                r = httpx.post(url + path, json=payload, timeout=60)
                assert r.status_code == 429
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            held.release()
            r = httpx.post(url + "/v1/completions", json={**body, "n": 2, "stream": True}, timeout=60)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            r = httpx.post(url + "/v1/completions", json={**body, "n": 3}, timeout=60)
            assert r.status_code == 400  # more streams than can ever run: a retry would not help
            assert r.json()["error"]["param"] == "n"
    finally:
        worker.close()
    assert worker._reserved == 0  # every finished request gave its room back
