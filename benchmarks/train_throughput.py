"""Training tokens/s: danlu's step vs transformers' LlamaForCausalLM at the same precision and compile setting.

The fair comparison comes first: both models in the precision the engine picks for this device (bf16 autocast on
CPUs with AVX-512 BF16 or AMX and on GPUs, fp32 elsewhere) and both under torch.compile, then both eager. The last
row is what MiniMind's CPU path and most tutorials do, the HF model in fp32 eager with torch.optim.AdamW, kept for
reference. All rows of a shape run interleaved step by step (medians), so a load spike on a shared machine hits
every row alike.

    python benchmarks/train_throughput.py                       # tiny (depth 4, seq 256, batch 16), then depth 12
    python benchmarks/train_throughput.py --shape tiny          # a short run
    python benchmarks/train_throughput.py --shape d12 --rounds 3 --no-eager
    python benchmarks/train_throughput.py --shape d12 --batch 8 --device cuda
    python benchmarks/train_throughput.py --loss-curve 300      # bf16 compiled vs fp32 eager (and a 2nd seed of it)
    python benchmarks/train_throughput.py --loss-curve 300 --curves danlu,hf --compile   # same start, same data
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hf_twin, machine, timed_side_by_side  # noqa: E402

from danlu.engine import TrainConfig, build_optimizers, optimizer_step, resolve_dtype  # noqa: E402
from danlu.losses_fused import plain_linear_cross_entropy  # noqa: E402
from danlu.model import ModelConfig, Transformer  # noqa: E402

# The tiny default recipe's shape, and depth 12 (~81M parameters with this vocabulary) at a 1024-token context.
SHAPES = {"tiny": {"depth": 4, "seq": 256, "batch": 16}, "d12": {"depth": 12, "seq": 1024, "batch": 2}}


@dataclass
class Row:
    label: str
    step: Callable[[], None]


def danlu_row(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, compiled: bool) -> Row:
    """The engine's step: its optimizers (fused AdamW), autocast, clipping and optimizer step, optional compile."""
    torch.manual_seed(0)
    device = x.device
    model = Transformer(cfg).to(device)
    tcfg = TrainConfig()
    opts = build_optimizers(model, tcfg, device)
    run = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = run(x, y)
        loss.backward()
        optimizer_step(opts, params, tcfg.grad_clip)

    return Row(f"danlu        {_setting(dtype, compiled)} fused AdamW", step)


