"""Shared fixtures. Tests use the built-in world corpus and small fixtures they write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def overfit_chat_model(tok, rows: list[list[int]], path: Path, steps: int = 80) -> Path:
    """A 1-layer chat model trained on `rows` (token id lists, padded into one batch) until it repeats them — a
    teacher that answers what the test needs in a few seconds. Saved as a chat checkpoint at `path`."""
    import torch

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=tok.padded_vocab_size(64), depth=1, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    width = max(map(len, rows))
    x = torch.tensor([r[:-1] + [tok.pad_id] * (width - len(r)) for r in rows])
    y = torch.tensor([r[1:] + [-100] * (width - len(r)) for r in rows])
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model_dir(path, model.state_dict(), cfg, tok, {"stage": "test"}, chat=True)
    return path


class IdsTokenizer:
    """Ids as text ("<5><17>"): the little of a tokenizer that `danlu.generate.Generator` needs, for tests of decoding
    on random models without a trained tokenizer. `stop_ids` end a generation (id 0 by default; none with [])."""

    def __init__(self, vocab_size: int = 300, stop_ids: tuple[int, ...] = (0,)) -> None:
        self.vocab_size, self.stop_ids, self.pad_id = vocab_size, set(stop_ids), 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)

    def stream_decoder(self, skip_special_tokens: bool = True) -> _IdsStream:
        return _IdsStream()


class _IdsStream:
    """`IdsTokenizer`'s streaming decoder: every id is whole text at once."""

    def step(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project (development and CI only); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (only present in development and CI)")
    return SHARED_DATA


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SAMPLE_TEXT = [
    "中国最高的山是珠穆朗玛峰。中国最长的河是长江。日本的首都是东京。",
    "The highest mountain in China is Mount Everest. The capital of Japan is Tokyo.",
    "12 + 34 = 46. 7 × 8 = 56. 今天是2026年11月21日,星期六。",
    "user: 你好! assistant: 你好,有什么可以帮你? 🙂 Hello, how can I help?",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A small BPE tokenizer trained on a few bilingual sentences (a second or so)."""
    from danlu.tokenizer import Tokenizer

    tok = Tokenizer.train(SAMPLE_TEXT, vocab_size=400)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save(path)
    return Tokenizer.load(path)


def make_checkpoint(
    path: Path, tokenizer, *, chat: bool = True, depth: int = 1, seed: int = 0, context: int = 128
) -> Path:
    """A random-init model + tokenizer saved as a danlu checkpoint folder."""
    import torch

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tokenizer.padded_vocab_size(64), depth=depth, max_position_embeddings=context
    )
    model = Transformer(cfg)
    save_model_dir(path, model.state_dict(), cfg, tokenizer, {"stage": "test"}, chat=chat)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A chat checkpoint folder with a random-init 1-layer model: loads and generates in milliseconds."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_tokenizer)


# ---- a server's worker under concurrent requests (test_batched_decode, test_engine_process) -------------------------
def mixed_requests(tok) -> list:  # noqa: ANN001
    """Six (prompt ids, SamplingParams) of different lengths, greedy and seeded sampling (top-p, top-k): more than
    a 4-slot worker holds at once."""
    from danlu.generate import SamplingParams

    texts = ("中国最高的山", "The capital of Japan is", "12 + 34", "你好", "Hello", "7 × 8")
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=[]) for m in (30, 9, 25, 3, 40, 17)
    ]
    params[1] = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.8, seed=123, stop_token_ids=[])
    params[4] = SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=7, stop_token_ids=[])
    return [(tok.encode(t), p) for t, p in zip(texts, params)]


async def answer(worker, job) -> tuple:  # noqa: ANN001
    """(the streamed text deltas joined, the last item: the Completion) of a submitted job."""
    items = [item async for item in worker.iterate(job)]
    return "".join(s for s in items if isinstance(s, str)), items[-1]


def answers_joining_midway(worker, requests: list) -> list:  # noqa: ANN001
    """`answer` of each request, the first three submitted together and the rest once the worker is decoding
    them (or has finished one), so that they join mid-way."""
    import asyncio

    async def run() -> list:
        first = [worker.submit(p, sp) for p, sp in requests[:3]]
        while worker.active == 0 and worker.stats["finished"] == 0:
            await asyncio.sleep(0.001)
        later = [worker.submit(p, sp) for p, sp in requests[3:]]
        return await asyncio.gather(*(answer(worker, j) for j in first + later))

    return asyncio.run(run())
