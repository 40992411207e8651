"""Does one hostile client slow everyone else down? Two measurements, side by side, loopback only.

1. Streaming clients' inter-token latency (p50/p99) alone, then while an attacker keeps sending ~1 MB chat requests
   (answered 400 before any tokenization or memory lookup), with N corrections in the memory.
2. Correction-memory recall time at 1,000 / 10,000 / 100,000 stored corrections: the n-gram index against the
   linear scan it replaced (cosine against every stored question).

    python benchmarks/serve_abuse.py                 # 4 clients × 64 tokens, 20,000 corrections
    python benchmarks/serve_abuse.py --clients 8 --corrections 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402
from serve_load import random_checkpoint  # noqa: E402


def fill(memory, n: int) -> None:  # noqa: ANN001
    for i in range(n):
        memory.add(f"第{i}号城市的人口是多少? city {i}", f"{i}万人。")


async def stream_gaps(client, url: str, i: int, max_tokens: int) -> list[float]:  # noqa: ANN001
    body = {"model": "m", "messages": [{"role": "user", "content": f"中国最高的山是什么? ({i})"}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True}  # fmt: skip
    gaps, last = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


async def attacker(client, url: str, stop: asyncio.Event, sent: list[int]) -> None:  # noqa: ANN001
    body = {"model": "m", "messages": [{"role": "user", "content": "山" * 330_000}]}  # ~990 KB of UTF-8
    while not stop.is_set():
        r = await client.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        sent.append(1)


async def run(url: str, clients: int, max_tokens: int, attack: bool) -> tuple[list[float], int]:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        stop, sent = asyncio.Event(), []
        bad = asyncio.create_task(attacker(client, url, stop, sent)) if attack else None
        if attack:
            await asyncio.sleep(0.2)
        results = await asyncio.gather(*(stream_gaps(client, url, i, max_tokens) for i in range(clients)))
        stop.set()
        if bad:
            await bad
    return [g for r in results for g in r], len(sent)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def recall_timings(sizes: list[int], queries: int = 50) -> list[tuple[int, float, float]]:
    from danlu.serve.memory import CorrectionMemory, similarity

    rows = []
    for n in sizes:
        mem = CorrectionMemory(0.8)
        fill(mem, n)
        questions = [f"第{i * 7919 % n}号城市的人口是多少? city {i * 7919 % n}" for i in range(queries)]
        t0 = time.perf_counter()
        for q in questions:
            assert mem.recall(q) is not None
        indexed = (time.perf_counter() - t0) / queries
        stored = [e.question for e in mem._entries if e is not None]
        t0 = time.perf_counter()
        for q in questions[:3]:  # the old linear scan: cosine against every stored question
            max(similarity(q, s) for s in stored)
        linear = (time.perf_counter() - t0) / 3
        rows.append((n, indexed, linear))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--corrections", type=int, default=20_000)
    ap.add_argument("--memory-sizes", default="1000,10000,100000")
    args = ap.parse_args()

    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.memory import CorrectionMemory
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    print(f"machine: {machine()}")
    print(f"config: random depth-{args.depth} model, {args.clients} streaming clients × {args.max_tokens} tokens, "
          f"{args.corrections:,} corrections in memory; attacker: ~990 KB chat requests back to back")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(Path(tmp) / "m", args.depth, 512)
        model = load_served_model("m", str(ckpt))
        memory = CorrectionMemory(0.8)
        fill(memory, args.corrections)
        app = create_app([model], ServeOptions(memory=memory))
        try:
            with BackgroundServer(app) as url:
                asyncio.run(run(url, 1, 8, False))  # warm-up
                calm, _ = asyncio.run(run(url, args.clients, args.max_tokens, False))
                loud, sent = asyncio.run(run(url, args.clients, args.max_tokens, True))
        finally:
            model.worker.close()
    print(f"\n{'inter-token latency':<34}{'p50 ms':>10}{'p99 ms':>10}{'gaps':>8}")
    print(f"{'alone':<34}{1e3 * pct(calm, 50):>10.2f}{1e3 * pct(calm, 99):>10.2f}{len(calm):>8}")
    label = f"with {sent} × 1 MB requests"
    print(f"{label:<34}{1e3 * pct(loud, 50):>10.2f}{1e3 * pct(loud, 99):>10.2f}{len(loud):>8}")
    print(f"p99 ratio (attacked / alone): {pct(loud, 99) / pct(calm, 99):.2f}×")

    sizes = [int(x) for x in args.memory_sizes.split(",") if x]
    print(f"\n{'corrections':>12}{'index ms/recall':>18}{'linear ms/recall':>18}{'speed-up':>10}")
    for n, indexed, linear in recall_timings(sizes):
        print(f"{n:>12,}{1e3 * indexed:>18.3f}{1e3 * linear:>18.1f}{linear / indexed:>9.0f}×")


if __name__ == "__main__":
    main()
