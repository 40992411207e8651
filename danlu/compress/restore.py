"""Restoring chat behaviour after distillation (`compress.restore`): SFT of the student on chat data.

Distillation on plain text teaches the student the teacher's next-token distributions, not its chat manners: a
student distilled from a chat model (or one that should become one) answers in the chat template only after
fine-tuning on dialogs. This step runs the SFT stage on the distilled student — and, when the run has one, on the
from-scratch control too, so that the control's chat figures are measured after the same fine-tuning — through
`danlu sft` in a child process (danlu.sft_process: a stage never imports another stage). Chat facts are then scored
by the run's one evaluator (danlu.eval.world, `facts_chat`) on the held-out split, beside the report's other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError


@dataclass
class RestoreConfig:
    """Recipe `compress.restore:`."""

    enabled: bool = False
    data: list[str] | None = None  # dialogs to fine-tune on; in a run: the world corpus' sft.jsonl
    tokens: str | None = None  # pretraining token shards for SFT's replay share; in a run: the run's tokens
    eval_data: str | None = None  # a world's held-out eval/ folder for chat facts; in a run: the run's world
    split: str = "test"  # held-out split the chat facts are reported on (no choice is tuned on it)
    limit: int = 200  # held-out chat-fact rows (0: the whole split)
    sft: dict[str, Any] = field(
        default_factory=dict
    )  # overrides of the recipe's sft section (epochs, train …)
    timeout: float = 7200.0  # seconds for each fine-tuning


def check_restore(cfg: RestoreConfig) -> list[Path]:
    """The dialog files, checked before any step runs (a missing file must not cost a distillation first)."""
    if not cfg.enabled:
        return []
    if not cfg.data:
        raise DanluError("compress.restore: no dialogs to fine-tune on (give compress.restore.data=FILE)")
    files = [Path(p) for p in cfg.data]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise DanluError(f"compress.restore.data: {', '.join(missing)}: no such file")
    if cfg.split not in ("dev", "test", "all"):
        raise DanluError(f"compress.restore.split={cfg.split!r}: expected dev, test or all")
    return files


def restore_chat(model_dir: Path, out: Path, cfg: RestoreConfig, recipe: dict[str, Any], log: Path) -> Path:
    """Fine-tunes the checkpoint in `model_dir` on the restore dialogs into `out` with the recipe's sft section
    (updated by `compress.restore.sft`), replaying pretraining text from `compress.restore.tokens` when given (without
    it, fine-tuning on dialogs alone costs much of the held-out text's bits-per-byte); without SFT's own held-out
    scoring, which this step does itself on the reported split. Returns `out`."""
    from danlu.config import deep_merge
    from danlu.files import write_json_atomic
    from danlu.sft_process import sft_in_child

    section = deep_merge(recipe.get("sft") or {}, cfg.sft)
    section = deep_merge(section, {"eval_limit": 0} if cfg.tokens else {"eval_limit": 0, "replay": 0.0})
    for key in ("data", "enabled"):
        section.pop(key, None)
    keep = ("seed", "device", "dtype", "compile", "train")
    sft_recipe = {k: v for k, v in recipe.items() if k in keep} | {"sft": section}
    recipe_file = out.parent / f"{out.name}_recipe.json"
    write_json_atomic(recipe_file, sft_recipe)
    extra = ["--tokens", cfg.tokens] if cfg.tokens else []
    sft_in_child(model_dir, check_restore(cfg), out, recipe_file, log, cfg.timeout, "compress.restore", extra)
    return out


def chat_facts(model: Any, tokenizer: Any, cfg: RestoreConfig) -> dict[str, Any]:
    """{chat_fact_accuracy, chat_fact_rows, chat_fact_split} of a chat model, by danlu.eval.world's `facts_chat`."""
    from danlu.eval.world import evaluate_quantities

    fig = evaluate_quantities(
        model, tokenizer, ["facts_chat"], data=cfg.eval_data, split=cfg.split, limit=cfg.limit
    )["facts_chat"]
    return {"chat_fact_accuracy": fig["value"], "chat_fact_rows": fig["n"], "chat_fact_split": cfg.split}
