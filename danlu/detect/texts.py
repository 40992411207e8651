"""The detector's data: labelled texts read from files, checked, split, encoded with a stated truncation policy, and
served to the engine as class-balanced batches.

Policies, stated once here and printed when they act:
- **Text of a record**: the `--text-field` (default `text`); records without it give their answer: `output`
  (alpaca), `completion`, `response`, or the last assistant message of `messages`.
- **Duplicates**: a text that appears under both labels is dropped from both (it cannot teach either); repeats
  within a class are kept once.
- **Balance**: every training batch holds as many human as machine rows (each class is drawn from its own
  shuffled order), so the smaller class is oversampled rather than outvoted. A class more than `max_ratio` times
  smaller than the other is refused: oversampling a handful of texts that much teaches their wording, not
  "machine". An empty class is refused.
- **Truncation**: texts longer than `max_tokens` keep their first `max_tokens` tokens (transformers'
  `truncation=True`, which the saved tokenizer's `model_max_length` makes the pipeline use).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.detect.metrics import HUMAN, MACHINE

LABELS = {HUMAN: "human", MACHINE: "machine"}
ANSWER_FIELDS = ("output", "completion", "response", "answer")


@dataclass
class Text:
    text: str
    label: int
    where: str  # file:line, for messages


def record_answer(record: dict[str, Any], text_field: str, where: str) -> str:
    """The text a record holds (see the module docstring for the fields tried, in order)."""
    from danlu.files import field_value

    value = field_value(record, text_field)
    if value is None:
        for name in ANSWER_FIELDS:
            if isinstance(record.get(name), str):
                value = record[name]
                break
    if value is None and isinstance(record.get("messages"), list):
        turns = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        value = turns[-1].get("content") if turns else None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    if not isinstance(value, str):
        names = ", ".join(repr(k) for k in list(record)[:12]) or "none"
        raise DanluError(f"{where}: no text in field {text_field!r} (nor {', '.join(ANSWER_FIELDS)} or an "
                         f"assistant message); the record has fields {names} (choose one with --text-field)")  # fmt: skip
    return value


def read_texts(paths: list[str | Path], label: int, text_field: str = "text") -> list[Text]:
    """Texts of files and folders (JSONL/JSON/Parquet/CSV/TXT, as danlu.files reads them); blank texts skipped."""
    from danlu.files import expand_inputs, located_records

    out: list[Text] = []
    for path in expand_inputs(paths):
        for where, rec in located_records(path, text_field=text_field):
            if isinstance(rec, DanluError):
                raise rec
            if not isinstance(rec, dict):  # Oversized: far beyond any context; skipped with a line saying so
                print(f"[danlu] detect: skipped {rec}")
                continue
            text = record_answer(rec, text_field, where).strip()
            if text:
                out.append(Text(text, label, where))
    return out


def clean_classes(human: list[Text], machine: list[Text], max_ratio: float) -> tuple[list[Text], list[Text]]:
    """Each class deduplicated, texts found in both dropped, then the balance rule checked (module docstring)."""

    def unique(rows: list[Text]) -> list[Text]:
        seen: set[str] = set()
        return [r for r in rows if not (r.text in seen or seen.add(r.text))]

    human, machine = unique(human), unique(machine)
    both = {r.text for r in human} & {r.text for r in machine}
    if both:
        print(f"[danlu] detect: {len(both)} text(s) appear as both human and machine; dropped from both")
        human = [r for r in human if r.text not in both]
        machine = [r for r in machine if r.text not in both]
    for name, rows in (("human", human), ("machine", machine)):
        if not rows:
            raise DanluError(f"detect: no {name} texts (after dropping blanks and texts found in both classes); "
                             "a detector needs examples of both")  # fmt: skip
    small, large = sorted([("human", len(human)), ("machine", len(machine))], key=lambda x: x[1])
    if large[1] > max_ratio * small[1]:
        raise DanluError(
            f"detect: {small[1]} {small[0]} texts against {large[1]} {large[0]} texts, more than {max_ratio:g}× "
            f"fewer; batches are balanced by oversampling the smaller class, and that much oversampling learns those "
            f"few texts rather than the class. Add {small[0]} texts (or --generate-with for machine text), or raise "
            "max_ratio=… if you accept it"
        )
    return human, machine


def split(rows: list[Text], share: float, seed: int) -> tuple[list[Text], list[Text]]:
    """(train, held out): a seeded shuffle, `share` of the rows (at least one, never all) held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(share * len(rows))), len(rows) - 1) if share > 0 and len(rows) > 1 else 0
    held = [rows[i] for i in order[:n_held]]
    return [rows[i] for i in order[n_held:]], held


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids as transformers' tokenizer gives them (its post-processor applied: a bos where the model has one), so
    danlu and `pipeline("text-classification")` see the same tokens."""
    return tokenizer.backend.encode(text, add_special_tokens=True).ids


def encode_truncated(tokenizer: Any, texts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Each text's ids cut to its first `max_tokens` (the truncation policy), and how many were cut."""
    rows, cut = [], 0
    for t in texts:
        ids = encode(tokenizer, t)
        if len(ids) > max_tokens:
            ids, cut = ids[:max_tokens], cut + 1
        if not ids:
            raise DanluError(f"detect: the text {t[:40]!r} gives no tokens")
        rows.append(ids)
    return rows, cut


