"""Held-out bits-per-byte of every checkpoint a compress run wrote, on data of your choice, side by side.

python benchmarks/compress_bpb.py --run runs/compress/compress --teacher runs/tiny/pretrain \
    --data runs/tiny/tokens --max-tokens 20000

The compress report measures bpb on one held-out text file. This rescores the same folders (teacher, pruned,
distilled, scratch, int8, int4) on another set, e.g. the teacher's own validation shard, to tell a student that is
better on the report's texts from one that is better in general. Token shards must have been made with the
teacher's tokenizer (every folder of a compress run shares it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from danlu.eval.bpb import evaluate_bpb  # noqa: E402
from danlu.io import load_checkpoint  # noqa: E402

STEPS = ("pruned", "distilled", "scratch", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the compress output folder (holds pruned/, distilled/, …)")
    ap.add_argument("--teacher", required=True, help="the teacher's checkpoint folder")
    ap.add_argument("--data", required=True, help="text file (.jsonl/.txt/.parquet) or token shard folder")
    ap.add_argument("--split", default="val", help="shard split when --data is a token shard folder")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=20_000)
    args = ap.parse_args()

    folders = {"teacher": Path(args.teacher)}
    folders.update({s: Path(args.run) / s for s in STEPS if (Path(args.run) / s / "config.json").exists()})
    print(f"machine: {machine()}")
    print(
        f"data: {args.data} (split {args.split}), seq_len {args.seq_len}, up to {args.max_tokens:,} tokens\n"
    )
    print("| model | held-out bpb | 95% interval | tokens |\n|---|---:|---:|---:|")
    for name, folder in folders.items():
        ckpt = load_checkpoint(folder, quiet=True)
        ckpt.model.eval()
        res = evaluate_bpb(ckpt.model, ckpt.tokenizer, args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                           split=args.split)  # fmt: skip
        lo, hi = res["ci95"]
        interval = f"{lo:.4f}–{hi:.4f}"
        print(f"| {name} | {res['bpb']:.4f} | {interval} | {res['n']:,} |", flush=True)


if __name__ == "__main__":
    main()
