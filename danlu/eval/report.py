"""The run report: `DIR/report.md` and a self-contained `DIR/report.html` (plots inline as base64 PNG).

It answers "what did each stage change?" from the files the run already wrote: `summary.json` (each stage's numbers,
the held-out evaluation table with intervals, the best checkpoint and why), each stage's `metrics.jsonl` (train loss,
validation loss, tokens/s, MFU, samples), `eval/results.json` (example answers), `data/stats.json` and
`world/stats.json`. Every loss plot shows train and validation together, because
overfitting is only visible as the gap between them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.eval.results import Table, markdown_table, results_table
from danlu.pipeline import STAGES

OVERFIT_GAP = 0.5  # nats; the engine's default overfit_warning_gap


@dataclass
class Section:
    title: str
    text: str = ""  # Markdown paragraph(s)
    table: tuple[list[str], list[list[str]]] | None = None
    image: bytes | None = None  # PNG
    image_name: str = ""
    code: list[str] = field(default_factory=list)  # preformatted samples


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the rest still reports
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def stage_histories(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl of each stage folder, in pipeline order."""
    out = {}
    for name in STAGES:
        path = run_dir / name / "metrics.jsonl"
        if path.is_file():
            out[name] = _read_jsonl(path)
    return out


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()  # titles and axis labels of neighbouring panels must not overlap
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _grid(n: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def _series(hist: list[dict[str, Any]], event: str, key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["step"], r[key]) for r in hist if r.get("event") == event and isinstance(r.get(key), (int, float))
    ]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _label(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _reward_panel(ax: Any, stage: str, steps: list[int], rewards: list[float]) -> None:
    k = max(1, len(rewards) // 10)  # a moving average: each point is a few dozen samples
    windows = [rewards[max(0, i - k + 1) : i + 1] for i in range(len(rewards))]
    ax.plot(steps, rewards, color="tab:green", alpha=0.3, label="mean reward")
    ax.plot(
        steps, [sum(w) / len(w) for w in windows], color="tab:green", label=f"mean reward ({k}-point average)"
    )
    _label(ax, f"{stage} (reward)", "reward")


def _loss_panel(ax: Any, stage: str, hist: list[dict[str, Any]]) -> None:
    ax.plot(*_series(hist, "train", "loss"), label="train loss", color="tab:blue")
    vx, vy = _series(hist, "eval", "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", label="validation loss", color="tab:orange")
    else:
        ax.text(0.5, 0.9, "no validation set", transform=ax.transAxes, ha="center", color="gray")
    for r in hist:
        if r.get("event") == "early_stop":
            ax.axvline(r["step"], color="red", ls="--", label="early stop")
    _label(ax, stage, "loss (nats/token)")


def loss_plot(histories: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """One panel per stage: train loss and validation loss against the step, early stops marked. RL stages plot
    their mean reward instead: GRPO's loss is ~0 by construction (one step per rollout, zero-mean advantages)."""
    stages = [s for s, h in histories.items() if _series(h, "train", "loss")[0]]
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, stage in zip(axes, stages):
        rx, ry = _series(histories[stage], "train", "reward")
        if rx:
            _reward_panel(ax, stage, rx, ry)
        else:
            _loss_panel(ax, stage, histories[stage])
        ax.legend(fontsize=8)
    return _figure_png(fig)


def throughput_plot(histories: dict[str, list[dict[str, Any]]]) -> bytes | None:
    stages = [s for s, h in histories.items() if _series(h, "train", "tokens_per_s")[0]]
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, stage in zip(axes, stages):
        hist = histories[stage]
        ax.plot(*_series(hist, "train", "tokens_per_s"), color="tab:green", label="tokens/s")
        _label(ax, stage, "tokens/s")
        mx, my = _series(hist, "train", "mfu")
        if mx:
            ax2 = ax.twinx()
            ax2.plot(mx, [100 * v for v in my], color="tab:purple", ls=":", label="MFU %")
            ax2.set_ylabel("MFU %")
            ax2.legend(fontsize=8, loc="lower right")
        ax.legend(fontsize=8, loc="upper left")
    return _figure_png(fig)


def eval_plot(table: Table) -> bytes | None:
    """Grouped bars: each accuracy, one bar per checkpoint (stage order) with its 95% interval, random dashed."""
    names: list[str] = []
    for figures in table.values():
        names += [k for k, v in figures.items() if v.get("metric") == "accuracy" and k not in names]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) * max(1, len(table)) * 0.5 + 3), 3.6))
    width = 0.8 / max(1, len(table))
    for j, (stage, figures) in enumerate(table.items()):
        xs = [i + j * width for i in range(len(names))]
        vals = [figures.get(n, {}).get("value", 0.0) for n in names]
        cis = [figures.get(n, {}).get("ci95") or [v, v] for n, v in zip(names, vals)]
        err = [
            [max(0.0, v - c[0]) for v, c in zip(vals, cis)],
            [max(0.0, c[1] - v) for v, c in zip(vals, cis)],
        ]
        ax.bar(xs, vals, width, yerr=err, capsize=2, label=stage)
    for i, n in enumerate(names):
        rand = next((f[n].get("random") for f in table.values() if n in f and f[n].get("random")), None)
        if rand:
            ax.hlines(rand, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("held-out evaluation per checkpoint (bars: 95% interval; dashed: random)")
    return _figure_png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)[:120]
    return str(v)


