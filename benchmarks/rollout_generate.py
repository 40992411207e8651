"""Batched generation as RL rollouts and evaluation call it: `Generator.generate` eager vs compiled, side by side.

A GRPO-like workload: `--calls` calls of `--rows` prompts (lengths spread over 16-48 tokens) × `--new` sampled tokens,
each call through a new `Generator` (as danlu.stages.rollouts builds one per rollout), on a random-init model of the
tiny recipe's shape. Three paths, calls interleaved so that they share the machine's load:
  legacy   the old eager path: one left-padded cache that shrinks as rows finish (`cache.reorder`)
  slots    eager `SlotBatch` (danlu.generate): rows in fixed slots, attention up to the furthest row
  compiled `SlotBatch` with `torch.compile` of `decode_rows` at every row count (`Generator.compiled_rows`
           = None; a CPU generator compiles one-row steps only, because of what this benchmark measured); its
           first call includes the compilation
Also batch 1: the compiled single-row `decode_step` (`stream`) vs the compiled `decode_rows` with one slot.

    python benchmarks/rollout_generate.py                  # 16 rows × 48 tokens, 20 calls
    python benchmarks/rollout_generate.py --rows 32 --new 24 --greedy   # an evaluation-like batch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from generate_throughput import _NoStopTokenizer  # noqa: E402

from danlu.generate import Completion, Generator, SamplingParams  # noqa: E402
from danlu.model import ModelConfig, Transformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--greedy", action="store_true", help="temperature 0 (evaluation) instead of 1.0 (GRPO)")
    args = ap.parse_args()

    def compiled_batches(model: Transformer, tok: Any) -> Generator:
        gen = Generator(model, tok, compile=True)
        gen.compiled_rows = None  # compile batch steps of any row count, whatever the device's default
        return gen

    cfg = ModelConfig(vocab_size=args.vocab, depth=args.depth, max_position_embeddings=args.context)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tok = _NoStopTokenizer(args.vocab)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.rows,), generator=g)]  # fmt: skip
    params = SamplingParams(
        max_tokens=args.new, temperature=0.0 if args.greedy else 1.0, seed=5, stop_token_ids=[]
    )

    def legacy() -> list[Completion]:
        gen = Generator(model, tok)
        gen.batches = False
        return gen.generate(prompts, params)

    paths = {
        "legacy": legacy,
        "slots": lambda: Generator(model, tok).generate(prompts, params),
        "compiled": lambda: compiled_batches(model, tok).generate(prompts, params),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    out: dict[str, list[list[int]]] = {}
    for _ in range(args.calls):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            out[name] = [c.token_ids for c in fn()]
            times[name].append(time.perf_counter() - t0)

    one = prompts[0]
    single = SamplingParams(max_tokens=64, temperature=0.0, stop_token_ids=[])
    compiled = Generator(model, tok, compile=True)
    b1 = {"decode_step (stream)": lambda: list(compiled.stream(one, single)),
          "decode_rows (1 slot)": lambda: compiled.generate([one], single)}  # fmt: skip
    b1_times: dict[str, list[float]] = {k: [] for k in b1}
    for fn in b1.values():  # compile both first
        fn()
    for _ in range(7):
        for name, fn in b1.items():
            t0 = time.perf_counter()
            fn()
            b1_times[name].append(time.perf_counter() - t0)

    tokens = args.rows * args.new
    print(f"machine: {machine()}")
    print(f"config: depth {args.depth} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), vocab "
          f"{args.vocab}, {args.rows} rows × {args.new} new tokens, {'greedy' if args.greedy else 'sampled'}, "
          f"{args.calls} calls, {torch.get_num_threads()} threads")  # fmt: skip
    print(
        "| path | first call s | median call s | tokens/s (median) | total s, all calls | × legacy (total) |"
    )
    print("|---|---|---|---|---|---|")
    base = sum(times["legacy"])
    for name, ts in times.items():
        med = statistics.median(ts[1:]) if len(ts) > 1 else ts[0]
        print(
            f"| {name} | {ts[0]:.2f} | {med:.3f} | {tokens / med:,.0f} | {sum(ts):.1f} | {base / sum(ts):.2f} |"
        )
    print(
        f"same tokens, all three paths (each row seeded alike): {out['slots'] == out['compiled'] == out['legacy']}"
    )
    for name, ts in b1_times.items():
        print(f"batch 1, 64 tokens, compiled {name}: {64 / statistics.median(ts):,.0f} tokens/s")


if __name__ == "__main__":
    main()
