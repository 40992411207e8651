"""Mean ± standard deviation of every metric over runs of one recipe with different seeds (`danlu run --seeds N`).

One run's figure moves with its seed (initialization, data order, sampling and, unless `world.seed` pins it, the
generated corpus and its held-out sets), so a difference between two recipes means something only next to that
spread. The summaries are read generically, so that any stage's metrics are aggregated without a list to keep up to
date, and both shapes of `summary.json` work:

- numeric leaves anywhere (`stages.pretrain.val_bpb_end`), booleans and lists (examples, intervals) left out;
- a figure, a dict with a numeric `value` (`evaluation.dev.sft.world/facts` → {value, n, ci95, …}), counts once,
  by its value; its row count `n` is kept beside it, and its other numbers (n, correct, ci95) are not metrics.

A metric missing from some runs (a stage that failed in one) is aggregated over the runs that have it; `n` says how
many.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError

SEP = "."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_leaves(summary: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float, int | None]]:
    """(dotted path, value, row count or None) for every metric in a summary, in the summary's order."""
    for key, value in summary.items():
        path = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, dict):
            if _number(value.get("value")):
                rows = value.get("n")
                yield path, float(value["value"]), int(rows) if _number(rows) else None
                # sub-figures (a breakdown by language…) inside a figure are metrics of their own
                for sub_key, sub in value.items():
                    if isinstance(sub, dict):
                        yield from metric_leaves({sub_key: sub}, path)
            else:
                yield from metric_leaves(value, path)
        elif _number(value):
            yield path, float(value), None


def aggregate(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{seeds, metrics: {path: {mean, std, n, min, max, values, rows}}} over the summaries of runs by seed.

    `std` is the sample standard deviation (n − 1 in the denominator; None for one run); `values` are per seed, in
    seed order (None where a run lacks the metric); `rows` is the figure's row count when it has one (the largest
    over runs, which differ only when their held-out sets do).
    """
    if not summaries:
        raise DanluError("no runs to aggregate over seeds")
    seeds = sorted(summaries)
    per: dict[str, dict[int, float]] = {}
    rows: dict[str, int] = {}
    for seed in seeds:
        for path, value, n in metric_leaves(summaries[seed]):
            per.setdefault(path, {})[seed] = value
            if n is not None:
                rows[path] = max(rows.get(path, 0), n)
    metrics: dict[str, dict[str, Any]] = {}
    for path, by_seed in per.items():
        values = [by_seed[s] for s in seeds if s in by_seed]
        metrics[path] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "min": min(values),
            "max": max(values),
            "values": [by_seed.get(s) for s in seeds],
            **({"rows": rows[path]} if path in rows else {}),
        }
    return {"seeds": seeds, "metrics": metrics}


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))  # counts stay counts: 1422, not 1422.0
    if x == 0 or 1e-3 <= abs(x) < 1:
        return f"{x:.4f}"
    if 1 <= abs(x) < 1000:
        return f"{x:#.4g}"  # four significant digits, trailing zeros kept: 2.700, 40.00
    return f"{x:.1f}" if abs(x) < 1e7 else f"{x:.3e}"


def markdown(result: dict[str, Any], title: str = "") -> str:
    """The aggregate as a Markdown table: metrics that vary over seeds with mean ± std, n and range; the ones that
    do not (step counts, parameter counts, sizes) on one line below, so that the table shows only what moved."""
    seeds = result["seeds"]
    lines = [f"# {title or 'Runs over seeds'}", "",
             f"Seeds {', '.join(map(str, seeds))} ({len(seeds)} runs). Mean ± sample standard deviation over the runs "
             "that have the metric (n); rows: the held-out rows behind a figure.", "",
             "| metric | mean ± std | n | min | max | rows |", "|---|---|---|---|---|---|"]  # fmt: skip
    constant = []
    for path, m in result["metrics"].items():
        if m["n"] > 1 and m["min"] == m["max"]:
            constant.append(f"{path} {_fmt(m['mean'])}")
            continue
        spread = f"{_fmt(m['mean'])} ± {_fmt(m['std'])}"
        lines.append(
            f"| {path} | {spread} | {m['n']} | {_fmt(m['min'])} | {_fmt(m['max'])} | {m.get('rows', '')} |"
        )
    if constant:
        lines += ["", "The same in every run: " + "; ".join(constant) + "."]
    return "\n".join(lines) + "\n"


def write_seed_report(out: Path, runs: dict[int, Path]) -> tuple[Path, Path]:
    """OUT/seeds.json and OUT/seeds.md from each run folder's summary.json (seed → folder); returns both paths."""
    import json

    from danlu.files import write_json_atomic, write_text_atomic

    summaries = {}
    for seed, folder in sorted(runs.items()):
        path = folder / "summary.json"
        if not path.is_file():
            raise DanluError(f"{path}: no summary.json (the run with seed {seed} did not finish a stage)")
        try:
            summaries[seed] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DanluError(f"{path}: not valid JSON ({e})") from None
    result = aggregate(summaries)
    result["runs"] = {str(s): str(runs[s]) for s in sorted(runs)}
    json_path, md_path = out / "seeds.json", out / "seeds.md"
    write_json_atomic(json_path, result)
    write_text_atomic(md_path, markdown(result, f"{out.name}: {len(runs)} seeds"))
    return json_path, md_path
