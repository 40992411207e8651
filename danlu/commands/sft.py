"""Fine-tunes a checkpoint on conversations: `danlu sft --from CKPT --data FILE… --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from danlu.commands._training import add_output_arguments, print_result, stage_config

HELP = "supervised fine-tuning on dialogs (OpenAI messages, ShareGPT, Alpaca; JSONL/JSON) into a chat model"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="parent", required=True, metavar="CKPT", help="checkpoint folder to fine-tune"
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="conversation files or folders")
    p.add_argument("--tokens", help="token shard folder: pretraining replay and bits-per-byte before/after")
    p.add_argument("--eval", dest="eval_dir", help="folder of held-out chat evals (a world corpus' eval/)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip bad conversations (counted) instead of stopping"
    )
    p.add_argument(
        "--columns", metavar="MAP", help="field mapping for other datasets, as LLaMA-Factory's dataset_info: "
        "prompt=question,response=answer (also query, system, history, messages, role_tag, content_tag, "
        "user_tag, assistant_tag; dotted names for nested fields); default: a dataset_info.yaml beside the data",
    )  # fmt: skip
    p.add_argument(
        "--encoding",
        help="text encoding of the data files (default: detected: UTF-8, UTF-16 with BOM, GB18030)",
    )
    p.add_argument(
        "--long-dialogs", choices=("truncate", "split", "skip", "error"),
        help="dialogs longer than a row: keep the system prompt and last turns (truncate, default), cut into "
        "several rows with recent history (split), drop (skip), or stop (error)",
    )  # fmt: skip
    add_output_arguments(p, "sft", "sft.train.steps=300 sft.replay=0")


def run(args: argparse.Namespace) -> int:
    from danlu.files import expand_inputs
    from danlu.stages.sft import SFTConfig, sft

    updates: dict = {"data": None}
    if args.skip_bad:
        updates["on_error"] = "skip"
    if not args.tokens:
        updates["replay"] = 0.0
    for key in ("columns", "encoding", "long_dialogs"):
        if getattr(args, key):
            updates[key] = getattr(args, key)
    recipe, cfg = stage_config(args, "sft", SFTConfig, **updates)
    data = expand_inputs(args.data, suffixes=(".jsonl", ".json", ".parquet", ".csv", ".tsv"))
    result = sft(
        Path(args.parent), data, Path(args.out), recipe=recipe, cfg=cfg,
        tokens_dir=Path(args.tokens) if args.tokens else None, eval_dir=Path(args.eval_dir) if args.eval_dir else None,
    )  # fmt: skip
    print_result("sft", result, args.out, f"Try it:  danlu chat {args.out}")
    return 0
