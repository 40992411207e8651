"""The task registry behind `danlu eval --task NAME` and the `eval:` stage: names → functions.

A task takes a loaded checkpoint and options and returns {result name: metrics}; most return one result, the
`world*` tasks one figure per held-out quantity (danlu.eval.world: value, n, 95% interval, what it counts, on the
dev or test split). Other tasks' metrics are flat numbers (plus optional `examples` and `subjects`), with `random`
beside accuracies where chance is meaningful; danlu.eval.results.as_figure gives them the figure shape.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu import DanluError


@dataclass
class EvalOptions:
    data: str | None = None  # the file/folder a task reads (bpb, mc, gsm8k)
    world: str | None = (
        None  # world tasks: a world or run folder (default: beside the checkpoint, else generated)
    )
    dev: str | None = None  # few-shot source (mc: dev split; gsm8k: train file)
    shots: int = 0
    limit: int = 0  # questions per file/set; 0 = all
    batch_size: int = 16
    max_tokens: int = 256  # gsm8k generation length
    seq_len: int = 256  # bpb window
    seed: int = 0  # the world whose held-out sets to generate when no folder is given
    examples: int = 3  # examples kept per task in the results (questions, predictions, answers)
    encoding: str | None = None  # text encoding of --data/--dev files; None: detected
    split: str = "dev"  # world tasks: held-out rows scored, dev (tune on it) or test (report it)
    dtype: Any = None  # world tasks: autocast dtype (the precision the checkpoint trained at); None: float32
    store: Any = None  # world tasks: the checkpoint's FigureStore, so a quantity already computed is reused
    compile: str = "auto"  # world tasks: decode compiled (auto, on, off; danlu.compiler.compile_decoding)


@dataclass
class Task:
    name: str
    description: str
    run: Callable[[Any, EvalOptions], dict[str, dict[str, Any]]]
    needs_data: bool = False


def _need(opts: EvalOptions, task: str, what: str) -> Path:
    if not opts.data:
        raise DanluError(f"--task {task} needs --data ({what})")
    return Path(opts.data)


def _bpb(ckpt: Any, opts: EvalOptions) -> dict[str, dict[str, Any]]:
    from danlu.eval.bpb import evaluate_bpb

    path = _need(opts, "bpb", "a text file (.txt/.jsonl/.parquet) or a token shard folder")
    max_tokens = opts.limit * opts.seq_len if opts.limit else 200_000
    return {"bpb": evaluate_bpb(ckpt.model, ckpt.tokenizer, path, seq_len=opts.seq_len, batch_size=opts.batch_size,
                                max_tokens=max_tokens)}  # fmt: skip


def _mc(name: str) -> Callable[[Any, EvalOptions], dict[str, dict[str, Any]]]:
    def run(ckpt: Any, opts: EvalOptions) -> dict[str, dict[str, Any]]:
        from danlu.eval.multiple_choice import evaluate_multiple_choice

        path = _need(opts, name, "a C-Eval/CMMLU/MMLU style CSV file or folder")
        res = evaluate_multiple_choice(ckpt.model, ckpt.tokenizer, path, dev=opts.dev, shots=opts.shots,
                                       limit=opts.limit, batch_size=opts.batch_size, keep_examples=opts.examples,
                                       encoding=opts.encoding, task=name)  # fmt: skip
        return {name: res}

    return run


def _gsm8k(ckpt: Any, opts: EvalOptions) -> dict[str, dict[str, Any]]:
    from danlu.eval.generative import gsm8k_accuracy
    from danlu.generate import Generator

    path = _need(opts, "gsm8k", "a JSONL file of {question, answer} with answers ending '#### N'")
    rows = _checked_rows(path, ("question", "answer"), opts.encoding)
    shots_pool = _checked_rows(Path(opts.dev), ("question", "answer"), opts.encoding) if opts.dev else None
    if shots_pool is None:  # shots from the file itself, then evaluate the rest
        shots, rows = rows[: opts.shots], rows[opts.shots :]
    else:
        shots = shots_pool[: opts.shots]
    rows = rows[: opts.limit] if opts.limit else rows
    if not rows:
        raise DanluError(
            f"{path}: no questions left to evaluate after taking {len(shots)} few-shot examples from it"
        )
    res = gsm8k_accuracy(Generator(ckpt.model, ckpt.tokenizer), rows, shots=shots, chat=ckpt.is_chat and not shots,
                         max_tokens=opts.max_tokens, batch_size=opts.batch_size,
                         keep_examples=opts.examples)  # fmt: skip
    return {"gsm8k": res}


def _checked_rows(path: Path, keys: tuple[str, ...], encoding: str | None = None) -> list[dict[str, Any]]:
    """The rows of a task file, each with `keys`; an empty file is an error, never a silent score of 0 on n 0."""
    from danlu.files import Oversized, RecordProblem, located_records

    if not path.is_file():
        raise DanluError(f"{path}: no such file")
    rows = []
    for where, row in located_records(path, encoding=encoding):
        if isinstance(row, Oversized):
            print(f"[danlu] eval: WARNING: {row}", file=sys.stderr)
            continue
        if isinstance(row, RecordProblem):
            raise row
        missing = [k for k in keys if k not in row]
        if missing:
            raise DanluError(
                f"{where}: missing {', '.join(missing)}; the record has fields {', '.join(map(repr, row))}"
            )
        rows.append(row)
    if not rows:
        raise DanluError(f"{path}: empty file (no {'/'.join(keys)} rows to evaluate)")
    return rows


def _world(sets: list[str] | None) -> Callable[[Any, EvalOptions], dict[str, dict[str, Any]]]:
    def run(ckpt: Any, opts: EvalOptions) -> dict[str, dict[str, Any]]:
        from danlu.eval.world import BASE_SETS, CHAT_SETS, evaluate_world

        chosen = sets if sets is not None else BASE_SETS + (CHAT_SETS if ckpt.is_chat else [])
        world = opts.world
        if world is None and (Path(ckpt.path).parent / "world" / "eval" / "facts_base.jsonl").is_file():
            world = str(
                Path(ckpt.path).parent / "world"
            )  # a checkpoint inside a run folder: that run's world
        res = evaluate_world(ckpt.model, ckpt.tokenizer, chosen, data=world, split=opts.split, limit=opts.limit,
                             batch_size=max(opts.batch_size, 1), seed=opts.seed, dtype=opts.dtype,
                             store=opts.store, compile=opts.compile)  # fmt: skip
        return {f"world/{k}": v for k, v in res.items()}

    return run


def registry() -> dict[str, Task]:
    from danlu.eval.world import BASE_SETS, CHAT_SETS, WORLD_SETS, quantities_of

    tasks = [
        Task("bpb", "bits-per-byte and perplexity on a text file or token shard folder (--data)", _bpb, True),
        Task(
            "mc",
            "multiple choice by log-likelihood on C-Eval/CMMLU/MMLU style CSV (--data, --dev, --shots)",
            _mc("mc"),
            True,
        ),
        Task("ceval", "C-Eval CSV (id,question,A..D,answer): multiple choice", _mc("ceval"), True),
        Task("cmmlu", "CMMLU CSV (,Question,A..D,Answer): multiple choice", _mc("cmmlu"), True),
        Task(
            "mmlu",
            "MMLU CSV (question,choice0..3,answer 0-3, or header-less A-D): multiple choice",
            _mc("mmlu"),
            True,
        ),
        Task(
            "gsm8k",
            "GSM8K JSONL: greedy generation, exact match of the '#### N' answer (--data, --shots)",
            _gsm8k,
            True,
        ),
        Task(
            "world",
            "the world corpus' held-out sets: base form, plus chat form for chat models",
            _world(None),
        ),
        Task("world_base", "world held-out sets in base (completion) form", _world(BASE_SETS)),
        Task("world_chat", "world held-out sets in chat form", _world(CHAT_SETS)),
    ]
    tasks += [
        Task(
            f"world/{s}",
            f"world held-out set {s} ({WORLD_SETS[s].form} form): {', '.join(quantities_of(s))}",
            _world([s]),
        )
        for s in WORLD_SETS
    ]
    return {t.name: t for t in tasks}


def task_names() -> list[str]:
    return list(registry())


def get_task(name: str) -> Task:
    reg = registry()
    if name not in reg:
        raise DanluError(f"unknown task {name!r}; valid tasks: {', '.join(reg)}")
    return reg[name]


def run_tasks(ckpt: Any, names: list[str], opts: EvalOptions) -> dict[str, dict[str, Any]]:
    """Runs each named task (all names checked first, so a typo fails before minutes of work)."""
    tasks = [get_task(n) for n in names]
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        results.update(task.run(ckpt, opts))
    return results


MAIN_METRICS = ("accuracy", "bpb")


def table_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    """(task, metric, value, 95% interval, random baseline, n) rows for a terminal or Markdown table."""
    rows = []
    for name, m in results.items():
        if "value" in m:  # a figure (danlu.eval.stats): the world evaluator's shape
            metric, value = m["metric"], m["value"]
        else:
            metric = next((k for k in MAIN_METRICS if k in m), "")
            if not metric:
                continue
            value = m[metric]
        ci = m.get("ci95")
        ci_text = f"{ci[0]:.4f}–{ci[1]:.4f}" if ci and None not in ci else ""
        rand = m.get("random")
        rows.append(
            (
                name,
                metric,
                f"{value:.4f}",
                ci_text,
                "" if rand is None else f"{rand:.4f}",
                str(m.get("n", "")),
            )
        )
        if "perplexity" in m:
            rows.append((name, "perplexity", f"{m['perplexity']:.3f}", "", "", str(m.get("n", ""))))
        for subj, sm in (m.get("subjects") or {}).items():
            if len(m["subjects"]) > 1:
                rows.append((f"  {subj}", "accuracy", f"{sm['accuracy']:.4f}", "", f"{sm['random']:.4f}",
                             str(sm["n"])))  # fmt: skip
        for part, pm in (m.get("parts") or {}).items():
            pci = pm["ci95"]
            rows.append((f"  {part}", pm["metric"], f"{pm['value']:.4f}", f"{pci[0]:.4f}–{pci[1]:.4f}", "",
                         str(pm["n"])))  # fmt: skip
    return rows


def letter_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """For multiple-choice results: the predicted letters' distribution and the chance lines, one line per task, so
    that a model answering mostly one letter is seen without reading the JSON."""
    lines = []
    for name, m in results.items():
        pred = m.get("predicted_letters")
        if not pred:
            continue
        n = max(1, sum(pred.values()))
        dist = " ".join(f"{k} {v / n:.0%}" for k, v in pred.items())
        lines.append(f"{name}: predicted letters {dist}; chance {m['random']:.4f} (uniform), "
                     f"{m['majority_letter']:.4f} (always the commonest answer); n {m['n']}")  # fmt: skip
        if m.get("top_prediction_share", 0) >= 0.5:
            lines[-1] += f"  <- {m['top_prediction_share']:.0%} of answers are one letter"
    return lines


def format_table(
    rows: list[tuple[str, ...]],
    header: tuple[str, ...] = ("task", "metric", "value", "95% CI", "random", "n"),
) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
