"""`danlu dpo`: DPO: train a chat model on preference pairs against a frozen reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, add_rl_arguments, print_result, stage_config
from danlu.commands.reward import PAIRS_HELP

HELP = "DPO: train a chat model on preference pairs against a frozen reference"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_rl_arguments(p, PAIRS_HELP)
    add_output_arguments(p, "dpo", "dpo.train.steps=50 dpo.beta=0.2")


def run(args: argparse.Namespace) -> int:
    from danlu.stages.dpo import DPOConfig, train_dpo

    recipe, cfg = stage_config(args, "dpo", DPOConfig)
    result = train_dpo(
        Path(args.parent), args.data, Path(args.out), recipe=recipe, cfg=cfg, eval_data=args.eval_data
    )
    print_result("dpo", result, args.out, f"Try it:  danlu chat {args.out}")
    return 0
