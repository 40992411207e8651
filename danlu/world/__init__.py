"""The built-in world corpus: a small bilingual world of true facts, written as a real crawl and as dialogs.

`build_world(out, seed, scale)` writes facts.jsonl, pretrain.jsonl, pretrain_val.jsonl (no sentence of
pretrain.jsonl), pretrain_val_seen.jsonl (the seen sentences cut from it), sft.jsonl, preference.jsonl, rl.jsonl,
eval/*.jsonl (held-out, each row in a "dev" or "test" split) and stats.json; it is what `danlu run` trains on when
the user brings no data, so a laptop can build a working chat model with no download.
"""

from __future__ import annotations

from typing import Any

from danlu.world.build import build_world, flat_metrics, format_stats
from danlu.world.facts import RELATIONS, Fact, build_facts


def load_facts(path: Any = None) -> list[Fact]:
    """The world's facts: built in memory, or read back from a facts.jsonl written by `build_world`."""
    if path is None:
        return build_facts()
    import dataclasses

    from danlu import DanluError
    from danlu.files import read_records

    known = {f.id: f for f in build_facts()}
    out = []
    for i, rec in enumerate(read_records(path), 1):
        try:
            fields = {
                k: str(rec[k])
                for k in ("id", "relation", "subject_zh", "subject_en", "object_zh", "object_en")
            }
            aliases = {k: tuple(map(str, rec.get(k) or ())) for k in ("aliases_zh", "aliases_en")}
        except KeyError as e:
            raise DanluError(f"{path}: fact {i}: missing key {e.args[0]!r}") from None
        base = known.get(fields["id"]) or Fact(**fields, kind="", subject_key="")
        out.append(dataclasses.replace(base, **fields, **aliases))
    return out


__all__ = ["RELATIONS", "Fact", "build_facts", "build_world", "flat_metrics", "format_stats", "load_facts"]
