"""Mixing and subset selection: domain weights towards a token budget, with up- and down-sampling.

The plan is made once, globally, from per-document facts gathered during the first pass (domain, language,
tokens, length, a topic key), so workers never need to agree on anything at write time: each document gets a
number of copies (0 = left out). Down-sampling, and the fractional part of up-sampling, pick a representative
subset: the domain's quota is split over (language × length) strata with temperature `balance` (1 =
proportional to size, 0 = equal shares), and inside a stratum documents are taken round-robin over topic groups
(documents sharing a min-hash of their word bigrams), so the subset is diverse rather than near-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LENGTH_BUCKETS = (128, 512, 2048)  # tokens: short < 128 ≤ medium < 512 ≤ long < 2048 ≤ very long


@dataclass
class MixConfig:
    """Recipe `data.mix:`."""

    weights: dict[str, float] = field(default_factory=dict)  # domain → weight; empty: natural proportions
    token_budget: int | None = None  # total output tokens; null: the input's total (weights still apply)
    max_repeat: float = 4.0  # cap on up-sampling; 1 = never repeat (pure subset selection)
    balance: float = 0.5  # temperature over language × length strata inside a domain
    seed: int = 0


def _mix64(x: np.ndarray, seed: int) -> np.ndarray:
    """A cheap deterministic 64-bit hash (splitmix64) for seeded orderings."""
    z = (x.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))) * np.uint64(
        0xBF58476D1CE4E5B9
    )
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(29))


def diverse_order(idx: np.ndarray, topic: np.ndarray, seed: int) -> np.ndarray:
    """`idx` reordered round-robin over topic groups (one per group first, then seconds, …), seeded."""
    if len(idx) == 0:
        return idx
    t = topic[idx]
    h = _mix64(idx, seed)
    order = np.lexsort((h, t))  # by topic, then seeded within topic
    t_sorted = t[order]
    starts = np.r_[0, np.flatnonzero(t_sorted[1:] != t_sorted[:-1]) + 1]
    rank_in_group = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    group_key = _mix64(t_sorted, seed + 1)
    final = np.lexsort((group_key, rank_in_group))
    return idx[order[final]]


def _quotas(sizes: np.ndarray, target: float, balance: float) -> np.ndarray:
    """Split `target` tokens over strata ∝ size**balance, capped at each stratum's size (water-filling)."""
    quotas = np.zeros(len(sizes))
    active = sizes > 0
    left = float(target)
    for _ in range(len(sizes) + 1):
        if left <= 1e-9 or not active.any():
            break
        w = np.where(active, np.power(np.maximum(sizes, 1e-9), balance), 0.0)
        share = left * w / w.sum()
        room = sizes - quotas
        take = np.minimum(share, room)
        quotas += take
        left -= take.sum()
        active &= (sizes - quotas) > 1e-9
    return quotas


def select_subset(
    idx: np.ndarray,
    tokens: np.ndarray,
    strata: np.ndarray,
    topic: np.ndarray,
    target: float,
    balance: float,
    seed: int,
) -> np.ndarray:
    """Indices (from `idx`) of a representative subset with about `target` tokens."""
    if target <= 0 or len(idx) == 0:
        return idx[:0]
    keys = np.unique(strata[idx])
    sizes = np.array([tokens[idx[strata[idx] == k]].sum() for k in keys], dtype=float)
    quotas = _quotas(sizes, target, balance)
    chosen = []
    for k, q in zip(keys, quotas):
        members = diverse_order(idx[strata[idx] == k], topic, seed)
        cum = np.cumsum(tokens[members])
        n = int(np.searchsorted(cum, q, side="left")) + 1 if q > 0 else 0
        chosen.append(members[: min(n, len(members))])
    return np.concatenate(chosen) if chosen else idx[:0]


def plan_mix(
    domain: np.ndarray,
    lang: np.ndarray,
    tokens: np.ndarray,
    topic: np.ndarray,
    keep: np.ndarray,
    cfg: MixConfig,
    domain_names: Sequence[str],
) -> tuple[np.ndarray, dict]:
    """Copies per document (0 for dropped or already removed) and a report per domain.

    Domains and languages come as integer codes numbered in the sorted order of their names (`domain_names[c]`
    is domain code c's name): the plan sees every document of the corpus, and a string per document would cost
    tens of bytes each (danlu.data.dedup.DedupPlan)."""
    n = len(tokens)
    copies = keep.astype(np.int32)
    report: dict = {"domains": {}, "token_budget": cfg.token_budget}
    kept = np.flatnonzero(keep)
    if n == 0 or (not cfg.weights and cfg.token_budget is None):
        for d in np.unique(domain[kept]).tolist() if len(kept) else []:
            t = int(tokens[kept][domain[kept] == d].sum())
            report["domains"][domain_names[d]] = {"tokens_in": t, "tokens_out": t, "rate": 1.0}
        return copies, report
    length_bucket = np.searchsorted(np.array(LENGTH_BUCKETS), tokens, side="right")
    # language × length stratum as one integer (ordered as the "lang|bucket" strings were): no string per document
    lang_code = np.unique(lang, return_inverse=True)[1].reshape(-1).astype(np.int64)
    strata = lang_code * (len(LENGTH_BUCKETS) + 1) + length_bucket
    present = {
        domain_names[d]: int(tokens[kept][domain[kept] == d].sum()) for d in np.unique(domain[kept]).tolist()
    }
    code = {name: c for c, name in enumerate(domain_names)}
    total = sum(present.values())
    weights = (
        {d: float(w) for d, w in cfg.weights.items()}
        if cfg.weights
        else {d: t / total for d, t in present.items()}
    )
    for d in present:
        weights.setdefault(d, 0.0)  # a domain not named in the weights is left out
    missing = sorted(d for d, w in weights.items() if w > 0 and d not in present)
    wsum = sum(w for d, w in weights.items() if d in present)
    budget = float(cfg.token_budget if cfg.token_budget is not None else total)
    for d, t_in in sorted(present.items()):
        members = kept[domain[kept] == code[d]]
        target = budget * weights[d] / wsum if wsum > 0 else 0.0
        rate = target / t_in if t_in else 0.0
        if rate >= 1.0:
            reps = min(rate, cfg.max_repeat)
            full = int(np.floor(reps))
            copies[members] = full
            extra = select_subset(members, tokens, strata, topic, (reps - full) * t_in, cfg.balance, cfg.seed)
            copies[extra] += 1
        else:
            copies[members] = 0
            copies[select_subset(members, tokens, strata, topic, target, cfg.balance, cfg.seed)] = 1
        t_out = int((copies[members] * tokens[members]).sum())
        report["domains"][d] = {
            "tokens_in": int(t_in),
            "target": int(target),
            "tokens_out": t_out,
            "rate": round(t_out / t_in, 4) if t_in else 0.0,
            "docs_in": len(members),
            "docs_out": int((copies[members] > 0).sum()),
        }
    if missing:
        report["missing_domains"] = missing
    return copies, report