def hf_row(
    cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, compiled: bool, fused: bool
) -> Row:
    """transformers' model as its users train it: autocast (where bf16) and torch.compile are the two lines they add."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_twin(cfg)).to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    run = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = run(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Row(f"transformers {_setting(dtype, compiled)} {'fused ' if fused else ''}AdamW", step)


def _setting(dtype: torch.dtype, compiled: bool) -> str:
    return f"({str(dtype).removeprefix('torch.')} {'compiled' if compiled else 'eager'})"


def run_shape(name: str, args: argparse.Namespace, device: torch.device) -> None:
    shape = {**SHAPES[name], **{k: v for k in ("batch", "seq") if (v := getattr(args, k)) is not None}}
    cfg = ModelConfig(vocab_size=args.vocab, depth=shape["depth"], max_position_embeddings=shape["seq"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (shape["batch"], shape["seq"]), generator=gen).to(device)
    y = torch.randint(0, args.vocab, (shape["batch"], shape["seq"]), generator=gen).to(device)
    dtype = resolve_dtype(args.dtype, device)

    rows = {
        "ours_compiled": danlu_row(cfg, x, y, dtype, True),
        "hf_compiled": hf_row(cfg, x, y, dtype, True, fused=True),
    }
    if not args.no_eager:
        rows["ours_eager"] = danlu_row(cfg, x, y, dtype, False)
        rows["hf_eager"] = hf_row(cfg, x, y, dtype, False, fused=True)
    rows["hf_fp32_eager"] = hf_row(cfg, x, y, torch.float32, False, fused=False)  # the tutorial path
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = timed_side_by_side({k: r.step for k, r in rows.items()}, args.warmup, args.rounds, sync)
    tokens = shape["batch"] * shape["seq"]
    tps = {k: tokens / s for k, s in seconds.items()}

    print(f"\n== {name}: depth {shape['depth']} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), "
          f"vocab {args.vocab}, seq {shape['seq']}, batch {shape['batch']}, {device}; "
          f"medians of {args.rounds} interleaved rounds after {args.warmup} warmup steps")  # fmt: skip
    for k, row in rows.items():
        print(f"  {row.label:<48} {tps[k]:>10,.0f} tokens/s")
    print(f"  ratio, same precision, compiled:  {tps['ours_compiled'] / tps['hf_compiled']:.2f}x")
    if not args.no_eager:
        print(f"  ratio, same precision, eager:     {tps['ours_eager'] / tps['hf_eager']:.2f}x")
    print(f"  ratio vs HF fp32 eager (reference): {tps['ours_compiled'] / tps['hf_fp32_eager']:.2f}x")


class _PlainLoss(Transformer):
    """The model as it was before the chunked loss: whole fp32 logits, then cross-entropy."""

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return plain_linear_cross_entropy(self.hidden_states(input_ids), self.lm_head.weight, targets)


def markov_batches(
    vocab: int, batch: int, seq: int, seed: int = 0
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Rows from a fixed random Markov chain (8 successors per token, Zipf-weighted): learnable, so a loss curve
    shows optimization, and its entropy (~1.8 nats) is the floor the loss approaches."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 8), generator=gen)
    probs = 1.0 / torch.arange(1, 9, dtype=torch.float32)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty(batch, seq + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(seq):
            pick = torch.multinomial(probs.expand(batch, 8), 1, generator=gen).squeeze(1)
            rows[:, t + 1] = succ[rows[:, t], pick]
        return rows[:, :-1], rows[:, 1:]

    return draw


class _HFLoss(torch.nn.Module):
    """transformers' LlamaForCausalLM behind danlu's `model(input_ids, targets) -> loss` call, starting from the
    weights of a danlu model (the parameter names are the same), so a curve against it differs only in the code."""

    def __init__(self, cfg: ModelConfig, start: Transformer) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.hf = LlamaForCausalLM(hf_twin(cfg))
        self.hf.load_state_dict(start.state_dict())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=input_ids).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


CURVES = ("danlu", "plain", "hf")  # the chunked loss (the model as trained), whole-logits loss, transformers


@dataclass
class Curve:
    """One run of a loss-curve comparison: which model code, in what precision, compiled or not, from which init."""

    model: str
    dtype: torch.dtype
    compiled: bool
    seed: int

    @property
    def label(self) -> str:
        """The run spelled out in full (what a short spec left to the defaults included)."""
        dtype = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        seed = f":seed{self.seed}" if self.seed else ""
        return f"{self.model}:{dtype}:{'compiled' if self.compiled else 'eager'}{seed}"


def parse_curve(spec: str, default_dtype: torch.dtype, default_compiled: bool) -> Curve:
    """`model[:bf16|fp32][:compiled|eager][:seedN]`, e.g. `danlu:bf16:compiled` (the engine's fast path) or
    `danlu:fp32:eager` (the plain step it must match); left-out parts come from --dtype and --compile."""
    name, *parts = spec.split(":")
    if name not in CURVES:
        raise SystemExit(f"--curves: unknown model {name!r} in {spec!r} (choose from {', '.join(CURVES)})")
    dtype, compiled, seed = default_dtype, default_compiled, 0
    for part in parts:
        if part in ("bf16", "fp32"):
            dtype = torch.bfloat16 if part == "bf16" else torch.float32
        elif part in ("compiled", "eager"):
            compiled = part == "compiled"
        elif part.startswith("seed") and part[4:].isdigit():
            seed = int(part[4:])
        else:
            raise SystemExit(f"--curves: {part!r} in {spec!r} is none of bf16, fp32, compiled, eager, seedN")
    return Curve(name, dtype, compiled, seed)


def trailing_means(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each step (fewer at the start): the smoothed curve that is compared,
    since single-batch losses jump by more than any difference between the code paths."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curve(args: argparse.Namespace, device: torch.device) -> None:
    """Trains the runs named by --curves from the same initial weights (unless a run names another seed) on the
    same batches, step by step (the engine's optimizer, schedule and clipping), prints their losses every --every
    steps and the largest gap between each run's smoothed curve and the first run's. danlu vs plain isolates the
    chunked loss, danlu vs hf the rest of the model code, bf16 compiled vs fp32 eager the fast path as a whole, and
    a second seed of the reference the size of a difference that is only noise."""
    from danlu.engine import lr_factor

    shape = {**SHAPES["tiny"], **{k: v for k in ("batch", "seq") if (v := getattr(args, k)) is not None}}
    cfg = ModelConfig(vocab_size=args.vocab, depth=shape["depth"], max_position_embeddings=shape["seq"])
    tcfg = TrainConfig(steps=args.loss_curve, warmup_steps=20)
    default_dtype = resolve_dtype(args.dtype, device)
    window = min(args.smooth, tcfg.steps)
    curves = [parse_curve(s.strip(), default_dtype, args.compile) for s in args.curves.split(",")]
    runs = []
    for c in curves:
        torch.manual_seed(c.seed)
        start = Transformer(cfg)
        if c.model == "hf":
            model: torch.nn.Module = _HFLoss(cfg, start)
        elif c.model == "plain":
            model = _PlainLoss(cfg)
            model.load_state_dict(start.state_dict())
        else:
            model = start
        model.to(device)
        run = torch.compile(model) if c.compiled else model
        runs.append((c, run, build_optimizers(model, tcfg, device), list(model.parameters()), []))
    draw = markov_batches(args.vocab, shape["batch"], shape["seq"])
    width = max(12, *(len(c.label) for c in curves))
    print(f"loss curve: depth {shape['depth']}, batch {shape['batch']} x {shape['seq']}, lr {tcfg.lr} cosine, "
          f"{tcfg.steps} steps, same batches; each column: loss at the step (mean of the last {window})")  # fmt: skip
    print("  step " + "".join(f"  {c.label:>{width + 10}}" for c in curves), flush=True)
    for step in range(tcfg.steps):
        x, y = (t.to(device) for t in draw())
        for c, run, opts, params, losses in runs:
            for opt in opts:
                for group in opt.param_groups:
                    group.setdefault("base_lr", group["lr"])
                    group["lr"] = group["base_lr"] * lr_factor(step, tcfg)
            with torch.autocast(device.type, dtype=c.dtype, enabled=c.dtype != torch.float32):
                loss = run(x, y)
            loss.backward()
            optimizer_step(opts, params, tcfg.grad_clip)
            losses.append(loss.item())
        if (step + 1) % args.every == 0 or step + 1 == tcfg.steps:
            cells = []
            for *_, losses in runs:
                smooth = trailing_means(losses, window)[-1]
                cells.append(f"  {losses[-1]:>{width + 1}.4f} ({smooth:.4f})")
            print(f"  {step + 1:>4} " + "".join(cells), flush=True)
    first = trailing_means(runs[0][4], window)
    print(f"largest |difference| of the smoothed curves (trailing means of {window}) from {curves[0].label}, "
          f"steps {window}-{tcfg.steps}:")  # fmt: skip
    for c, *_, losses in runs[1:]:
        gaps = [abs(a - b) for a, b in zip(trailing_means(losses, window), first)][window - 1 :]
        at = max(range(len(gaps)), key=gaps.__getitem__)
        final = abs(losses[-1] - runs[0][4][-1])
        print(f"  {c.label:<{width}} {gaps[at]:.4f} (at step {at + window}); last step's raw gap {final:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["tiny", "d12"])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    ap.add_argument("--batch", type=int, default=None, help="override the shape's batch")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--warmup", type=int, default=2, help="steps per row before timing (compiles happen here)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--no-eager", action="store_true", help="skip the same-precision eager pair")
    ap.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                    help="instead of timing: train the --curves models side by side for STEPS steps")  # fmt: skip
    ap.add_argument("--curves", default="danlu:compiled,danlu:fp32:eager,danlu:fp32:eager:seed1",
                    help=f"--loss-curve runs: model[:bf16|fp32][:compiled|eager][:seedN], model from "
                         f"{', '.join(CURVES)}; the first is the one the others are compared with")  # fmt: skip
    ap.add_argument(
        "--compile", action="store_true", help="--loss-curve: runs that name no mode are compiled"
    )
    ap.add_argument("--every", type=int, default=25, help="--loss-curve: print every this many steps")
    ap.add_argument(
        "--smooth", type=int, default=25, help="--loss-curve: trailing-mean window of the comparison"
    )
    args = ap.parse_args()
    if min(args.every, args.smooth) < 1:
        raise SystemExit("--every and --smooth must be at least 1")
    device = torch.device(args.device)
    print(f"machine: {machine()}")
    if args.loss_curve:
        loss_curve(args, device)
        return
    print(f"precision: {str(resolve_dtype(args.dtype, device)).removeprefix('torch.')} "
          f"(--dtype {args.dtype}; bf16 where the CPU has AVX-512 BF16 or AMX, or on a GPU)")  # fmt: skip
    for name in args.shape:
        run_shape(name, args, device)


if __name__ == "__main__":
    main()
