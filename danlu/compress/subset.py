"""A calibration / distillation subset that is representative and diverse (Minitron measures importance on ~1k rows).

Representative: documents are grouped by (domain, language, length bucket) and picked round-robin across groups, at
random within each, so a small subset covers every kind of text instead of mirroring the largest one. Diverse: a
document whose MinHash signature is within `threshold` estimated Jaccard similarity of one already picked is
skipped. Shingles and word hashes are the data pipeline's (`danlu.data.dedup.word_hashes` / `ngram_hashes`), so
"near-duplicate" means here what it means in `danlu data`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from danlu import DanluError


@dataclass
class SubsetConfig:
    """Recipe `compress.subset:`."""

    enabled: bool = True
    rows: int = 1024  # documents in the subset
    threshold: float = (
        0.8  # estimated Jaccard similarity at or above which a document counts as a near-duplicate
    )
    n_grams: int = 5
    num_hashes: int = 64
    text_field: str = "text"
    seed: int = 0


def _signature(text: str, n_grams: int, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """MinHash over the document's word n-grams ((h·a + b) mod p, minimum per hash function); None if too short."""
    from danlu.data.dedup import _MERSENNE, ngram_hashes, word_hashes

    shingles = ngram_hashes(word_hashes(text), n_grams)
    if len(shingles) == 0:
        return None
    phv = (shingles[:, None] * a + b) % _MERSENNE
    return phv.min(axis=0)


def stratum(row: dict[str, Any], text: str) -> tuple[str, str, int]:
    """(domain, language, length bucket): the groups a subset balances. Length buckets are powers of two of chars."""
    from danlu.data.langid import detect_language

    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    domain = str(row.get("domain") or meta.get("domain") or row.get("source") or meta.get("source") or "-")
    lang = str(row.get("lang") or meta.get("lang") or detect_language(text)[0])
    return domain, lang, int(math.log2(max(1, len(text))))


def select_subset(
    rows: Iterable[dict[str, Any]], cfg: SubsetConfig, where: str = "subset"
) -> tuple[list[dict], dict]:
    """The subset's rows and a report: rows seen, picked, near-duplicates skipped, picks per domain and language."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    seen = 0
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
            raise DanluError(f"{where}: row {i} has no text field {cfg.text_field!r}")
        seen += 1
        groups[stratum(row, row[cfg.text_field])].append(row)
    if not seen:
        raise DanluError(f"{where}: no rows to select from")
    rng = np.random.default_rng(cfg.seed)
    queues = {k: [v[j] for j in rng.permutation(len(v))] for k, v in sorted(groups.items())}
    params = np.random.default_rng([cfg.seed, 1]).integers(
        1, (1 << 61) - 1, size=(2, cfg.num_hashes), dtype=np.uint64
    )
    bands = max(1, cfg.num_hashes // 4)  # LSH: 4 hashes per band find candidates, full signatures decide
    buckets: dict[tuple, list[int]] = defaultdict(list)
    picked: list[dict] = []
    signatures: list[np.ndarray] = []
    skipped = 0
    while len(picked) < cfg.rows and any(queues.values()):
        for key in list(queues):
            if len(picked) >= cfg.rows:
                break
            if not queues[key]:
                continue
            row = queues[key].pop()
            sig = _signature(row[cfg.text_field], cfg.n_grams, params[0], params[1])
            if sig is not None:
                keys = [(j, sig[j * 4 : j * 4 + 4].tobytes()) for j in range(bands)]
                candidates = {c for k in keys for c in buckets.get(k, [])}
                if any(float((signatures[c] == sig).mean()) >= cfg.threshold for c in candidates):
                    skipped += 1
                    continue
                for k in keys:
                    buckets[k].append(len(signatures))
                signatures.append(sig)
            picked.append(row)
    report = {
        "rows_seen": seen, "rows_picked": len(picked), "near_duplicates_skipped": skipped, "groups": len(groups),
        "by_domain": _counts(picked, groups, 0), "by_lang": _counts(picked, groups, 1),
    }  # fmt: skip
    return picked, report


def _counts(picked: list[dict], groups: dict[tuple, list[dict]], part: int) -> dict[str, int]:
    owner = {id(r): k for k, rows in groups.items() for r in rows}
    out: dict[str, int] = defaultdict(int)
    for r in picked:
        out[owner[id(r)][part]] += 1
    return dict(sorted(out.items()))
