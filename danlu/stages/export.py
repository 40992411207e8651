"""Pipeline stage `export`: the run's chat model as a GGUF file (and an Ollama Modelfile) for llama.cpp / Ollama.

The model is the run's best checkpoint (danlu.eval.best: the dev-split criterion the run's closing "Try it" and
`danlu serve RUN` use), else the last chat stage that finished (grpo, ppo, dpo, then sft; pretrain when there is no
chat stage), unless `export.model` names a stage. q8_0 by default: a quarter of the fp32 size at a bits-per-byte cost
measured in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import StageContext

CHAT_ORDER = ("grpo", "ppo", "dpo", "sft", "pretrain")


@dataclass
class ExportStageConfig:
    model: str | None = None  # a stage name; default: the run's best checkpoint, else the last chat stage
    quant: str = "q8_0"  # f32 | f16 | bf16 | q8_0 | q4_0 | q4_k_m


def read_config(section: dict[str, Any]) -> ExportStageConfig:
    return from_dict(ExportStageConfig, section, "export")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.eval.best import best_checkpoint
    from danlu.export import export_gguf

    cfg = read_config(ctx.cfg)
    best = None if cfg.model else best_checkpoint(ctx.run_dir)
    order = (cfg.model,) if cfg.model else ((best[0].name,) if best else ()) + CHAT_ORDER
    stage = next((s for s in order if ctx.has(s) and (ctx.run_dir / s / "config.json").exists()), None)
    if stage is None:
        raise DanluError(f"export: no finished model among {', '.join(order)} in {ctx.run_dir}")
    out = ctx.out / f"{stage}-{cfg.quant}.gguf"
    report = export_gguf(ctx.run_dir / stage, out, cfg.quant, force=True)
    print(
        f"[danlu] export: {stage} → {report.path} ({report.bytes / 2**20:.1f} MiB, {report.arch}, {report.quant})"
    )
    return {"model": stage, "gguf": str(report.path), "quant": cfg.quant, "gguf_bytes": report.bytes,
            "modelfile": str(report.modelfile) if report.modelfile else None}  # fmt: skip
