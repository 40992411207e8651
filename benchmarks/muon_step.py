"""Muon's step: same-shape updates orthogonalized as one batch (`engine.Muon._stacks`) against one matrix at a time.

Interleaved round by round (medians): the optimizer step alone on random gradients of the tiny recipe's hidden
matrices, in bf16 and in fp32 (stacked by force there: the engine stacks in bf16 only, and this row shows why), and
the whole compiled bf16 training step of the tiny shape with Muon. The stacked results are the same bits as one at a
time (tests/test_engine.py); this measures the time.

    python benchmarks/muon_step.py                  # depth 4 (the tiny recipe), bf16 and fp32
    python benchmarks/muon_step.py --depth 8 --rounds 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timed_side_by_side  # noqa: E402

from danlu.engine import Muon, TrainConfig, build_optimizers, optimizer_step  # noqa: E402
from danlu.model import ModelConfig, Transformer  # noqa: E402


def one_at_a_time(params: list[torch.nn.Parameter]) -> list[list[int]]:
    return [[i] for i in range(len(params))]


def optimizer_rows(model: Transformer, dtype: torch.dtype) -> dict[str, object]:
    """The Muon step alone, on fixed random gradients, stacked and one at a time (separate copies of the weights)."""
    rows = {}
    for name in ("stacked", "one at a time"):
        hidden = [torch.nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()
                  if p.dim() == 2 and "embed" not in n]  # fmt: skip
        for p in hidden:
            p.grad = torch.randn_like(p)
        opt = Muon(hidden, dtype=dtype)
        # stacked: the engine's grouping by shape, forced in fp32 too (where the engine goes one at a time) to show why
        opt._stacks = Muon(hidden, dtype=torch.bfloat16)._stacks if name == "stacked" else one_at_a_time  # type: ignore[method-assign]
        rows[name] = opt.step
    return rows


def training_rows(model: Transformer, batch: int, seq: int) -> dict[str, object]:
    """The compiled bf16 training step with Muon, its optimizer switched between stacked and one at a time."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    y = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    tcfg = TrainConfig(optimizer="muon", dtype="bf16")
    opts = build_optimizers(model, tcfg, torch.device("cpu"))
    muon = next(o for o in opts if isinstance(o, Muon))
    stacked = muon._stacks
    run = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(stacks: object) -> None:
        muon._stacks = stacks  # type: ignore[method-assign]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(x, y)
        loss.backward()
        optimizer_step(opts, params, tcfg.grad_clip)

    return {"stacked": lambda: step(stacked), "one at a time": lambda: step(one_at_a_time)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096, depth=args.depth, max_position_embeddings=args.seq))
    print(f"# Muon step, depth {args.depth}; {machine()}")
    for dtype in (torch.bfloat16, torch.float32):
        t = timed_side_by_side(optimizer_rows(model, dtype), warmup=3, rounds=args.rounds)  # type: ignore[arg-type]
        print(f"optimizer step ({str(dtype).removeprefix('torch.')}): stacked {t['stacked'] * 1e3:.1f} ms, "
              f"one at a time {t['one at a time'] * 1e3:.1f} ms, ratio {t['one at a time'] / t['stacked']:.2f}x")
    t = timed_side_by_side(training_rows(model, args.batch, args.seq), warmup=3, rounds=args.rounds)  # type: ignore[arg-type]
    tokens = args.batch * args.seq
    print(f"compiled bf16 training step, batch {args.batch} x {args.seq}: stacked {tokens / t['stacked']:,.0f} "
          f"tokens/s, one at a time {tokens / t['one at a time']:,.0f} tokens/s, "
          f"ratio {t['one at a time'] / t['stacked']:.2f}x")


if __name__ == "__main__":
    main()
