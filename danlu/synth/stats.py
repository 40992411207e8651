"""How varied a set of generated texts is: distinct-n, duplicate rate and language mix, plus a synth run's yield.

Why these: a teacher that repeats itself (Self-Instruct's worry, and Magpie's at low temperature) produces data
that adds little, and a loss that looks fine hides it. distinct-n (Li et al. 2016) is the share of unique n-grams
among all n-grams; tokens are those ROUGE-L uses (a Han character each, a lower-cased word of another script
each), so Chinese and English are measured alike. The duplicate rate counts texts equal to an earlier one after
whitespace and case are normalized; the language mix is the share of texts per detected language.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from danlu.data.langid import detect_language
from danlu.synth.rouge import rouge_tokens


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over the texts (n-grams never cross texts); 0.0 when there are none."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        toks = rouge_tokens(t)
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def duplicate_rate(texts: Iterable[str]) -> float:
    """Share of texts that repeat an earlier one (case and whitespace ignored)."""
    seen: set[str] = set()
    dups = total = 0
    for t in texts:
        key = " ".join(t.lower().split())
        total += 1
        dups += key in seen
        seen.add(key)
    return dups / total if total else 0.0


def language_mix(texts: Iterable[str]) -> dict[str, float]:
    """{language: share of texts}, sorted by share; detected as the data pipeline does (danlu.data.langid)."""
    counts = Counter(detect_language(t)[0] for t in texts)
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.most_common()} if total else {}


def text_stats(texts: list[str]) -> dict[str, Any]:
    return {
        "n": len(texts),
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "duplicate_rate": round(duplicate_rate(texts), 4),
        "language_mix": language_mix(texts),
    }


def dialog_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """text_stats of the first user turns (the instructions) and of the last assistant turns (the answers)."""
    users = [next((m["content"] for m in r["messages"] if m["role"] == "user"), "") for r in rows]
    answers = [
        next((m["content"] for m in reversed(r["messages"]) if m["role"] == "assistant"), "") for r in rows
    ]
    return {"instructions": text_stats(users), "answers": text_stats(answers)}


def run_yield(out: str | Path) -> dict[str, Any]:
    """Kept / generated of a `danlu synth` output, from its journal: every candidate is kept or rejected once."""
    from danlu.synth.store import _read_lines, log_path

    lines = _read_lines(log_path(Path(out)))  # read only: no settings check, nothing written
    kept = sum(int(e.get("kept", 0)) for e in lines[1:])
    rejected: Counter[str] = Counter(r["meta"]["failed"] for e in lines[1:] for r in e.get("rejected", []))
    generated = kept + sum(rejected.values())
    return {"generated": generated, "kept": kept, "kept_ratio": round(kept / generated, 4) if generated else 0.0,
            "rejected": dict(rejected.most_common())}  # fmt: skip


def paired_difference(base: list[int], other: list[int]) -> dict[str, Any]:
    """Accuracy difference other - base on the same items, with its 95% interval (normal approximation of the mean
    per-item difference, each in {-1, 0, 1}).

    Why paired: both students answer the same held-out rows, so the item-to-item spread (easy and hard questions)
    cancels; the interval is that of the differences, narrower than two independent binomial intervals.
    """
    if len(base) != len(other):
        raise ValueError(f"paired difference: {len(base)} vs {len(other)} items")
    n = len(base)
    if not n:
        return {"delta": 0.0, "ci95": [0.0, 0.0], "n": 0, "better": 0, "worse": 0}
    d = [b - a for a, b in zip(base, other)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * (var / n) ** 0.5
    return {"delta": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": n,
            "better": d.count(1), "worse": d.count(-1)}  # fmt: skip
