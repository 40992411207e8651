"""Pipeline stage `compress`: a smaller student from the run's pretrained model (or `compress.teacher`).

Defaults come from the run: the teacher is the `pretrain` stage's model, the texts the world corpus' pretraining
file, the held-out bpb its validation file and the held-out accuracy its base-model factual completions; with
`compress.restore.enabled`, the restore step fine-tunes on its dialogs and scores its held-out chat facts. The steps
and their report are `danlu.compress.pipeline`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import StageContext


def _replay_tokens(ctx: StageContext, teacher: str | Path) -> str | None:
    """The run's token shards, for the restore step's replay, when they were made with the teacher's tokenizer."""
    from danlu.data.shards import load_index, tokenized_with

    if not ctx.has("tokens"):
        return None
    folder = ctx.run_dir / "tokens"
    same = tokenized_with(load_index(folder), teacher)
    if not same:
        print(f"[danlu] compress.restore: {folder} has another tokenizer than the teacher's: no replay")
    return str(folder) if same else None


def read_config(section: dict[str, Any]) -> Any:
    from danlu.compress.pipeline import CompressConfig

    return from_dict(CompressConfig, section, "compress")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.compress.pipeline import run_compress, summary
    from danlu.stages.common import train_config

    cfg = read_config(ctx.cfg)
    teacher = cfg.teacher or ctx.input("pretrain")
    world = ctx.run_dir / "world"

    def world_file(name: str) -> str | None:
        path = world / name
        return str(path) if ctx.has("world") and path.exists() else None

    cfg.data = cfg.data or world_file("pretrain.jsonl")
    cfg.eval_data = cfg.eval_data or world_file("pretrain_val.jsonl")
    cfg.facts = cfg.facts or world_file("eval/facts_base.jsonl")
    if cfg.restore.enabled:  # chat manners back from the world's dialogs, chat facts from its held-out sets
        cfg.restore.data = cfg.restore.data or ([f] if (f := world_file("sft.jsonl")) else None)
        cfg.restore.eval_data = cfg.restore.eval_data or (str(world) if ctx.has("world") else None)
        cfg.restore.tokens = cfg.restore.tokens or _replay_tokens(ctx, teacher)
    if cfg.data is None:
        raise DanluError("compress: no `data:` given and no world corpus in this run")
    tcfg = train_config(ctx.recipe, {**cfg.train, **cfg.distill.train}, "compress")
    return summary(run_compress(teacher, ctx.out, cfg, tcfg, ctx.recipe))
