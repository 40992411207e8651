"""`danlu compress --teacher CKPT --data TEXTS --out DIR compress.ratio=10`: subset, prune, distill, quantize.

Writes DIR/pruned, DIR/distilled, DIR/scratch (the same shape trained from scratch on the same tokens), DIR/int8,
DIR/int4 (each a checkpoint folder), DIR/distilled_sft and DIR/scratch_sft with compress.restore.enabled=true
compress.restore.data=DIALOGS (chat fine-tuning after distillation), DIR/gguf/ when compress.gguf lists quant types, and DIR/report.md with
parameters, bytes, held-out bits-per-byte, held-out facts and decode tokens/s after each step. Steps switch off with
compress.distill.enabled=false …; the options compress.factorize / compress.share switch on with enabled=true.
"""

from __future__ import annotations

import argparse

HELP = "compress a model: representative subset, Minitron pruning, distillation, int8/int4 quantization"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="checkpoint folder of the model to compress")
    p.add_argument(
        "--data", help="texts (.jsonl with a text field, .txt, .parquet) to calibrate and distill on"
    )
    p.add_argument("--eval-data", help="held-out texts for bits-per-byte")
    p.add_argument("--facts", help="held-out factual completions ({prompt, answer, lang} JSONL) for accuracy")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", default="compress", help="recipe whose train/compress sections to use")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. compress.ratio=10 "
                   "compress.shape.hidden_size=128 compress.distill.train.steps=200")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from danlu.commands._training import main_rank
    from danlu.compress.pipeline import CompressConfig, run_compress
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.pipeline import stage_section
    from danlu.stages.common import train_config

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = stage_section(recipe, "compress")
    for key, value in (("teacher", args.teacher), ("data", args.data), ("eval_data", args.eval_data),
                       ("facts", args.facts)):  # fmt: skip
        if value:
            section[key] = value
    cfg = from_dict(CompressConfig, section, "compress")
    tcfg = train_config(recipe, {**cfg.train, **cfg.distill.train}, "compress")
    result = run_compress(args.teacher, Path(args.out), cfg, tcfg, recipe)
    if not main_rank():  # under torchrun the report is rank 0's
        return 0
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}")
    return 0 if result.get("rows") else 1
