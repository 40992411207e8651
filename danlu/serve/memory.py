"""Correction memory: users' corrections help at once, before any retraining.

When a user writes the right answer to a question, the (question, correction) pair is remembered. A later
question that matches a remembered one closely gets that exchange placed in its context, as an earlier turn of
the conversation, so even a small model can copy the corrected knowledge. Matching is by character n-gram
overlap (cosine over bigram + trigram counts of the normalized text), which works for Chinese (no spaces) and
English alike and needs no embedding model; the threshold is deliberately high, since a wrong match would put
unrelated "knowledge" in front of the model.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass

_DROP = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and spaces removed: 「中国最高的山是什么?」 == 「中国最高的山是什么？」."""
    return _DROP.sub("", unicodedata.normalize("NFKC", text).lower())


def _grams(text: str) -> Counter[str]:
    t = normalize(text)
    grams: Counter[str] = Counter()
    for n in (2, 3):
        grams.update(t[i : i + n] for i in range(max(len(t) - n + 1, 0)))
    if not grams and t:
        grams[t] = 1
    return grams


def similarity(a: str, b: str) -> float:
    """Cosine similarity of character 2/3-gram counts, 0..1 (1 = same text up to punctuation and case)."""
    ga, gb = _grams(a), _grams(b)
    if not ga or not gb:
        return 0.0
    dot = sum(v * gb[k] for k, v in ga.items() if k in gb)
    return dot / math.sqrt(sum(v * v for v in ga.values()) * sum(v * v for v in gb.values()))


@dataclass(frozen=True)
class Memory:
    question: str
    answer: str
    score: float = 1.0


class CorrectionMemory:
    """Thread-safe list of (question, corrected answer); `recall` returns the best match above `threshold`."""

    def __init__(self, threshold: float = 0.8):
        if not 0.0 < threshold <= 1.0:
            raise ValueError("memory threshold must be in (0, 1]")
        self.threshold = threshold
        self._items: dict[str, Memory] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, question: str, answer: str) -> None:
        """Remembers a correction; a newer correction of the same question replaces the older one."""
        if not normalize(question) or not answer.strip():
            return
        with self._lock:
            self._items[normalize(question)] = Memory(question.strip(), answer.strip())

    def recall(self, question: str) -> Memory | None:
        with self._lock:
            items = list(self._items.values())
        best: Memory | None = None
        for m in items:
            s = similarity(question, m.question)
            if s >= self.threshold and (best is None or s > best.score):
                best = Memory(m.question, m.answer, s)
        return best


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""


def with_memory(messages: list[dict], memory: Memory) -> list[dict]:
    """The recalled exchange inserted as an earlier turn, after any system messages."""
    k = 0
    while k < len(messages) and messages[k].get("role") == "system":
        k += 1
    recalled = [{"role": "user", "content": memory.question}, {"role": "assistant", "content": memory.answer}]
    return [*messages[:k], *recalled, *messages[k:]]
