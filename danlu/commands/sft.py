"""Fine-tunes a checkpoint on conversations: `danlu sft --from CKPT --data FILE… --out DIR`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "supervised fine-tuning on dialogs (OpenAI messages, ShareGPT, Alpaca; JSONL/JSON) into a chat model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="parent", required=True, metavar="CKPT", help="checkpoint folder to fine-tune"
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="conversation files or folders")
    p.add_argument("--out", required=True, help="chat checkpoint folder to write")
    p.add_argument("--recipe", default="tiny", help="recipe whose train/sft sections to use (default: tiny)")
    p.add_argument("--tokens", help="token shard folder: pretraining replay and bits-per-byte before/after")
    p.add_argument("--eval", dest="eval_dir", help="folder of held-out chat evals (a world corpus' eval/)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip bad conversations (counted) instead of stopping"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.train.steps=300 sft.replay=0")


def run(args: argparse.Namespace) -> int:
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.files import expand_inputs
    from danlu.stages.sft import SFTConfig, sft

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = dict(recipe.get("sft") or {})
    section.pop("enabled", None)
    section.pop("data", None)
    if args.resume:
        section["resume"] = "true"
    if args.skip_bad:
        section["on_error"] = "skip"
    if not args.tokens:
        section["replay"] = 0.0
    cfg = from_dict(SFTConfig, section, "sft")
    data = expand_inputs(args.data, suffixes=(".jsonl", ".json", ".parquet"))
    result = sft(
        Path(args.parent), data, Path(args.out), recipe=recipe, cfg=cfg,
        tokens_dir=Path(args.tokens) if args.tokens else None, eval_dir=Path(args.eval_dir) if args.eval_dir else None,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        shown = {k: v for k, v in result.items() if not isinstance(v, list)}
        print(f"[danlu] sft: {shown}\nwrote {args.out}\nTry it:  danlu chat {args.out}")
    return 0
