"""Pipeline stage `eval`: scores every checkpoint of the run on the same held-out sets, in stage order.

One table with a row per checkpoint (pretrain, sft, dpo, …) shows what each stage changed: a chat stage should
raise the chat-form scores without losing the base-form facts pretraining taught (forgetting shows as a drop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.runner import STAGES, StageContext

MODEL_STAGES = [s for s in STAGES if s in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")]


@dataclass
class EvalStageConfig:
    checkpoints: list[str] | None = None  # stages whose models to score; default: every finished model stage
    tasks: list[str] = field(default_factory=lambda: ["world"])
    limit: int = 100  # rows per held-out set
    batch_size: int = 32
    bpb: bool = True  # bits-per-byte on the world's pretrain_val.jsonl
    device: str = "auto"


def evaluate_run(ctx: StageContext, cfg: EvalStageConfig) -> dict[str, dict[str, dict[str, Any]]]:
    from danlu.engine import resolve_device
    from danlu.eval.tasks import EvalOptions, get_task, run_tasks
    from danlu.io import is_checkpoint, load_checkpoint

    for name in cfg.tasks:
        get_task(name)
    wanted = cfg.checkpoints or [s for s in MODEL_STAGES if s != "reward"]
    unknown = [s for s in wanted if s not in MODEL_STAGES]
    if unknown:
        raise DanluError(
            f"eval.checkpoints: {', '.join(unknown)} are not model stages; valid: {', '.join(MODEL_STAGES)}"
        )
    from danlu.adapters import is_adapter_folder

    # a stage trained with `peft:` wrote an adapter folder, which loads as base + adapter
    found = [
        s
        for s in wanted
        if ctx.has(s) and (is_checkpoint(ctx.run_dir / s) or is_adapter_folder(ctx.run_dir / s))
    ]
    if not found:
        raise DanluError(f"eval: no finished checkpoint among {', '.join(wanted)} in {ctx.run_dir}")
    world = ctx.run_dir / "world"
    device = resolve_device(cfg.device if cfg.device != "auto" else str(ctx.recipe.get("device", "auto")))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in found:
        ckpt = load_checkpoint(ctx.run_dir / stage, device=device)
        opts = EvalOptions(world=str(world) if ctx.has("world") else None, limit=cfg.limit, batch_size=cfg.batch_size,
                           seed=int(ctx.recipe.get("seed", 0) or 0))  # fmt: skip
        res = run_tasks(ckpt, cfg.tasks, opts)
        val = world / "pretrain_val.jsonl"
        if cfg.bpb and val.is_file():
            opts.data = str(val)
            res.update(run_tasks(ckpt, ["bpb"], opts))
        results[stage] = res
        print(f"[danlu] eval: {stage}: " + ", ".join(f"{k} {_main(v)}" for k, v in res.items()))
    return results


def _main(m: dict[str, Any]) -> str:
    return f"{m['accuracy']:.3f}" if "accuracy" in m else f"bpb {m.get('bpb', float('nan')):.3f}"


def results_table(results: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Rows = checkpoints in stage order, columns = results: the before/after view of the run."""
    columns: list[str] = []
    for res in results.values():
        columns += [c for c in res if c not in columns]
    rows = []
    for stage, res in results.items():
        cells = []
        for c in columns:
            m = res.get(c)
            cells.append(
                "" if m is None else (f"{m['accuracy']:.3f}" if "accuracy" in m else f"{m.get('bpb', 0):.3f}")
            )
        rows.append([stage, *cells])
    return [
        "checkpoint",
        *[c.removeprefix("world/") for c in columns],
    ], rows


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.files import write_json_atomic, write_text_atomic

    cfg = from_dict(EvalStageConfig, ctx.cfg, "eval")
    results = evaluate_run(ctx, cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.out / "results.json", results)
    head, rows = results_table(results)
    md = (
        "| "
        + " | ".join(head)
        + " |\n|"
        + "---|" * len(head)
        + "\n"
        + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    )
    write_text_atomic(ctx.out / "results.md", md)
    print(md)
    metrics: dict[str, Any] = {}
    for stage, res in results.items():
        for name, m in res.items():
            for key in ("accuracy", "bpb"):
                if key in m:
                    metrics[f"{stage}/{name.removeprefix('world/')}/{key}"] = m[key]
    return metrics
