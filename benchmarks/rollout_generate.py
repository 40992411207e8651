"""Batched generation as RL rollouts and evaluation call it: `Generator.generate` eager vs compiled, side by side.

A GRPO-like workload: `--calls` calls of `--rows` prompts (lengths spread over 16-48 tokens) × `--new` sampled tokens,
eager calls through a new `Generator` each, compiled ones through one kept `Generator` (as danlu.stages.rollouts keeps
one), on a random-init model of the tiny recipe's shape (`--bf16`: under bf16 autocast, as a training stage samples). Three paths, calls interleaved so that they share the machine's load:
  legacy   the old eager path: one left-padded cache that shrinks as rows finish (`cache.reorder`)
  slots    eager `SlotBatch` (danlu.generate): rows in fixed slots, attention up to the furthest row
  compiled `SlotBatch` with `torch.compile` of `decode_rows` (one graph with dynamic shapes); its first call
           includes the compilation
  frozen   compiled, with the weights as constants of the graph (`frozen_weights=True`, what `danlu serve` uses:
           on a CPU each weight is packed once for the matrix kernels)

    python benchmarks/rollout_generate.py                  # 16 rows × 48 tokens, 20 calls
    python benchmarks/rollout_generate.py --rows 32 --new 24 --greedy   # an evaluation-like batch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, random_model  # noqa: E402
from generate_throughput import _NoStopTokenizer  # noqa: E402

from danlu.generate import Completion, Generator, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--greedy", action="store_true", help="temperature 0 (evaluation) instead of 1.0 (GRPO)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as a training stage's rollouts run")
    args = ap.parse_args()

    model = random_model(args.vocab, args.depth, args.context)
    cfg = model.config
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

    # one generator for all calls, as a stage's rollouts keep one
    compiled = Generator(model, tok, compile=True)
    frozen = Generator(model, tok, compile=True, frozen_weights=True)
    paths = {
        "legacy": legacy,
        "slots": lambda: Generator(model, tok).generate(prompts, params),
        "compiled": lambda: compiled.generate(prompts, params),
        "frozen": lambda: frozen.generate(prompts, params),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    out: dict[str, list[list[int]]] = {}
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    for _ in range(args.calls):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            with precision:
                out[name] = [c.token_ids for c in fn()]
            times[name].append(time.perf_counter() - t0)

    tokens = args.rows * args.new
    print(f"machine: {machine()}")
    print(f"config: depth {args.depth} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), vocab "
          f"{args.vocab}, {args.rows} rows × {args.new} new tokens, {'greedy' if args.greedy else 'sampled'}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, "
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
        "same tokens, all four paths (each row seeded alike): "
        f"{out['slots'] == out['compiled'] == out['legacy'] == out['frozen']}"
    )


if __name__ == "__main__":
    main()
