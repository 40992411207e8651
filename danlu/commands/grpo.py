"""`danlu grpo`: GRPO: RL with groups of samples per prompt and answer-checking rewards."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "GRPO: RL with groups of samples per prompt and answer-checking rewards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="parent", required=True, help="SFT checkpoint folder to start from")
    p.add_argument("--data", required=True, help="RL prompts (messages + answer): file or folder")
    p.add_argument("--eval-data", default=None, help="held-out file for the before/after numbers")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument(
        "--reward",
        default=None,
        help="reward function (world, arithmetic, gsm8k, exact, contains) or reward model folder",
    )
    p.add_argument("--recipe", default="tiny", help="recipe whose train/grpo sections to use")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.train.steps=50")


def run(args: argparse.Namespace) -> int:
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.stages.grpo import GRPOConfig, train_grpo

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = dict(recipe.get("grpo") or {})
    section.pop("enabled", None)
    section["resume"] = "true" if args.resume else "false"
    if args.reward:
        section["reward"] = args.reward
    cfg = from_dict(GRPOConfig, section, "grpo")
    result = train_grpo(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data
    )
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(f"[danlu] grpo: {shown}\nwrote {args.out}")
    return 0
