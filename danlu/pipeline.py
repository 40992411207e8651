"""What the runner, the stages and the run report share: the stage order and the context a stage sees.

It sits below all three, so that the import arrows point one way: `danlu.runner` runs stages (it imports them),
a stage imports this module (never the runner), and `danlu.eval.report` reads a run folder with the stage order from
here. Before, the report imported the runner and the eval stage, and the eval stage imported the runner.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from danlu import DanluError

# Order matters: a stage may read the output of any stage before it.
STAGES: list[str] = [
    "world", "data", "tokenizer", "tokens", "pretrain", "sft", "reward", "dpo", "ppo", "grpo",
    "eval", "detect", "export", "compress", "synth",
]  # fmt: skip
GLOBAL_KEYS = ("seed", "device", "dtype", "compile", "train", "model", "extends")
MODEL_STAGES = ["pretrain", "sft", "reward", "dpo", "ppo", "grpo"]  # stages whose folder is a model
CHAT_STAGES = ["sft", "dpo", "ppo", "grpo"]  # model stages that write a chat model (reward writes a scorer)
# Under torchrun every rank runs these, each on its own rows of every global batch (what is not training inside
# them, rank 0 does alone); rank 0 runs the other stages alone (the corpus, data, tokenizer, evaluation, export,
# synthesis) while the rest wait.
DISTRIBUTED_STAGES = ["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "detect", "compress"]


@dataclasses.dataclass
class StageContext:
    """What a stage sees: its own section, the whole recipe, and where to read and write."""

    name: str
    run_dir: Path
    cfg: dict[str, Any]
    recipe: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.run_dir / self.name

    def has(self, stage: str) -> bool:
        return (self.run_dir / stage / "stage.json").exists()

    def input(self, stage: str) -> Path:
        """The output folder of an earlier stage; a clear error if that stage has not finished."""
        if not self.has(stage):
            raise DanluError(
                f"stage {self.name!r} needs the output of stage {stage!r}, which has not finished in {self.run_dir}"
            )
        return self.run_dir / stage

    def metrics_of(self, stage: str) -> dict[str, Any]:
        path = self.run_dir / stage / "stage.json"
        return json.loads(path.read_text())["metrics"] if path.exists() else {}


def stage_enabled(recipe: dict[str, Any], name: str) -> bool:
    """A stage runs when the recipe has its section and the section does not say `enabled: false`."""
    section = recipe.get(name)
    return name in recipe and not (isinstance(section, dict) and section.get("enabled") is False)


def stage_section(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of the stage's recipe section as its config reads it: without the runner's `enabled` switch."""
    section = dict(recipe.get(name) or {})
    section.pop("enabled", None)
    return section


def heldout_limit(recipe: dict[str, Any], own: int) -> int | None:
    """Rows per held-out set a training stage scores its checkpoint on (for danlu.eval.world's `limit`): None for
    none (`own` 0), 0 for the whole split (`own` -1), else `own` rows — but in a run whose eval stage will score the
    checkpoint too, that stage's limit, so that each figure is computed once, on the rows the eval table shows."""
    if own == 0:
        return None
    if stage_enabled(recipe, "eval"):
        return max(0, int((recipe.get("eval") or {}).get("limit", 0) or 0))
    return max(0, own)
