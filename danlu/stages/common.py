"""What every training stage shares: its engine settings from the recipe, the parent checkpoint, the save hook.

A recipe's top-level `train:` section holds engine defaults for all stages; a stage's own `train:` overrides them;
top-level `seed`, `device`, `dtype` and `compile` apply everywhere. So `danlu run tiny device=cuda` moves every stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import deep_merge, from_dict
from danlu.engine import TrainConfig
from danlu.io import save_model_dir
from danlu.model import ModelConfig

GLOBAL_ENGINE_KEYS = ("seed", "device", "dtype", "compile")


def train_config(recipe: dict[str, Any], stage_train: dict[str, Any] | None, where: str) -> TrainConfig:
    merged = deep_merge(recipe.get("train") or {}, stage_train or {})
    for key in GLOBAL_ENGINE_KEYS:
        if key in recipe and key not in (stage_train or {}):
            merged[key] = recipe[key]
    return from_dict(TrainConfig, merged, f"{where}.train")


def make_saver(model_cfg: ModelConfig, tokenizer: Any, meta: dict[str, Any], *, chat: bool) -> Any:
    """The engine's save hook: writes the HF-format model folder with danlu.json describing the stage."""

    def save(state_dict: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        save_model_dir(folder, state_dict, model_cfg, tokenizer, {**meta, **step_meta}, chat=chat)

    return save


def resume_wanted(out: Path, mode: str | bool, train_cfg: TrainConfig, stage: str) -> bool:
    """`resume: auto` continues an unfinished run of the same stage with the same settings; true insists on it."""
    state_path = out / "trainer_state" / "state.json"
    if mode is True or mode == "true":
        return True
    if mode in (False, "false", "off") or not state_path.exists():
        return False
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        return False
    same = state.get("config") == {**train_cfg.__dict__} and state.get("stage") == stage
    return same and not state.get("finished")


def parent_checkpoint(path: str | Path, device: str = "cpu") -> Any:
    from danlu.io import load_checkpoint

    if not Path(path).exists():
        raise DanluError(f"--from {path}: no such checkpoint folder")
    return load_checkpoint(path, device=device)


def rl_stage_inputs(ctx: Any, cfg: Any, data_name: str, eval_name: str) -> tuple[Path, str, str | None]:
    """Parent checkpoint, training data and held-out data of a reward/DPO/PPO/GRPO stage in a run: the section's
    `model`, `data` and `eval_data` when given, else the run's SFT checkpoint and the world corpus' files."""

    def world_file(name: str) -> str | None:
        path = ctx.run_dir / "world" / name
        return str(path) if ctx.has("world") and path.exists() else None

    data = cfg.data or world_file(data_name)
    if data is None:
        raise DanluError(f"{ctx.name}: no `data:` given and no world corpus in this run")
    parent = Path(cfg.model) if cfg.model else ctx.input("sft")
    return parent, data, cfg.eval_data or world_file(eval_name)
