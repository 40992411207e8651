"""Prefilling the prompts that join a batch: the model's left-padded forward vs the batch graph, side by side.

`SlotBatch.admit` (RL rollouts, evaluation, every request that joins `danlu serve`) prefills its prompts, then copies
their keys and values into free slots. Three ways to compute that prefill, timed interleaved on the same prompts:
  padded    the model's `hidden_states` over left-padded prompts with a padding mask (SDPA), eager: the way before
  rows      `Transformer.decode_rows` with a prompt per row, left-aligned (what `Generator._prefill` runs), eager
  compiled  the same through the generator's compiled batch graph (dynamic shapes; first call not timed)
  frozen    compiled with the weights as constants of the graph (`frozen_weights=True`, what `danlu serve` uses)
Each setting is (rows × prompt tokens): one request joining a server, a burst of them, an evaluation batch and a
GRPO step's 128 rollouts. The logits after each prompt must agree across the three (fp32: 1e-4; bf16: the top
token on 95% of rows at least, roundings differ); the run fails otherwise.

    python benchmarks/batch_prefill.py                 # fp32, as a server decodes
    python benchmarks/batch_prefill.py --bf16          # under bf16 autocast, as a training stage's rollouts do
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

from danlu.generate import Generator  # noqa: E402

SETTINGS = [(1, 24), (1, 84), (1, 200), (16, 24), (32, 60), (128, 40)]  # (rows, longest prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as a training stage's rollouts run")
    args = ap.parse_args()

    model = random_model(args.vocab, args.depth, args.context)
    tok = _NoStopTokenizer(args.vocab)
    eager, compiled = Generator(model, tok), Generator(model, tok, compile=True)
    frozen = Generator(model, tok, compile=True, frozen_weights=True)
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    print(f"# {machine()}; depth {args.depth}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads, {args.repeats} calls each, interleaved")  # fmt: skip
    print("| rows × longest prompt | padded (ms) | rows (ms) | compiled (ms) | frozen (ms) | compiled vs padded |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    for rows, longest in SETTINGS:
        lengths = [longest] + torch.randint(max(1, longest // 2), longest + 1, (rows - 1,), generator=g).tolist()
        prompts = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]
        paths = {"padded": lambda p=prompts: padded(eager, p), "rows": lambda p=prompts: eager._prefill(p)[0],
                 "compiled": lambda p=prompts: compiled._prefill(p)[0],
                 "frozen": lambda p=prompts: frozen._prefill(p)[0]}  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in paths}
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), precision:
            compiled._prefill(prompts)  # compiles (once per graph: one row, several rows)
            frozen._prefill(prompts)
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    out[name] = fn().float()
                    times[name].append(time.perf_counter() - t0)
        for name in ("rows", "compiled", "frozen"):
            if args.bf16:
                same = (out[name].argmax(-1) == out["padded"].argmax(-1)).float().mean().item()
                assert same >= 0.95, f"{name}: top token agrees on {same:.0%} of rows only"
            else:
                gap = (out[name] - out["padded"]).abs().max().item()
                assert gap < 1e-4, f"{name}: logits differ from the padded forward's by {gap:.2e}"
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(f"| {rows} × {longest} | {ms['padded']:.2f} | {ms['rows']:.2f} | {ms['compiled']:.2f} "
              f"| {ms['frozen']:.2f} | {ms['padded'] / ms['compiled']:.2f}× |")  # fmt: skip


def padded(generator: Generator, prompts: list[list[int]]) -> torch.Tensor:
    """The way before: the model's forward over left-padded prompts, a padding mask, SDPA."""
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    return generator._logits(ids, generator.model.new_cache(len(prompts), longest, pad=pad))

if __name__ == "__main__":
    main()
