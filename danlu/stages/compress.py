"""Pipeline stage `compress`: a smaller student from the run's pretrained model (or `compress.teacher`).

Defaults come from the run: the teacher is the `pretrain` stage's model, the texts the world corpus' pretraining
file, the held-out bpb its validation file and the held-out accuracy its base-model factual completions. The steps
and their report are `danlu.compress.pipeline`'s.
"""

from __future__ import annotations

from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import StageContext


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.compress.pipeline import CompressConfig, run_compress, summary
    from danlu.stages.common import train_config

    cfg = from_dict(CompressConfig, ctx.cfg, "compress")
    world = ctx.run_dir / "world"

    def world_file(name: str) -> str | None:
        path = world / name
        return str(path) if ctx.has("world") and path.exists() else None

    cfg.data = cfg.data or world_file("pretrain.jsonl")
    cfg.eval_data = cfg.eval_data or world_file("pretrain_val.jsonl")
    cfg.facts = cfg.facts or world_file("eval/facts_base.jsonl")
    if cfg.data is None:
        raise DanluError("compress: no `data:` given and no world corpus in this run")
    teacher = cfg.teacher or ctx.input("pretrain")
    tcfg = train_config(ctx.recipe, {**cfg.train, **cfg.distill.train}, "compress")
    return summary(run_compress(teacher, ctx.out, cfg, tcfg))
