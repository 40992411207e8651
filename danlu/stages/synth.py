"""Pipeline stage `synth`: does data a teacher writes help a student? (`danlu run synth`, issue 23.)

The teacher is the run's SFT model (or `synth.teacher`: a checkpoint folder or an OpenAI-compatible URL), served
by `danlu serve` on a free loopback port; it writes `synth.n` Self-Instruct rows from seed tasks and, with
`synth.answers`, its answers to other world prompts. Students start from the run's pretrained model (or
`synth.student`) and get the same SFT steps on the hand-written dialogs alone and with each synthetic set; the
held-out chat sets (dev split by default) score them, each delta paired item by item with its 95% interval.
The steps are danlu.synth.experiment's; `DIR/synth/results.md` has the tables, the stage metrics the headline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.config import from_dict
from danlu.pipeline import StageContext


def flat_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What the run report shows: each student's accuracy per set, each delta with its interval, row counts, and
    the synthetic data's yield, duplicate rate, distinct-2 and language mix."""
    out: dict[str, Any] = {"split": result["split"]["name"], "eval_rows": sum(result["eval_rows"].values())}
    for student, d in result["delta"].items():  # the headline first: the run report shows the first few
        out[f"{student}/delta"] = d["all"]["delta"]
        out[f"{student}/delta_ci95"] = d["all"]["ci95"]
    for student, acc in result["accuracy"].items():
        for s, v in acc.items():
            out[f"{student}/{s}"] = v
    for name, y in result["yield"].items():
        out[f"{name}/kept"], out[f"{name}/generated"] = y["kept"], y["generated"]
        out[f"{name}/kept_ratio"] = y["kept_ratio"]
    for name, st in result["data"].items():
        ins = st["instructions"]
        out[f"{name}/duplicate_rate"] = ins["duplicate_rate"]
        out[f"{name}/distinct_2"] = ins["distinct_2"]
        out[f"{name}/language_mix"] = ins["language_mix"]
    return out


def read_config(section: dict[str, Any]) -> Any:
    from danlu.synth.experiment import SynthExperimentConfig

    return from_dict(SynthExperimentConfig, section, "synth")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.synth.experiment import run_experiment

    cfg = read_config(ctx.cfg)
    teacher = cfg.teacher or str(ctx.input("sft"))
    student = Path(cfg.student) if cfg.student else ctx.input("pretrain")
    result = run_experiment(ctx.input("world"), teacher, student, ctx.out, cfg, ctx.recipe)
    print((ctx.out / "results.md").read_text(encoding="utf-8"))
    return flat_metrics(result)
