"""Pipeline stage `world`: generates the built-in bilingual world corpus into `DIR/world/`.

Every later stage of the default pipeline reads from it (tokenizer and pretraining text, SFT dialogs, preference
pairs, RL prompts, held-out evals), so `danlu run` needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu.config import from_dict
from danlu.pipeline import StageContext


@dataclass
class WorldConfig:
    seed: int | None = None  # default: the recipe's top-level seed, else 0
    scale: float = 1.0  # multiplies the number of documents and dialogs (1.0 ≈ 8 MB of pretraining text)


def read_config(section: dict[str, Any]) -> WorldConfig:
    return from_dict(WorldConfig, section, "world")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.world import build_world, flat_metrics, format_stats

    cfg = read_config(ctx.cfg)
    seed = cfg.seed if cfg.seed is not None else ctx.recipe.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        from danlu import DanluError

        raise DanluError(f"recipe: seed must be an integer, got {seed!r}")
    stats = build_world(ctx.out, seed=seed, scale=cfg.scale)
    print(format_stats(stats, ctx.out))
    return flat_metrics(stats)
