"""Batch-1 decode tokens/s of weight-only int8 and int4 (danlu.compress.quantize) vs fp32, side by side.

python benchmarks/quantized_decode.py                 # depth 12 (DESIGN.md's target shape), compiled decode
python benchmarks/quantized_decode.py --depth 4 --eager

Decoding one token streams every weight once, so at depth 12 (~85M block parameters, 340 MB in fp32, far beyond
the caches) its speed is set by memory bandwidth: int8 streams a quarter of the bytes. The same random weights are
quantized; the greedy tokens of each side are compared with fp32's.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, random_model, timed_side_by_side  # noqa: E402
from generate_throughput import _NoStopTokenizer  # noqa: E402

from danlu.compress.quantize import quantize_model, state_bytes  # noqa: E402
from danlu.generate import Generator, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64, help="generated tokens")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--eager", action="store_true", help="decode without torch.compile")
    ap.add_argument("--no-int4", action="store_true")
    args = ap.parse_args()

    fp32 = random_model(args.vocab, args.depth, args.prompt + args.new + 8)
    cfg = fp32.config
    models = {"fp32": fp32, "int8": quantize_model(copy.deepcopy(fp32), 8)}
    if not args.no_int4:
        models["int4"] = quantize_model(copy.deepcopy(fp32), 4, args.group_size)
    tok = _NoStopTokenizer(args.vocab)
    gens = {k: Generator(m, tok, compile=not args.eager) for k, m in models.items()}
    params = SamplingParams(max_tokens=args.new, temperature=0.0, stop_token_ids=[])
    ids = torch.randint(0, args.vocab, (args.prompt,)).tolist()
    out: dict[str, list[int]] = {}

    def runner(name: str):  # noqa: ANN202
        def run() -> None:
            out[name] = gens[name].generate([ids], params)[0].token_ids

        return run

    seconds = timed_side_by_side({k: runner(k) for k in gens}, 1, args.rounds)
    print(f"machine: {machine()}")
    print(f"config: depth {args.depth} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), vocab "
          f"{args.vocab}, prompt {args.prompt}, new {args.new}, batch 1, greedy, "
          f"{'eager' if args.eager else 'torch.compile'} decode, int4 group {args.group_size}")  # fmt: skip
    for name, t in seconds.items():
        same = sum(a == b for a, b in zip(out[name], out["fp32"])) / max(1, len(out["fp32"]))
        print(f"{name:>5}: {args.new / t:>8,.1f} tokens/s   {state_bytes(models[name]) / 2**20:>7.1f} MiB   "
              f"{seconds['fp32'] / t:.2f}x fp32   greedy tokens equal to fp32's: {same:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