def pad_right(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


class BalancedBatches:
    """The engine's data source: each batch is batch_size/2 human and batch_size/2 machine rows, each class read
    from its own seeded shuffle, epoch after epoch (so the smaller class repeats sooner). Its position is part of
    the checkpoint, for exact resume.

    Under torchrun each of the `world_size` ranks takes its own slice of every global batch of batch_size ×
    world_size rows (rank r the r-th batch_size/2 of each class), as the other sources do (`data.shards.RowOrder`,
    `data.preference.PairBatches`): N processes read, together, exactly the rows one process with batch N × B reads,
    so they train the same model."""

    def __init__(self, human: list[list[int]], machine: list[list[int]], batch_size: int, pad_id: int,
                 seed: int, *, rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        if batch_size < 2 or batch_size % 2:
            raise DanluError(f"detect: batch_size {batch_size} must be even (half human, half machine)")
        self.classes, self.half, self.pad_id, self.seed = (human, machine), batch_size // 2, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global batches read (the same on every rank)

    def _take(self, label: int, k: int) -> list[int]:
        rows = self.classes[label]
        epoch, i = divmod(k, len(rows))
        order = list(range(len(rows)))
        random.Random(self.seed * 1_000_003 + epoch * 2 + label).shuffle(order)
        return rows[order[i]]

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = (self.position * self.world_size + self.rank) * self.half
        self.position += 1
        rows, labels = [], []
        for label in (HUMAN, MACHINE):
            for k in range(start, start + self.half):
                rows.append(self._take(label, k))
                labels.append(label)
        return {"input_ids": pad_right(rows, self.pad_id), "labels": torch.tensor(labels)}

    def state_dict(self) -> dict[str, Any]:
        from danlu.data.position import batch_state

        return {"position": self.position, "sizes": [len(c) for c in self.classes],
                **batch_state(2 * self.half, self.world_size)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved position after checking the texts are the same and the position holds for this
        run's global batch (`data.position.check_global_batch`, the other sources' check and wording)."""
        from danlu.data.position import check_global_batch

        sizes = [len(c) for c in self.classes]
        if state.get("sizes") != sizes:
            raise DanluError(f"--resume: the checkpoint was trained on {state.get('sizes')} human/machine texts, "
                             f"this data has {sizes}")  # fmt: skip
        check_global_batch(state, 2 * self.half, self.world_size, "detect data", unit="texts", rank=self.rank)
        self.position = int(state["position"])
