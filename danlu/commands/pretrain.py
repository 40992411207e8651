"""Pretrains a model on token shards (from `danlu data tokenize`) with the danlu engine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "pretrain a Llama-compatible model on token shards (torchrun for several processes/GPUs)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="token shard folder (danlu data tokenize)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder the shards were made with")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", default="tiny", help="recipe whose model/train/pretrain sections to use")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=6 pretrain.train.steps=500")


def run(args: argparse.Namespace) -> int:
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.stages.pretrain import PretrainConfig, pretrain

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = dict(recipe.get("pretrain") or {})
    section.pop("enabled", None)
    if args.resume:
        section["resume"] = "true"
    cfg = from_dict(PretrainConfig, section, "pretrain")
    result = pretrain(Path(args.data), Path(args.tokenizer), Path(args.out), recipe=recipe, cfg=cfg)
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    if os.environ.get("RANK", "0") == "0":
        print(f"[danlu] pretrain: {shown}\nwrote {args.out}")
    return 0
