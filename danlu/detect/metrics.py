"""How a detector is judged: AUROC and the true-positive rate at 1% false positives, overall, per language and on
short texts, each with its row counts and a bootstrap interval.

Why these two: AUROC says how well scores rank machine text above human text at every threshold; TPR at 1% FPR is
what matters to a user who must not accuse people wrongly (the operating point Binoculars and DetectGPT report). A
score is "higher = more likely machine" for every detector here (zero-shot scores are oriented to match).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from danlu import DanluError

SHORT_TOKENS = (
    50  # texts with fewer tokens than this are reported apart: detectors are known to be weak on them
)
HUMAN, MACHINE = 0, 1


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise DanluError(f"detector metrics: {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise DanluError("detector metrics: a score is NaN or infinite")
    if set(np.unique(y).tolist()) - {HUMAN, MACHINE}:
        raise DanluError("detector metrics: labels must be 0 (human) or 1 (machine)")
    return s, y


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """P(a random machine text scores above a random human text), ties counting one half (Mann–Whitney U)."""
    s, y = _check(scores, labels)
    pos, neg = s[y == MACHINE], s[y == HUMAN]
    if not len(pos) or not len(neg):
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == MACHINE].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def threshold_at_fpr(human_scores: Sequence[float], fpr: float = 0.01) -> float:
    """The smallest threshold t with at most `fpr` of human texts scoring above t (machine = score > t).

    With fewer than 1/fpr human texts that is the highest human score: no human text may be flagged at all."""
    h = np.sort(np.asarray(human_scores, dtype=np.float64))
    if not len(h):
        raise DanluError("detector metrics: no human texts to set a false-positive threshold on")
    allowed = int(math.floor(fpr * len(h) + 1e-9))  # human texts that may score above the threshold
    return float(h[len(h) - 1 - allowed])


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr: float = 0.01) -> float:
    """Share of machine texts flagged at the threshold that flags at most `fpr` of human texts."""
    s, y = _check(scores, labels)
    pos, neg = s[y == MACHINE], s[y == HUMAN]
    if not len(pos) or not len(neg):
        return math.nan
    return float((pos > threshold_at_fpr(neg, fpr)).mean())


def bootstrap_interval(
    scores: Sequence[float], labels: Sequence[int], metric: Any, rounds: int = 200, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of `metric` over resamples drawn within each class (class sizes kept)."""
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == MACHINE), np.flatnonzero(y == HUMAN)
    if not len(pos) or not len(neg):
        return math.nan, math.nan
    values = []
    for _ in range(rounds):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values.append(metric(s[idx], y[idx]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(scores: Sequence[float], labels: Sequence[int], fpr: float = 0.01) -> dict[str, Any]:
    """AUROC and TPR@FPR with row counts and 95% bootstrap intervals (NaN where a class is absent)."""
    s, y = _check(scores, labels)
    out: dict[str, Any] = {"n_human": int((y == HUMAN).sum()), "n_machine": int((y == MACHINE).sum())}
    if not out["n_human"] or not out["n_machine"]:
        return {**out, "auroc": None, "tpr_at_1fpr": None}
    out["auroc"] = round(auroc(s, y), 4)
    out["auroc_ci95"] = [round(v, 4) for v in bootstrap_interval(s, y, auroc)]
    out["tpr_at_1fpr"] = round(tpr_at_fpr(s, y, fpr), 4)
    out["tpr_at_1fpr_ci95"] = [
        round(v, 4) for v in bootstrap_interval(s, y, lambda a, b: tpr_at_fpr(a, b, fpr))
    ]
    return out


def language_of(text: str) -> str:
    """ "zh" when Han characters are at least a third of the letters, else "en" (the two languages danlu trains)."""
    from danlu.data.langid import han_ratio

    return "zh" if han_ratio(text) >= 1 / 3 else "en"


def report(
    scores: Sequence[float], labels: Sequence[int], texts: Sequence[str], token_counts: Sequence[int]
) -> dict[str, Any]:
    """`summarize` overall, per language and for short texts (< SHORT_TOKENS tokens): the breakdown the issue asks
    for, because detectors fail first on other languages and on short answers."""
    s, y = _check(scores, labels)
    if len(texts) != len(s) or len(token_counts) != len(s):
        raise DanluError("detector metrics: scores, texts and token counts differ in length")
    out = {"all": summarize(s, y)}
    langs = np.array([language_of(t) for t in texts])
    for lang in ("en", "zh"):
        keep = langs == lang
        if keep.any():
            out[lang] = summarize(s[keep], y[keep])
    short = np.asarray(token_counts) < SHORT_TOKENS
    if short.any():
        out[f"short_lt{SHORT_TOKENS}"] = summarize(s[short], y[short])
    return out


def evaluate_scorers(scorers: dict[str, Any], human: list[str], machine: list[str]) -> dict[str, Any]:
    """The metrics report (overall, per language, short texts) of each scorer on one human/machine set."""
    texts = human + machine
    labels = [HUMAN] * len(human) + [MACHINE] * len(machine)
    out: dict[str, Any] = {}
    for name, scorer in scorers.items():
        counts = [len(scorer.tokenizer.backend.encode(t).ids) for t in texts]
        out[name] = report(scorer.scores(texts), labels, texts, counts)
    return out


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| set | slice | detector | AUROC [95% CI] | TPR@1%FPR | human / machine |",
        "|---|---|---|---|---|---|",
    ]
    for setname, by_scorer in results.items():
        for scorer, rep in by_scorer.items():
            for slice_, m in rep.items():
                if m.get("auroc") is None:
                    continue
                ci = m["auroc_ci95"]
                lines.append(f"| {setname} | {slice_} | {scorer} | {m['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                             f"{m['tpr_at_1fpr']:.3f} | {m['n_human']} / {m['n_machine']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
