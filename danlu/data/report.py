"""stats.json and stats.md from datatrove's per-task stats files and the dedup/mix plan summary.

Reading datatrove's `stats/<rank>.json` files (rather than the merged `stats.json` an executor writes) counts
every task, including those finished by an earlier, interrupted run that a resumed run skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

TOKEN_ESTIMATE = "estimate: 1 token ≈ 1.5 Han characters or 4 other characters"


def _total(v: Any) -> float:
    return v.get("total", 0) if isinstance(v, dict) else float(v)


def read_step_stats(logs: Path) -> dict[str, dict[str, float]]:
    """{step name: {label: total}} summed over the ranks of every stage under `logs`."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for f in sorted(logs.glob("*/stats/*.json")):
        for step in json.loads(f.read_text(encoding="utf-8")):
            name = step["name"].split(": ", 1)[-1]
            for label, v in (step.get("stats") or {}).items():
                out[name][label] += _total(v)
    return out


def build_stats(logs: Path, plan_dir: Path, step_order: list[str], token_counter: str) -> dict[str, Any]:
    raw = read_step_stats(logs)
    steps = []
    removed: dict[str, int] = {}
    read_docs = sum(v.get("documents", 0) for k, v in raw.items() if k.startswith("read:"))
    read_chars = sum(v.get("chars", 0) for k, v in raw.items() if k.startswith("read:"))
    read_errors = sum(v.get("read_errors", 0) for k, v in raw.items() if k.startswith("read:"))
    sources = {
        k.split(":", 1)[1]: {
            "documents": int(v.get("documents", 0)),
            "read_errors": int(v.get("read_errors", 0)),
            **{lab: int(x) for lab, x in v.items() if lab not in ("documents", "chars", "read_errors")},
        }
        for k, v in raw.items()
        if k.startswith("read:")
    }
    for name in step_order:
        s = raw.get(name)
        if s is None:
            continue
        row: dict[str, Any] = {"step": name}
        for k in ("docs_in", "docs_out", "chars_in", "chars_out", "tokens_in", "tokens_out"):
            row[k] = int(s.get(k, 0))
        why = {lab.split(":", 1)[1]: int(v) for lab, v in s.items() if lab.startswith("removed:")}
        row["removed"] = why
        extra = {lab: int(v) for lab, v in s.items() if lab.startswith(("masked_", "boilerplate", "edit_"))}
        if extra:
            row["changes"] = extra
        for r, n in why.items():
            removed[f"{name}/{r}"] = n
        steps.append(row)
    out_stats = raw.get("output", {})
    langs: dict[str, dict[str, int]] = defaultdict(dict)
    domains: dict[str, dict[str, int]] = defaultdict(dict)
    for lab, v in out_stats.items():
        parts = lab.split(":")
        if len(parts) == 3 and parts[0] in ("lang", "domain"):
            (langs if parts[0] == "lang" else domains)[parts[1]][parts[2]] = int(v)
    summary_path = plan_dir / "summary.json"
    plan = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    clusters = plan.get("largest_clusters", [])
    examples: dict[tuple[int, int], dict[str, Any]] = {}
    for f in plan_dir.glob("examples_*.json"):
        rank = int(f.stem.split("_")[1])
        for c, e in zip(
            [c for c in clusters if c["rank"] == rank], json.loads(f.read_text(encoding="utf-8"))
        ):
            examples[(rank, c["index"])] = e
    for c in clusters:
        e = examples.get((c["rank"], c["index"]), {})
        c["kept_id"] = e.get("kept_id", "")
        c["preview"] = e.get("preview", "")
    last = steps[-1] if steps else {}
    return {
        "documents_in": int(read_docs),
        "documents_out": int(out_stats.get("docs", last.get("docs_out", 0))),
        "chars_in": int(read_chars),
        "chars_out": int(out_stats.get("chars", 0)),
        "tokens_in": int(steps[0]["tokens_in"]) if steps else 0,
        "tokens_out": int(out_stats.get("tokens", 0)),
        "tokens_exact_out": int(out_stats.get("tokens_exact", 0)) or None,
        "token_counter": token_counter,
        "dialogs": int(out_stats.get("dialogs", 0)),
        "read_errors": int(read_errors),
        "sources": sources,
        "steps": steps,
        "removed_by_reason": removed,
        "languages": dict(langs),
        "domains": dict(domains),
        "mix": plan.get("mix", {}),
        "minhash_pairs": plan.get("minhash_pairs", 0),
        "largest_duplicate_clusters": clusters,
    }


EDIT_NAMES = {
    "masked_email": "e-mail addresses masked", "masked_phone": "phone numbers masked", "masked_id": "ID numbers masked",
    "boilerplate_lines": "boilerplate lines removed", "edit_unicode": "documents with Unicode normalized",
    "edit_control_chars": "control characters removed", "edit_markup": "documents with markup turned into text",
    "edit_whitespace": "documents with whitespace normalized", "edit_code_blocks_kept": "code blocks kept verbatim",
    "edit_traditional_to_simplified": "documents converted to Simplified Chinese",
}  # fmt: skip


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def augment_markdown(steps: list[dict[str, Any]]) -> list[str]:
    """The "Augmentation" table: what each `data.augment` step (danlu/data/augment.py) read, tried, and wrote."""
    lines = [
        "",
        "## Augmentation",
        "",
        "| step | type | dialogs in | eligible | new dialogs | turns tried | turns changed | teacher requests | rejected |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in steps:
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(a["rejected"].items(), key=lambda x: -x[1])) or "–"
        lines.append(
            f"| {a['step']} | {a['type']} | {a['dialogs_in']:,} | {a['eligible']:,} | {a['dialogs_out']:,} "
            f"| {a['turns_tried']:,} | {a['turns_changed']:,} | {a['requests']:,} | {why} |"
        )
    return lines


def stats_markdown(s: dict[str, Any]) -> str:
    lines = ["# Data pipeline statistics", ""]
    lines += [
        f"- documents: {s['documents_in']:,} in → {s['documents_out']:,} out ({_pct(s['documents_out'], s['documents_in'])})",
        f"- characters: {s['chars_in']:,} in → {s['chars_out']:,} out",
        f"- tokens ({s['token_counter']}): {s['tokens_in']:,} in → {s['tokens_out']:,} out",
        f"- conversations for SFT: {s['dialogs']:,}",
        *(
            [f"- augmented conversations for SFT: {s.get('dialogs_augmented', 0):,}"]
            if s.get("augment")
            else []
        ),
        f"- read errors (skipped): {s['read_errors']:,}",
        "",
        "## Steps",
        "",
        "| step | docs in | docs out | chars in | chars out | tokens in | tokens out | removed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in s["steps"]:
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(r["removed"].items(), key=lambda x: -x[1])) or "–"
        lines.append(
            f"| {r['step']} | {r['docs_in']:,} | {r['docs_out']:,} | {r['chars_in']:,} | {r['chars_out']:,} "
            f"| {r['tokens_in']:,} | {r['tokens_out']:,} | {why} |"
        )
    edits = [(r["step"], k, v) for r in s["steps"] for k, v in sorted((r.get("changes") or {}).items()) if v]
    lines += ["", "## Cleaning edits", ""]
    if edits:
        lines += ["| step | edit | count |", "|---|---|---:|"]
        lines += [f"| {step} | {EDIT_NAMES.get(k, k)} | {v:,} |" for step, k, v in edits]
    else:
        lines.append("No text was changed.")
    if s.get("augment"):
        lines += augment_markdown(s["augment"])
    for title, key in (("Languages (output)", "languages"), ("Domains (output)", "domains")):
        lines += ["", f"## {title}", "", "| | docs | chars | tokens |", "|---|---:|---:|---:|"]
        for k, v in sorted(s[key].items()):
            lines.append(f"| {k} | {v.get('docs', 0):,} | {v.get('chars', 0):,} | {v.get('tokens', 0):,} |")
    mix = s.get("mix", {}).get("domains", {})
    if mix:
        lines += [
            "",
            "## Mix",
            "",
            "| domain | tokens in | target | tokens out | rate |",
            "|---|---:|---:|---:|---:|",
        ]
        for d, v in sorted(mix.items()):
            lines.append(
                f"| {d} | {v['tokens_in']:,} | {v.get('target', v['tokens_in']):,} | {v['tokens_out']:,} | {v['rate']} |"
            )
    lines += ["", "## Largest duplicate clusters", ""]
    if not s["largest_duplicate_clusters"]:
        lines.append("No duplicates found.")
    else:
        lines += ["| size | kept document | removed by | beginning |", "|---:|---|---|---|"]
        for c in s["largest_duplicate_clusters"]:
            by = ", ".join(f"{k} {v}" for k, v in c["removed_by"].items())
            prev = c.get("preview", "").replace("|", "\\|")[:100]
            lines.append(f"| {c['size']} | {c.get('kept_id', '')} | {by} | {prev} |")
    return "\n".join(lines) + "\n"
