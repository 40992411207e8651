"""Pretrains a model on token shards (from `danlu data tokenize`) with the danlu engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, print_result, stage_config

HELP = "pretrain a Llama-compatible model on token shards (torchrun for several processes/GPUs)"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="token shard folder (danlu data tokenize)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder the shards were made with")
    add_output_arguments(p, "pretrain", "model.depth=6 pretrain.train.steps=500")


def run(args: argparse.Namespace) -> int:
    from danlu.stages.pretrain import PretrainConfig, pretrain

    recipe, cfg = stage_config(args, "pretrain", PretrainConfig)
    result = pretrain(Path(args.data), Path(args.tokenizer), Path(args.out), recipe=recipe, cfg=cfg)
    print_result("pretrain", result, args.out, f'Try it:  danlu generate {args.out} "中国最高的山是"')
    return 0
