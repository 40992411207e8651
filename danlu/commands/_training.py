"""What the training commands share (`pretrain`, `sft`, `reward`, `dpo`, `ppo`, `grpo`): the output, recipe,
resume and override arguments, reading the stage's recipe section, and printing the result on rank 0 only."""

from __future__ import annotations

import argparse
import os
from typing import Any, TypeVar

T = TypeVar("T")
PEFT_STAGES = (
    "sft",
    "reward",
    "dpo",
    "ppo",
    "grpo",
)  # stages whose config has a `peft:` section (danlu.adapters.PeftSpec)


def add_output_arguments(p: argparse.ArgumentParser, stage: str, example: str) -> None:
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument(
        "--recipe", default="tiny", help=f"recipe whose train/{stage} sections to use (default: tiny)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    if stage in PEFT_STAGES:
        from danlu.adapters.spec import METHODS

        p.add_argument("--peft", choices=METHODS, metavar="METHOD",
                       help=f"train an adapter instead of every weight ({', '.join(METHODS)}); shorthand for "
                       f"{stage}.peft.method=METHOD, other settings as {stage}.peft.r=16 …")  # fmt: skip
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def add_rl_arguments(p: argparse.ArgumentParser, data_help: str) -> None:
    """--from, --data and --eval-data of the preference and RL commands."""
    p.add_argument("--from", dest="parent", required=True, help="SFT checkpoint folder to start from")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--eval-data", default=None, help="held-out file for the before/after numbers")


def stage_config(
    args: argparse.Namespace, stage: str, cls: type[T], **section_updates: Any
) -> tuple[dict, T]:
    """The recipe (with overrides) and the stage's config dataclass built from its section."""
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.pipeline import stage_section

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = stage_section(recipe, stage)
    section["resume"] = "true" if args.resume else section.get("resume", "auto")
    if getattr(args, "peft", None):
        section["peft"] = {**(section.get("peft") or {}), "method": args.peft}
    section.update(section_updates)
    return recipe, from_dict(cls, section, stage)


def main_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints a command's report."""
    return os.environ.get("RANK", "0") == "0"


def print_result(stage: str, result: dict[str, Any], out: str, hint: str = "") -> None:
    if not main_rank():
        return
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(f"[danlu] {stage}: {shown}\nwrote {out}" + (f"\n{hint}" if hint else ""))
