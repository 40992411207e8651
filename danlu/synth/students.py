"""The students of the synth experiment: fine-tuned by `danlu sft` on given data, scored row by row on held-out sets.

Why row by row: two students answer the same held-out rows, so their difference is paired item by item
(danlu.synth.stats.paired_difference), a narrower interval than two independent accuracies. Training and scoring are
the slow parts of the experiment, so both are skipped when a marker says they were done on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import read_records, write_json_atomic
from danlu.sft_process import inputs_signature


def first_user(row: dict[str, Any]) -> str:
    """The first user turn's text of a dialog or held-out row ("" when there is none)."""
    return next((str(m["content"]) for m in row["messages"] if m["role"] == "user"), "")


def split_of(row: dict[str, Any]) -> str:
    """The row's `split`, or for a world built before splits the hash fallback: the first byte of sha256(first user
    turn) even → dev, odd → test."""
    if row.get("split") in ("dev", "test"):
        return str(row["split"])
    return "dev" if hashlib.sha256(first_user(row).encode()).digest()[0] % 2 == 0 else "test"


def eval_rows(eval_dir: Path, name: str, split: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    """The held-out rows of one set in the split, and how the split was made: "field" (the world's own split, read
    by danlu.eval.world.split_rows) or "hash" (a world without splits, where split_rows counts every row as dev:
    this experiment tunes on some rows and reports others, so it divides such rows by `split_of`)."""
    from danlu.eval.world import WORLD_SETS, split_rows

    path = eval_dir / WORLD_SETS[name].file
    if not path.is_file():
        raise DanluError(f"synth: {path} is missing (held-out set {name})")
    rows = [r for r in read_records(path) if isinstance(r, dict)]
    if rows and all("split" in r for r in rows):
        if split == "all":
            return (rows[:limit] if limit else rows), "field"
        return split_rows(eval_dir, WORLD_SETS[name].file, split, limit), "field"
    if split != "all":
        rows = [r for r in rows if split_of(r) == split]
    return (rows[:limit] if limit else rows), "hash"


def score(
    checkpoint: Path, rows_by_set: dict[str, list[dict[str, Any]]], batch_size: int = 32
) -> dict[str, Any]:
    """Greedy answers of a chat checkpoint on each set (danlu.eval.world's generation length and matcher), with
    each row's correctness for the paired comparison."""
    import torch

    from danlu.eval.generative import completion_flags, contains_answer, final_number_matches
    from danlu.eval.world import WORLD_SETS
    from danlu.generate import Generator
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(checkpoint, quiet=True)
    gen = Generator(ckpt.model.eval(), ckpt.tokenizer)
    out: dict[str, Any] = {}
    for name, rows in rows_by_set.items():
        spec = WORLD_SETS[name]
        match = final_number_matches if spec.how == "final_number" else contains_answer
        with torch.no_grad():
            flags, texts, n_cut = completion_flags(gen, rows, chat=True, max_tokens=spec.max_tokens,
                                                   batch_size=batch_size, match=match, task=f"synth/{name}")  # fmt: skip
        items = [int(f) for f in flags]
        examples = [{"prompt": first_user(r), "completion": t, "correct": bool(f)}
                    for r, t, f in list(zip(rows, texts, flags))[:3]]  # fmt: skip
        out[name] = {"accuracy": round(sum(items) / len(items), 4), "n": len(items), "prompts_truncated": n_cut,
                     "items": items, "examples": examples}  # fmt: skip
    return out


def cached_score(
    checkpoint: Path, cache: Path, rows_by_set: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """`score`, read back from `cache` when it was computed on the same rows for the same weights."""
    weights = checkpoint / "model.safetensors"
    key = {"rows": inputs_signature([], rows_by_set),
           "weights": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None}  # fmt: skip
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["scores"]
    scores = score(checkpoint, rows_by_set)
    write_json_atomic(cache, {"key": key, "scores": scores})
    return scores
