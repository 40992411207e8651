"""`danlu ppo`: PPO: RL with a value head, GAE, clipped losses and a KL penalty, rewarded by a reward model or function."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "PPO: RL with a value head, GAE, clipped losses and a KL penalty, rewarded by a reward model or function"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="parent", required=True, help="SFT checkpoint folder to start from")
    p.add_argument("--data", required=True, help="RL prompts (messages + answer): file or folder")
    p.add_argument("--eval-data", default=None, help="held-out file for the before/after numbers")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument(
        "--reward",
        required=True,
        help="reward model folder (danlu reward) or function: world, arithmetic, gsm8k, exact, contains",
    )
    p.add_argument("--recipe", default="tiny", help="recipe whose train/ppo sections to use")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.train.steps=50")


def run(args: argparse.Namespace) -> int:
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.stages.ppo import PPOConfig, train_ppo

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = dict(recipe.get("ppo") or {})
    section.pop("enabled", None)
    section["resume"] = "true" if args.resume else "false"
    cfg = from_dict(PPOConfig, section, "ppo")
    result = train_ppo(
        Path(args.parent),
        args.data,
        Path(args.out),
        recipe=recipe,
        cfg=cfg,
        eval_data=args.eval_data,
        reward=args.reward,
    )
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(f"[danlu] ppo: {shown}\nwrote {args.out}")
    return 0
