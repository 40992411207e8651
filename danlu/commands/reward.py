"""`danlu reward`: train a reward model (backbone + scalar head, Bradley–Terry loss) on preference pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, add_rl_arguments, print_result, stage_config

HELP = "train a reward model (backbone + scalar head, Bradley–Terry loss) on preference pairs"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)
PAIRS_HELP = "preference pairs (prompt/chosen/rejected, LLaMA-Factory, TRL or HH-RLHF): file or folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_rl_arguments(p, PAIRS_HELP)
    add_output_arguments(p, "reward", "reward.train.steps=50")


def run(args: argparse.Namespace) -> int:
    from danlu.stages.reward import RewardConfig, train_reward

    recipe, cfg = stage_config(args, "reward", RewardConfig)
    result = train_reward(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data
    )
    print_result("reward", result, args.out)
    return 0
