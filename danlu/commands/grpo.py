"""`danlu grpo`: GRPO: RL with groups of samples per prompt and answer-checking rewards."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, add_rl_arguments, print_result, stage_config

HELP = "GRPO: RL with groups of samples per prompt and answer-checking rewards"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)
PROMPTS_HELP = "RL prompts (messages + answer): file or folder"
REWARD_HELP = "reward function (world, arithmetic, gsm8k, exact, contains) or reward model folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_rl_arguments(p, PROMPTS_HELP)
    p.add_argument("--reward", default=None, help=REWARD_HELP)
    add_output_arguments(p, "grpo", "grpo.train.steps=50 grpo.group_size=8")


def run(args: argparse.Namespace) -> int:
    from danlu.stages.grpo import GRPOConfig, train_grpo

    updates = {"reward": args.reward} if args.reward else {}
    recipe, cfg = stage_config(args, "grpo", GRPOConfig, **updates)
    result = train_grpo(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data
    )
    print_result("grpo", result, args.out, f"Try it:  danlu chat {args.out}")
    return 0
