"""The pipeline runner behind `danlu run`: stages in order, each into `DIR/<stage>/`.

A stage is a module in `danlu.stages` with `run_stage(ctx) -> metrics`. A stage runs when the recipe has its
section (and the section does not say `enabled: false`). Each finished stage leaves `DIR/<stage>/stage.json`
with a fingerprint of its config, its input files and the fingerprints of the stages before it; a rerun skips
a stage whose fingerprint is unchanged, so editing `sft:` reruns SFT and what follows, not pretraining.
`torchrun -m danlu run` runs the training stages on every process and the rest on rank 0 (`run_pipeline`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.cpu_threads import forget_choice
from danlu.files import write_json_atomic
from danlu.pipeline import (
    DISTRIBUTED_STAGES,
    GLOBAL_KEYS,
    MODEL_STAGES,
    STAGES,
    StageContext,
    stage_enabled,
    stage_section,
)

# Re-exported for the stages and tests that still import them from here; their home is danlu.pipeline.
__all__ = ["GLOBAL_KEYS", "STAGES", "StageContext", "active_stages", "run_pipeline"]


def active_stages(recipe: dict[str, Any]) -> list[str]:
    unknown = sorted(k for k in recipe if k not in STAGES and k not in GLOBAL_KEYS)
    if unknown:
        raise DanluError(
            f"recipe: unknown section{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid sections: {', '.join(STAGES + list(GLOBAL_KEYS))}"
        )
    return [name for name in STAGES if stage_enabled(recipe, name)]


def _file_signature(value: Any) -> Any:
    """Strings that name existing files or folders stand for their content's size and mtime in a fingerprint."""
    if isinstance(value, dict):
        return {k: _file_signature(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_file_signature(v) for v in value]
    if isinstance(value, str) and ("/" in value or "." in value):
        p = Path(value)
        if p.is_file():
            st = p.stat()
            return [value, st.st_size, st.st_mtime_ns]
        if p.is_dir():
            return [
                value,
                sorted((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in p.rglob("*") if q.is_file()),
            ]
    return value


def code_signature(name: str) -> str:
    """danlu's version, and for the world stage a hash of the generator's source: the built-in corpus is code, so
    after an upgrade (or an edit of its templates) a rerun must rebuild it and everything trained on it."""
    from danlu import __version__

    if name != "world":
        return __version__
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "world").glob("*.py")):
        digest.update(path.read_bytes())
    return f"{__version__}:{digest.hexdigest()[:12]}"


