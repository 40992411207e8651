"""Training tokens/s: danlu's step vs transformers' LlamaForCausalLM (fp32 eager, plain AdamW), side by side.

The baseline is what MiniMind and most tutorials do: the HF model in fp32, eager, torch.optim.AdamW.
Ours is the engine's step: bf16 autocast where the device has it, fused AdamW, optional torch.compile.

    python benchmarks/train_throughput.py                      # the tiny default shape (depth 4, seq 256, batch 16)
    python benchmarks/train_throughput.py --depth 12 --seq 1024 --batch 8 --device cuda   # ~125M on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hf_twin, machine, timed  # noqa: E402

from danlu.engine import TrainConfig, build_optimizers, peak_flops, resolve_dtype  # noqa: E402
from danlu.model import ModelConfig, Transformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, depth=args.depth, max_position_embeddings=args.seq)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq

    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    dtype = resolve_dtype(args.dtype, device)
    opt = build_optimizers(ours, TrainConfig(), device)[0]
    model = torch.compile(ours) if args.compile else ours

    def our_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_ours = timed(our_step, args.warmup, args.steps, sync)
    ours_tps = tokens / t_ours
    mfu = ours_tps * cfg.flops_per_token(args.seq) / peak_flops(device, dtype)

    print(f"machine: {machine()}")
    print(f"config: depth {args.depth} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, device {device}")  # fmt: skip
    print(f"danlu        ({str(dtype).removeprefix('torch.')}{', compiled' if args.compile else ''}, fused AdamW): "
          f"{ours_tps:>10,.0f} tokens/s  MFU {100 * mfu:.1f}%")  # fmt: skip
    ours = model = opt = None  # free memory before the baseline  # noqa: F841
    if args.skip_baseline:
        return

    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_twin(cfg)).to(device)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)

    def hf_step() -> None:
        loss = hf(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    hf_tps = tokens / timed(hf_step, args.warmup, args.steps, sync)
    print(f"transformers (fp32 eager, AdamW):  {hf_tps:>10,.0f} tokens/s")
    print(f"ratio: {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
