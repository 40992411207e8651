"""Stage `data`: the data pipeline (danlu.data.pipeline) inside `danlu run`.

Without `inputs`, the stage cleans, filters and deduplicates the world corpus (`world/pretrain.jsonl`), so the
default run exercises the same pipeline real dumps go through; its output `data/text/<domain>/*.jsonl` is
what the tokenizer and token-shard stages read.
"""

from __future__ import annotations

from typing import Any

from danlu.data.pipeline import DataConfig, flat_metrics, parse_config, run_data
from danlu.pipeline import StageContext


def read_config(section: dict[str, Any]) -> DataConfig:
    return parse_config(section, "data")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = dict(ctx.cfg)
    if not cfg.get("inputs"):
        cfg["inputs"] = [
            {"path": str(ctx.input("world") / "pretrain.jsonl"), "type": "jsonl", "source": "world"}
        ]
    stats = run_data(cfg, ctx.out)
    metrics = flat_metrics(stats)
    print(
        f"[danlu] data: {metrics['documents_in']:,} documents in → {metrics['documents_out']:,} out "
        f"({100 * metrics['docs_kept_fraction']:.1f}%), {metrics['tokens_out']:,} tokens (estimated); see {ctx.out / 'stats.md'}"
    )
    return metrics
