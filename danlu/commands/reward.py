"""`danlu reward`: train a reward model (backbone + scalar head, Bradley–Terry loss) on preference pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a reward model (backbone + scalar head, Bradley–Terry loss) on preference pairs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="parent", required=True, help="SFT checkpoint folder to start from")
    p.add_argument(
        "--data",
        required=True,
        help="preference pairs (prompt/chosen/rejected, LLaMA-Factory, TRL or HH-RLHF): file or folder",
    )
    p.add_argument("--eval-data", default=None, help="held-out file for the before/after numbers")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", default="tiny", help="recipe whose train/reward sections to use")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reward.train.steps=50")


def run(args: argparse.Namespace) -> int:
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.stages.reward import RewardConfig, train_reward

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = dict(recipe.get("reward") or {})
    section.pop("enabled", None)
    section["resume"] = "true" if args.resume else "false"
    cfg = from_dict(RewardConfig, section, "reward")
    result = train_reward(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data
    )
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(f"[danlu] reward: {shown}\nwrote {args.out}")
    return 0
