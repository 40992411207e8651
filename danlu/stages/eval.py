"""Pipeline stage `eval`: scores every checkpoint of the run on the same held-out quantities, in stage order.

One table with a row per checkpoint (pretrain, sft, dpo, …) shows what each stage changed: a chat stage should
raise the chat-form scores without losing the base-form facts pretraining taught (forgetting shows as a drop).

The figures come from the one evaluator (danlu.eval.world) through each checkpoint's store (danlu.eval.store), so a
quantity SFT already computed on the same rows at the same precision is read, not computed again, and the run's
summary.json has one value per quantity per checkpoint. Recipes evaluate the dev split; the published numbers are
the test split's (`eval.split=test`), which nothing is tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import MODEL_STAGES, StageContext


@dataclass
class EvalStageConfig:
    checkpoints: list[str] | None = None  # stages whose models to score; default: every finished model stage
    tasks: list[str] = field(default_factory=lambda: ["world"])
    split: str = "dev"  # held-out rows scored: dev (tune on it) or test (report it)
    limit: int = 0  # rows per held-out set (0: the whole split)
    batch_size: int = 32
    bpb: bool = True  # bits-per-byte on the world's pretrain_val.jsonl
    device: str = "auto"
    # decode the held-out sets compiled (danlu.compiler.compile_decoding)
    compile: Literal["auto", "on", "off"] = "auto"


def evaluate_run(ctx: StageContext, cfg: EvalStageConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """{checkpoint: {quantity: figure}} for every finished model stage the config names."""
    from danlu.adapters import is_adapter_folder
    from danlu.engine import resolve_device, resolve_dtype
    from danlu.eval.results import as_figure
    from danlu.eval.store import FigureStore
    from danlu.eval.tasks import EvalOptions, get_task, run_tasks
    from danlu.eval.world import SPLITS
    from danlu.io import is_checkpoint, load_checkpoint

    for name in cfg.tasks:
        get_task(name)
    if cfg.split not in SPLITS:
        raise DanluError(f"eval.split {cfg.split!r}: one of {', '.join(SPLITS)}")
    wanted = cfg.checkpoints or [s for s in MODEL_STAGES if s != "reward"]
    unknown = [s for s in wanted if s not in MODEL_STAGES]
    if unknown:
        raise DanluError(
            f"eval.checkpoints: {', '.join(unknown)} are not model stages; valid: {', '.join(MODEL_STAGES)}"
        )
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
    dtype = resolve_dtype(str(ctx.recipe.get("dtype", "auto")), device)  # the precision the stages trained at
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in found:
        ckpt = load_checkpoint(ctx.run_dir / stage, device=device)
        opts = EvalOptions(world=str(world) if ctx.has("world") else None, limit=cfg.limit, batch_size=cfg.batch_size,
                           seed=int(ctx.recipe.get("seed", 0) or 0), split=cfg.split, dtype=dtype,
                           store=FigureStore(ctx.run_dir / stage), compile=cfg.compile)  # fmt: skip
        res = run_tasks(ckpt, cfg.tasks, opts)
        val = world / "pretrain_val.jsonl"
        if cfg.bpb and val.is_file():
            opts.data = str(val)
            res.update(run_tasks(ckpt, ["bpb"], opts))
        figures = {name.removeprefix("world/"): as_figure(name, m, cfg.split) for name, m in res.items()}
        if "bpb" in figures and cfg.bpb and val.is_file():
            figures["bpb"]["counts"] = ("bits per byte on the world's pretrain_val.jsonl, text pretraining never saw "
                                        "(lower is better; n counts tokens; the same text for either split)")  # fmt: skip
        for (
            name,
            fig,
        ) in figures.items():  # world figures are stored by their evaluator; the other tasks' here
            if f"world/{name}" not in res:
                opts.store.put(f"{cfg.split}/{name}", {"task": name, "dtype": str(dtype)}, fig)
        results[stage] = figures
        print(
            f"[danlu] eval ({cfg.split}): {stage}: "
            + ", ".join(f"{k} {v['value']:.3f}" for k, v in figures.items())
        )
    return results


def read_config(section: dict[str, Any]) -> EvalStageConfig:
    return from_dict(EvalStageConfig, section, "eval")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.eval.results import markdown_table, results_table
    from danlu.files import write_json_atomic, write_text_atomic

    cfg = read_config(ctx.cfg)
    results = evaluate_run(ctx, cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.out / "results.json", {"split": cfg.split, "checkpoints": results})
    md = markdown_table(*results_table(results)) + "\n"
    write_text_atomic(ctx.out / "results.md", md)
    print(md)
    # the figures themselves are in summary.json's `evaluation` (the runner collects them from the stores)
    return {
        "split": cfg.split,
        "checkpoints": list(results),
        "figures": sum(len(v) for v in results.values()),
    }
