"""A run's evaluation table: one figure per quantity per checkpoint, collected from the checkpoints' stores.

`summary.json` holds it under `evaluation` → split → checkpoint → quantity → figure (value, n, ci95, counts); the
eval stage prints it, the report draws it. It lives below the runner, the eval stage and the report so that all
three read the same table from one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.eval.stats import proportion
from danlu.eval.world import QUANTITIES

ORDER = [*QUANTITIES, "bpb"]  # the evaluator's order: base form, then chat form, then bits per byte

Figure = dict[str, Any]
Table = dict[str, dict[str, Figure]]  # checkpoint → quantity → figure


def as_figure(name: str, result: dict[str, Any], split: str) -> Figure:
    """A task's result in the figure shape: world figures as they are; a plain accuracy (multiple choice, GSM8K)
    gains its Wilson interval; bits per byte keeps its delta-method interval."""
    if "value" in result:
        return result
    if "accuracy" in result:
        n = int(result.get("n", 0))
        extra = {k: result[k] for k in ("random", "examples") if k in result}
        return proportion(round(result["accuracy"] * n), n, f"{name}: questions answered right", split=split,
                          **extra)  # fmt: skip
    if "bpb" in result:
        return {"metric": "bpb", "value": result["bpb"], "n": result.get("n", 0), "rows": result.get("rows"),
                "ci95": result.get("ci95"), "counts": f"{name}: bits per byte of held-out text (lower is better; n "
                "counts tokens)", "split": split}  # fmt: skip
    return result


def without_examples(figure: Figure) -> Figure:
    """A figure as summary.json keeps it: everything but the example rows (those stay in the stores)."""
    return {k: v for k, v in figure.items() if k != "examples"}


def collect(run_dir: Path, stages: list[str]) -> dict[str, Table]:
    """{split: {checkpoint: {quantity: figure}}} from each stage folder's heldout.json, in stage order."""
    from danlu.eval.store import FILE, FigureStore

    out: dict[str, Table] = {}
    for stage in stages:
        folder = run_dir / stage
        if not (folder / FILE).is_file():
            continue
        for split, figures in FigureStore(folder).figures().items():
            ordered = sorted(figures, key=lambda q: (ORDER.index(q) if q in ORDER else len(ORDER), q))
            out.setdefault(split, {})[stage] = {q: without_examples(figures[q]) for q in ordered}
    return out


def _cell(f: Figure | None) -> str:
    if f is None:
        return ""
    ci = f.get("ci95")
    digits = 3
    if not ci or None in ci:
        return f"{f['value']:.{digits}f}"
    return f"{f['value']:.{digits}f} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"


def results_table(table: Table) -> tuple[list[str], list[list[str]]]:
    """Rows = checkpoints in stage order, columns = quantities, cells `value (95% interval)`; a column's header
    carries its row count when every checkpoint was scored on the same n."""
    columns: list[str] = []
    for figures in table.values():
        columns += [c for c in figures if c not in columns]
    head = ["checkpoint"]
    for c in columns:
        ns = {table[s][c].get("n") for s in table if c in table[s]}
        unit = "tokens" if any(table[s][c].get("metric") == "bpb" for s in table if c in table[s]) else "rows"
        label = c.removeprefix("world/")
        rand = {table[s][c].get("random") for s in table if c in table[s]} - {None}
        chance = f", chance {rand.pop():.4f}" if len(rand) == 1 else ""
        head.append(f"{label} (n {ns.pop()} {unit}{chance})" if len(ns) == 1
                    else label + (f" ({chance[2:]})" if chance else ""))  # fmt: skip
    rows = [[stage, *(_cell(figures.get(c)) for c in columns)] for stage, figures in table.items()]
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(
        ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    )
