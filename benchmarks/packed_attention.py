"""Packed SFT rows: the dense (B, 1, T, T) segment mask vs flex attention's block-sparse mask, side by side.

An SFT-like step (several dialogs per row, a padding segment at the end, cross-entropy loss) at the tiny shape
(depth 4, width 256, 4 heads, GQA 2 KV heads) for each row length, in the precision the engine picks for the device.
Training rows run forward + backward; inference rows run the forward under no_grad (what evaluation does). Every
compiled row compiles the whole model, as the engine does. Rows of one table run interleaved, medians of `rounds`
(benchmarks/_common.py), so a load spike on a shared machine hits all of them alike. "causal" runs the same rows
without segment ids (attention then crosses dialogs: wrong for SFT) to show what the packing mask itself costs.

On a CPU, torch has no flex_attention backward (danlu.model.packed_attention), so the flex training rows say so
instead of a time. On a GPU all rows run.

    python benchmarks/packed_attention.py                      # seq 256 and 1024, batch 16
    python benchmarks/packed_attention.py --seq 256 --rounds 3 --threads 2
    python benchmarks/packed_attention.py --seq 1024 --modes infer   # forward only (where flex runs on a CPU)
    python benchmarks/packed_attention.py --device cuda --seq 1024 4096 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timed_side_by_side  # noqa: E402

from danlu import DanluError  # noqa: E402
from danlu.engine import resolve_dtype  # noqa: E402
from danlu.model import ModelConfig, Transformer, block_segment_mask, dense_segment_mask  # noqa: E402


def packed_segments(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Segment ids of rows packed as SFT packs them: dialogs of seq/16 … seq/4 tokens, then one padding segment."""
    rng = np.random.default_rng(seed)
    seg = torch.empty(batch, seq, dtype=torch.long)
    for r in range(batch):
        pos, s = 0, 0
        while True:
            n = int(rng.integers(seq // 16, seq // 4 + 1))
            if pos + n > seq:
                break
            seg[r, pos : pos + n] = s
            pos, s = pos + n, s + 1
        seg[r, pos:] = s  # padding: its own segment, as danlu.stages.sft.collate makes it
    return seg


def make_step(
    model: Transformer, run: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor | None,
    attention: str, dtype: torch.dtype, train: bool,
) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        model.attention = attention  # one model serves several rows; the setting is read at each forward
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if train:
                run(x, y, segment_ids=seg).backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    run(x, segment_ids=seg)

    return step


def table(args: argparse.Namespace, seq: int, device: torch.device, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, depth=4, max_position_embeddings=max(seq, 256))
    model = Transformer(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
    y = torch.roll(x, -1, 1)
    seg = packed_segments(args.batch, seq).to(device)
    dense_bytes = dense_segment_mask(seg).numel()  # one bool per (row, i, j)
    blocks = block_segment_mask(seg)
    block_bytes = sum(t.numel() * t.element_size() for t in blocks.as_tuple() if isinstance(t, torch.Tensor))
    print(f"\nseq {seq}, batch {args.batch}, {float((seg.amax(1) + 1).float().mean()):.1f} segments per row "
          f"(incl. padding); mask memory: dense {dense_bytes / 2**20:.1f} MiB, block mask "
          f"{block_bytes / 2**10:.1f} KiB ({blocks.sparsity():.0f}% of blocks skipped)")  # fmt: skip
    torch._dynamo.reset()  # six variants per table (attention, segments, grad mode): each table its own cache
    compiled = torch.compile(model, dynamic=False) if args.compile else None
    for train in [mode == "train" for mode in args.modes]:
        rows: dict[str, Callable[[], None]] = {}
        for label, attention, run, segs in [
            ("dense mask, eager", "dense", model, seg),
            ("dense mask, compiled", "dense", compiled, seg),
            ("flex, compiled", "flex", compiled, seg),
            ("causal (no mask), compiled", "dense", compiled, None),
        ]:
            if run is None:
                continue
            step = make_step(model, run, x, y, segs, attention, dtype, train)
            try:
                step()  # the first call compiles; an unsupported combination says so here
            except DanluError as e:
                print(f"  {'train' if train else 'infer'}  {label:28s} not supported: {e}")
                continue
            rows[label] = step
        times = timed_side_by_side(rows, warmup=1, rounds=args.rounds, sync=_sync(device))
        base = times.get("dense mask, compiled", times.get("dense mask, eager"))
        for label, sec in times.items():
            tok_s = args.batch * seq / sec
            print(f"  {'train' if train else 'infer'}  {label:28s} {sec * 1e3:8.1f} ms  {tok_s:9.0f} tok/s  "
                  f"x{base / sec:.2f} vs dense compiled")  # fmt: skip


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager rows only")
    p.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    p.add_argument("--dtype", default="auto", help="auto (the engine's choice), bf16 or fp32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"{machine()}; {device}, {str(dtype).removeprefix('torch.')}")
    for seq in args.seq:
        table(args, seq, device, dtype)


if __name__ == "__main__":
    main()