def fingerprint(name: str, recipe: dict[str, Any], previous: str) -> str:
    payload = {
        "stage": name,
        "code": code_signature(name),
        "section": _file_signature(recipe.get(name)),
        "global": {k: recipe.get(k) for k in GLOBAL_KEYS if k != "extends"},
        "previous": previous,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_recipe(recipe: dict[str, Any], stages: list[str]) -> None:
    """Reads every stage's section (its `read_config`), the stage's engine settings merged with the recipe's
    `train:`, and `model:`, before the first stage runs: a typo in `grpo:` stops the run in its first second with
    the key named, not after pretraining and SFT. What only a stage can know (files, the world size) it checks
    itself when it starts."""
    from danlu.config import from_dict
    from danlu.model import ModelConfig
    from danlu.stages.common import engine_settings

    if "pretrain" in stages:  # the stage that builds a model from `model:`
        from_dict(ModelConfig, recipe.get("model"), "model")
    for name in stages:
        read = getattr(importlib.import_module(f"danlu.stages.{name}"), "read_config", None)
        cfg = read(stage_section(recipe, name)) if read is not None else None
        if isinstance(getattr(cfg, "train", None), dict):
            engine_settings(recipe, cfg.train, name)


def run_pipeline(
    recipe: dict[str, Any], run_dir: Path, *, from_stage: str | None = None, only: list[str] | None = None
) -> dict[str, Any]:
    """Runs the recipe's stages in order into `run_dir`; returns the summary (also written to summary.json).

    Under torchrun every rank runs the stages of `DISTRIBUTED_STAGES` (each rank its own rows) and rank 0 runs the
    others alone while the rest wait; rank 0 decides which stages are skipped and writes the run's own files."""
    from danlu.engine import broadcast_from_main, init_distributed, single_process, wait_for_main

    stages = active_stages(recipe)
    if from_stage is not None and from_stage not in stages:
        raise DanluError(
            f"--from {from_stage!r}: not a stage of this recipe; its stages: {', '.join(stages)}"
        )
    check_recipe(recipe, stages)
    d = init_distributed(str(recipe.get("device") or "auto"))
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "recipe.json", recipe)
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("stages", {})
    previous = ""
    forced = False
    for name in stages:
        fp = fingerprint(name, recipe, previous)
        previous = fp
        forced = forced or name == from_stage
        done_path = run_dir / name / "stage.json"
        done = json.loads(done_path.read_text()) if d.main and done_path.exists() else None
        if only is not None and name not in only:
            continue
        if broadcast_from_main(not forced and done is not None and done.get("fingerprint") == fp, d):
            if d.main:
                print(f"[danlu] {name}: unchanged since its last run, skipped")
                summary["stages"][name] = done["metrics"]  # type: ignore[index]
            continue
        ctx = StageContext(name=name, run_dir=run_dir, cfg=stage_section(recipe, name), recipe=recipe)
        alone = d.world_size > 1 and name not in DISTRIBUTED_STAGES
        if d.main:
            if done_path.exists():
                done_path.unlink()  # a stage that starts over is not finished until it says so again
            print(f"[danlu] ── stage {name} ──" + (f" (rank 0 alone; {d.world_size - 1} more wait)" if alone else ""))
            interrupted_at = interrupted_step(ctx.out)
            if interrupted_at is not None:
                print(f"[danlu] {name}: an interrupted run left a checkpoint at step {interrupted_at}; the stage "
                      "continues from it when its settings are unchanged (resume: auto)")  # fmt: skip
        wait_for_main(d)  # the stage's folder is settled (an interrupted save finished) before any rank reads it
        forget_choice()  # each stage's trainer looks at the machine's load anew (danlu.cpu_threads)
        module = importlib.import_module(f"danlu.stages.{name}")
        t0 = time.time()
        metrics: dict[str, Any] = {}
        try:
            if d.main or not alone:
                with single_process() if alone else contextlib.nullcontext():
                    metrics = module.run_stage(ctx) or {}
        except DanluError as e:
            if d.main:
                write_json_atomic(summary_path, summary)
                write_run_report(run_dir)
            raise DanluError(f"stage {name!r} failed: {e} (earlier stages are intact in {run_dir})") from None
        if d.main:
            seconds = round(time.time() - t0, 2)
            metrics.pop(
                "heldout", None
            )  # held-out figures live in the checkpoint's heldout.json (summary: evaluation)
            metrics = {**metrics, "seconds": seconds}
            ctx.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(done_path, {"fingerprint": fp, "metrics": metrics, "finished_at": time.time()})
            summary["stages"][name] = metrics
            refresh_evaluation(run_dir, summary)
            write_json_atomic(summary_path, summary)
            print(f"[danlu] {name}: done in {seconds:.1f}s")
        wait_for_main(d)  # the next stage's ranks find this one finished
    if d.main:
        refresh_evaluation(run_dir, summary)
        write_json_atomic(summary_path, summary)
        write_run_report(run_dir)
    return summary


def refresh_evaluation(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary["evaluation"] (split → checkpoint → quantity → figure, from each checkpoint's heldout.json) and
    summary["best_checkpoint"] (danlu.eval.best's choice on dev), rebuilt after every stage: one value per quantity
    per checkpoint, whichever stage computed it."""
    from danlu.eval.best import choose_best
    from danlu.eval.results import collect

    finished = [s for s in MODEL_STAGES if (run_dir / s / "stage.json").exists()]
    evaluation = collect(run_dir, finished)
    summary.pop("evaluation", None)
    summary.pop("best_checkpoint", None)
    if evaluation:
        summary["evaluation"] = evaluation
    best = choose_best(evaluation, finished)
    if best is not None:
        summary["best_checkpoint"] = best


def interrupted_step(out: Path) -> int | None:
    """The step of an unfinished training checkpoint in a stage folder (after finishing any interrupted save), or
    None: what lets `danlu run` say that it continues an interrupted stage rather than starting it over."""
    from danlu.files import leftovers, recover_swapped

    state_path = out / "trainer_state" / "state.json"
    if not state_path.exists() and not leftovers(out):
        return None
    from danlu.engine import checkpoint_step

    recover_swapped(out, rank=checkpoint_step)
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if state.get("finished") else int(state.get("step", 0))


def write_run_report(run_dir: Path) -> None:
    """DIR/report.md and DIR/report.html after every run (also one that failed: what finished is reported).

    A report that cannot be drawn must not turn a finished run into a failed one, so its error is printed only.
    """
    try:
        from danlu.eval.report import write_report

        _, page = write_report(run_dir)
        print(f"[danlu] report: {page}")
    except Exception as e:  # noqa: BLE001 - the run's results matter more than its pictures
        print(f"[danlu] warning: could not write the report for {run_dir}: {e}")