def _flatten(d: dict[str, Any], prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out += _flatten(v, key + ".", depth - 1)
        else:
            out.append((key, v))
    return out


def overfitting_notes(histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    notes = []
    for stage, hist in histories.items():
        ev = [r for r in hist if r.get("event") == "eval" and isinstance(r.get("val_loss"), (int, float))]
        tr = _series(hist, "train", "loss")
        if ev and tr[0]:
            last_train = tr[1][-1]
            gap = ev[-1]["val_loss"] - last_train
            best = min(ev, key=lambda r: r["val_loss"])
            line = (f"**{stage}**: final train loss {last_train:.3f}, validation loss {ev[-1]['val_loss']:.3f} "
                    f"(gap {gap:+.3f}); best validation {best['val_loss']:.3f} at step {best['step']}")  # fmt: skip
            if gap > OVERFIT_GAP:
                line += (
                    " — ⚠ overfitting: validation is well above train; fewer steps or early_stopping_patience"
                )
            if any(r.get("event") == "early_stop" for r in hist):
                line += " — stopped early on validation loss"
            notes.append(line)
    return notes


def build_sections(run_dir: Path) -> list[Section]:
    summary = _json(run_dir / "summary.json")
    histories = stage_histories(run_dir)
    results = _json(run_dir / "eval" / "results.json")
    results = results.get("checkpoints", {}) if "checkpoints" in results else {}
    sections: list[Section] = []

    stage_rows = []
    for stage, m in (summary.get("stages") or {}).items():
        keys = [k for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        shown = ", ".join(f"{k}={_fmt(m[k])}" for k in keys[:8])
        stage_rows.append([stage, _fmt(m.get("seconds", "")), shown])
    sections.append(Section("Stages", "Each stage's headline numbers (all of them in summary.json).",
                            table=(["stage", "seconds", "metrics"], stage_rows)))  # fmt: skip

    sections.append(long_dialog_section(summary.get("stages") or {}))

    notes = overfitting_notes(histories)
    sections.append(Section("Loss curves: train vs validation",
                            "\n".join(f"- {n}" for n in notes) or "No training stage logged a loss.",
                            image=loss_plot(histories), image_name="loss.png"))  # fmt: skip

    sections += evaluation_sections(summary)

    tp_rows = []
    for stage, hist in histories.items():
        _, tps = _series(hist, "train", "tokens_per_s")
        _, mfu = _series(hist, "train", "mfu")
        if tps:
            tail = tps[len(tps) // 2 :] or tps  # the second half: past warm-up
            mean_mfu = sum(mfu[len(mfu) // 2 :]) / max(1, len(mfu[len(mfu) // 2 :])) if mfu else None
            tp_rows.append(
                [stage, f"{sum(tail) / len(tail):,.0f}", "" if mean_mfu is None else f"{100 * mean_mfu:.2f}%"]
            )
    sections.append(Section("Throughput and MFU", "Mean over the second half of each stage (after warm-up).",
                            table=(["stage", "tokens/s", "MFU"], tp_rows) if tp_rows else None,
                            image=throughput_plot(histories), image_name="throughput.png"))  # fmt: skip

    data_rows = []
    for stage in ("data", "world", "tokens"):
        stats = _json(run_dir / stage / "stats.json") or (
            _json(run_dir / stage / "index.json") if stage == "tokens" else {}
        )
        for k, v in _flatten(stats)[:40]:
            if stage == "tokens" and k.startswith("splits"):
                continue
            data_rows.append([stage, k, _fmt(v)])
    sections.append(Section("Data statistics", "" if data_rows else "No data statistics in this run.",
                            table=(["source", "statistic", "value"], data_rows) if data_rows else None))  # fmt: skip

    code = []
    for stage, hist in histories.items():
        last = next((r for r in reversed(hist) if r.get("event") == "samples"), None)
        if last:
            code += [f"[{stage} step {last['step']}] {s}" for s in last.get("samples", [])]
    for stage, res in results.items():
        for name, m in res.items():
            for ex in (m.get("examples") or [])[:2]:
                mark = "✓" if ex.get("correct") else "✗"
                prompt = ex.get("prompt") or ex.get("question", "")
                code.append(f"[{stage} {name}] {mark} {prompt!s} → {ex.get('completion', ex.get('prediction', ''))!s}"
                            f"   (expected {ex.get('answer')})")  # fmt: skip
    sections.append(Section("Sample conversations", "" if code else "No samples logged.", code=code))
    return sections


def evaluation_sections(summary: dict[str, Any]) -> list[Section]:
    """The held-out table of each split (value and 95% interval per quantity and checkpoint) and the best
    checkpoint with its criterion and reason."""
    evaluation = summary.get("evaluation") or {}
    if not evaluation:
        return [Section("Evaluation before/after each stage", "No held-out evaluation in this run yet.")]
    out = []
    for split, table in evaluation.items():
        counts = {q: f.get("counts", "") for figures in table.values() for q, f in figures.items()}
        legend = "\n".join(f"- **{q}**: {c}" for q, c in counts.items() if c)
        text = (f"The {split} split of the held-out sets (phrasings never seen in training"
                + ("; recipes are tuned on it, so report the test split" if split == "dev" else "; nothing is tuned "
                   "on it") + "). Cells: value (95% interval); accuracy unless marked bpb (bits per byte, lower is "
                "better). Rows in stage order: read down a column to see what each stage changed.\n" + legend)  # fmt: skip
        out.append(Section(f"Evaluation before/after each stage ({split})", text, table=results_table(table),
                           image=eval_plot(table), image_name=f"eval_{split}.png"))  # fmt: skip
    best = summary.get("best_checkpoint")
    if best:
        out.append(Section("Best checkpoint", f"**{best['checkpoint']}** — chosen by the {best['criterion']}. "
                           f"{best['reason']}. `danlu serve RUN_DIR` serves it."))  # fmt: skip
    return out


LONG_DIALOG_KEYS = ("dialogs_read", "dialogs", "dialogs_truncated", "dialogs_split", "dialogs_split_rows",
                    "dialogs_skipped_too_long", "assistant_tokens_kept_share")  # fmt: skip


def long_dialog_section(stages: dict[str, dict[str, Any]]) -> Section:
    """What the context did to the fine-tuning data: dialogs cut, split or dropped, and the share of answer tokens
    that was trained (issue 16: context must never eat data silently)."""
    rows, warnings = [], []
    for stage, m in stages.items():
        if "assistant_tokens_kept_share" not in m:
            continue
        rows.append([stage, *(_fmt(m.get(k, "")) for k in LONG_DIALOG_KEYS)])
        if m["assistant_tokens_kept_share"] < 0.9:
            warnings.append(f"- **{stage}** trained on only {100 * m['assistant_tokens_kept_share']:.1f}% of the answer "
                            "tokens: raise `seq_len` or use `long_dialogs: split`.")  # fmt: skip
    if not rows:
        return Section("Long dialogs", "No fine-tuning stage in this run.")
    return Section("Long dialogs", "\n".join(warnings) or "Every fine-tuning stage trained on ≥ 90% of answer tokens.",
                   table=(["stage", "read", "kept", "truncated", "split", "split rows", "too long, skipped",
                           "answer tokens trained"], rows))  # fmt: skip


def render_markdown(title: str, sections: list[Section], assets: str) -> str:
    parts = [f"# {title}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        if s.text:
            parts.append(s.text + "\n")
        if s.table and s.table[1]:
            parts.append(markdown_table(*s.table) + "\n")
        if s.image:
            parts.append(f"![{s.title}]({assets}/{s.image_name})\n")
        if s.code:
            parts.append("```\n" + "\n".join(s.code) + "\n```\n")
    return "\n".join(parts)


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{e(s.title)}</h2>")
        for para in filter(None, s.text.split("\n")):
            para = e(para.removeprefix("- "))
            while "**" in para:
                para = para.replace("**", "<b>", 1).replace("**", "</b>", 1)
            body.append(f"<p>{para}</p>")
        if s.table and s.table[1]:
            head, rows = s.table
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>")
        if s.image:
            b64 = base64.b64encode(s.image).decode()
            body.append(f'<img alt="{e(s.title)}" src="data:image/png;base64,{b64}">')
        if s.code:
            body.append("<pre>" + e("\n".join(s.code)) + "</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f4f4f4}img{max-width:100%}pre{background:#f7f7f7;padding:1em;"
             "white-space:pre-wrap;font-size:13px}")  # fmt: skip
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Writes DIR/report.md (+ DIR/report_files/*.png) and the self-contained DIR/report.html."""
    from danlu.files import write_text_atomic

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DanluError(f"{run_dir}: no such run folder")
    if not (run_dir / "summary.json").exists() and not stage_histories(run_dir):
        raise DanluError(
            f"{run_dir}: not a run folder (no summary.json and no stage metrics); run `danlu run` first"
        )
    sections = build_sections(run_dir)
    title = f"danlu run report — {run_dir.resolve().name}"
    assets = run_dir / "report_files"
    for s in sections:
        if s.image:
            assets.mkdir(exist_ok=True)
            (assets / s.image_name).write_bytes(s.image)
    write_text_atomic(run_dir / "report.md", render_markdown(title, sections, "report_files"))
    write_text_atomic(run_dir / "report.html", render_html(title, sections))
    return run_dir / "report.md", run_dir / "report.html"
