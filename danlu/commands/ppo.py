"""`danlu ppo`: PPO with a value head, GAE, clipped losses and a KL penalty, rewarded by a model or a function."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, add_rl_arguments, print_result, stage_config
from danlu.commands.grpo import PROMPTS_HELP, REWARD_HELP

HELP = (
    "PPO: RL with a value head, GAE, clipped losses and a KL penalty, rewarded by a reward model or function"
)
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_rl_arguments(p, PROMPTS_HELP)
    p.add_argument("--reward", required=True, help=REWARD_HELP)
    add_output_arguments(p, "ppo", "ppo.train.steps=50")


def run(args: argparse.Namespace) -> int:
    from danlu.stages.ppo import PPOConfig, train_ppo

    recipe, cfg = stage_config(args, "ppo", PPOConfig)
    result = train_ppo(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data,
        reward=args.reward,
    )  # fmt: skip
    print_result("ppo", result, args.out, f"Try it:  danlu chat {args.out}")
    return 0
