"""The pretraining validation text: documents of the training kinds that share no sentence with the training text.

Why: the world's documents are templated, so a held-out *document* is mostly made of sentences the model read
verbatim in training (at seed 0, scale 1, 76% of the sentences of whole held-out documents were). Its bits per
byte then measured recall. Here every sentence of a drafted document that pretraining text also holds
(`danlu.world.sentences`) is cut out, and drafting goes on until the kept text is as large as the validation share
asks; what is left is new sentences about known things (new dates, numbers, combinations), so its bits per byte
measure generalization. The sentences cut out are kept as a separate, labelled seen-sentence text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from danlu import DanluError
from danlu.world.documents import Doc, DocWriter
from danlu.world.index import World
from danlu.world.sentences import keep_unseen

MAX_DRAFTS_PER_DOC = 200  # drafts allowed per kept document before giving up (the world would be degenerate)


@dataclass
class ValText:
    """Kept documents (no sentence seen in training), the seen sentences cut from them, and the counts."""

    unseen: list[Doc] = field(default_factory=list)
    seen: list[Doc] = field(default_factory=list)
    drafted_docs: int = 0
    drafted_sentences: int = 0
    dropped_sentences: int = 0

    def stats(self) -> dict[str, int]:
        return {
            "drafted_docs": self.drafted_docs,
            "drafted_sentences": self.drafted_sentences,
            "dropped_seen_sentences": self.dropped_sentences,
            "kept_sentences": self.drafted_sentences - self.dropped_sentences,
        }


def draft_val_text(
    world: World,
    seed: int,
    weights: dict[str, float],
    make: Any,
    train_keys: set[str],
    min_docs: int,
    min_chars: int,
) -> ValText:
    """Drafts documents with their own random stream (`make(writer, kind, lang)`, kinds drawn by `weights`) and
    keeps each one's unseen sentences, until at least `min_docs` documents and `min_chars` characters are kept."""
    rng = random.Random(f"{seed}:pretrain_val")
    writer = DocWriter(world, rng)
    kinds = list(weights)
    out = ValText()
    chars = 0
    while len(out.unseen) < min_docs or chars < min_chars:
        if out.drafted_docs > MAX_DRAFTS_PER_DOC * (len(out.unseen) + 1):
            raise DanluError(
                f"world: validation text: {out.drafted_docs} drafted documents left only {len(out.unseen)} with "
                "a sentence unseen in training"
            )
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        doc = make(writer, kind, rng.choice(("zh", "en")))
        out.drafted_docs += 1
        kept, cut, n_kept, n_cut = keep_unseen(doc["text"], train_keys)
        out.drafted_sentences += n_kept + n_cut
        out.dropped_sentences += n_cut
        if kept:
            out.unseen.append({**doc, "text": kept})
            chars += len(kept)
        if cut:
            out.seen.append({**doc, "text": cut})
    return out
