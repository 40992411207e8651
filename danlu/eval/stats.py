"""Figures with their uncertainty: every evaluated quantity carries its row count and a 95% confidence interval.

A held-out accuracy on a few hundred rows moves by several points from sampling alone (200 rows at 50%: ±7 points),
so a difference between two checkpoints means something only next to its interval. Accuracies use the Wilson score
interval: unlike the normal approximation it stays inside [0, 1] and keeps its coverage for small n and for shares
near 0 or 1, which a tiny model's scores often are. Bits per byte is a ratio of sums (nats over bytes), whose
interval comes from the delta method over the rows it was summed on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share `correct / n` (default 95%); (0, 1) when there are no rows."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_interval(
    numerators: Sequence[float], denominators: Sequence[float], z: float = Z95
) -> tuple[float, float, float]:
    """(ratio, low, high) of sum(numerators) / sum(denominators), each pair one sampled unit (a row of text).

    The delta method for a ratio estimator: var ≈ Σ(xᵢ − R·yᵢ)² / (n(n−1)·ȳ²). It is the usual interval for a
    per-byte or per-token rate measured over units of unequal size; with fewer than two units it is unbounded.
    """
    n = len(numerators)
    total_y = float(sum(denominators))
    if n == 0 or total_y <= 0:
        return float("nan"), float("nan"), float("nan")
    ratio = float(sum(numerators)) / total_y
    if n < 2:
        return ratio, float("-inf"), float("inf")
    mean_y = total_y / n
    resid = sum((x - ratio * y) ** 2 for x, y in zip(numerators, denominators))
    half = z * math.sqrt(resid / (n * (n - 1))) / mean_y
    return ratio, ratio - half, ratio + half


def proportion(correct: int, n: int, counts: str, **extra: Any) -> dict[str, Any]:
    """One accuracy figure: value, the rows it counts (n, correct), its 95% Wilson interval and what it counts."""
    lo, hi = wilson_interval(correct, n)
    return {"metric": "accuracy", "value": round(correct / n, 4) if n else 0.0, "n": n, "correct": correct,
            "ci95": [round(lo, 4), round(hi, 4)], "counts": counts, **extra}  # fmt: skip


def mean_of_proportions(figures: Sequence[dict[str, Any]], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of several independent accuracy figures: what a criterion that averages skills (facts,
    arithmetic, tools) is uncertain by.

    The interval is the normal one of an unweighted mean with each share's variance taken at its Agresti–Coull
    estimate p̃ = (k + z²/2) / (n + z²): the plain p(1−p)/n is 0 at 0% or 100% and would claim certainty from a
    handful of rows. It always contains the mean itself."""
    k = len(figures)
    if not k:
        return float("nan"), float("nan"), float("nan")
    mean = sum(f["value"] for f in figures) / k
    var = 0.0
    for f in figures:
        n_adj = max(0, f["n"]) + z * z
        p_adj = (f["value"] * max(0, f["n"]) + z * z / 2) / n_adj
        var += p_adj * (1 - p_adj) / n_adj
    half = z * math.sqrt(var) / k
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def breakdown(
    flags: Sequence[bool], labels: Sequence[str], counts: str, key: str
) -> dict[str, dict[str, Any]]:
    """The same accuracy per label (language, kind, subset…), each with its own n and interval; {} for one label."""
    groups: dict[str, list[bool]] = {}
    for ok, label in zip(flags, labels):
        groups.setdefault(label, []).append(ok)
    if len(groups) < 2:
        return {}
    return {f"{key}={label}": proportion(sum(v), len(v), f"{counts}, {key} {label} only")
            for label, v in sorted(groups.items())}  # fmt: skip
