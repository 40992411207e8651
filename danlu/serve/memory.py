"""Correction memory: users' corrections help at once, before any retraining.

When a user writes the right answer to a question, the (question, correction) pair is remembered. A later
question that matches a remembered one closely gets that exchange placed in its context, as an earlier turn of
the conversation, so even a small model can copy the corrected knowledge. Matching is by character n-gram
overlap (cosine over bigram + trigram counts of the normalized text), which works for Chinese (no spaces) and
English alike and needs no embedding model; the threshold is deliberately high, since a wrong match would put
unrelated "knowledge" in front of the model.

Two things keep the memory safe on a shared server:
- **Scopes.** A correction is remembered in the scope of whoever made it (the request's `user`, else the
  anonymous scope) and recalled only for that scope, plus the SHARED scope, which takes only corrections an
  admin approved. One user's correction never reaches another user's prompt unless someone trusted said so.
- **Bounded cost.** Recall never compares a question against every stored correction: an inverted index maps
  (scope, n-gram) to corrections, and a lookup walks only the postings of the question's rarest n-grams (prefix
  filtering, as in similarity joins: a stored question whose cosine reaches the threshold t must share one of the
  first (1 - t²)·|grams| + 1 rarest grams), reading at most READ_BUDGET posting entries in all. Questions longer than
  MAX_QUESTION_CHARS are neither stored nor looked up: the memory is for short factual questions, and the cap
  keeps a hostile request from costing more than a typical one.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass

_DROP = re.compile(r"[\s\W_]+", re.UNICODE)
SHARED = "*shared*"  # the scope every request also reads; only admin-approved corrections enter it
ANONYMOUS = "anonymous"
MAX_QUESTION_CHARS = 1_000  # normalized characters
READ_BUDGET = 4_096  # posting entries read per lookup, rarest grams first (the newest where one is longer)
MAX_CANDIDATES = 64  # candidates scored exactly


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and spaces removed: 「中国最高的山是什么?」 == 「中国最高的山是什么？」."""
    return _DROP.sub("", unicodedata.normalize("NFKC", text).lower())


def _grams_of(t: str) -> Counter[str]:
    grams: Counter[str] = Counter()
    for n in (2, 3):
        grams.update(t[i : i + n] for i in range(max(len(t) - n + 1, 0)))
    if not grams and t:
        grams[t] = 1
    return grams


def _grams(text: str) -> Counter[str]:
    return _grams_of(normalize(text))


def _cosine(ga: Counter[str], gb: Counter[str]) -> float:
    if not ga or not gb:
        return 0.0
    if len(ga) > len(gb):
        ga, gb = gb, ga
    dot = sum(v * gb[k] for k, v in ga.items() if k in gb)
    return dot / math.sqrt(sum(v * v for v in ga.values()) * sum(v * v for v in gb.values()))


def similarity(a: str, b: str) -> float:
    """Cosine similarity of character 2/3-gram counts, 0..1 (1 = same text up to punctuation and case)."""
    return _cosine(_grams(a), _grams(b))


def scope_of(user: str | None) -> str:
    """The memory scope of a request: its `user` (OpenAI's end-user id), else the anonymous scope."""
    return f"user:{user}" if user else ANONYMOUS


@dataclass(frozen=True)
class Memory:
    question: str
    answer: str
    score: float = 1.0
    scope: str = ANONYMOUS


@dataclass
class _Entry:
    question: str
    answer: str
    grams: Counter[str]
    scope: str


class CorrectionMemory:
    """Thread-safe store of (question, corrected answer) per scope; `recall` returns the best match above
    `threshold` from the caller's scope or the shared one, in time independent of how many are stored."""

    def __init__(self, threshold: float = 0.8):
        if not 0.0 < threshold <= 1.0:
            raise ValueError("memory threshold must be in (0, 1]")
        self.threshold = threshold
        self._entries: list[_Entry | None] = []
        self._by_key: dict[tuple[str, str], int] = {}  # (scope, normalized question) -> entry id
        self._postings: dict[tuple[str, str], list[int]] = {}  # (scope, gram) -> entry ids, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, question: str, answer: str, scope: str = ANONYMOUS) -> bool:
        """Remembers a correction in `scope`; a newer correction of the same question there replaces the older.
        Returns False (and remembers nothing) for an empty answer or a question empty or over the size cap."""
        key = normalize(question)
        if not key or len(key) > MAX_QUESTION_CHARS or not answer.strip():
            return False
        grams = _grams_of(key)
        with self._lock:
            old = self._by_key.get((scope, key))
            if old is not None:
                self._entries[old] = None  # its postings are skipped from now on
            eid = len(self._entries)
            self._entries.append(_Entry(question.strip(), answer.strip(), grams, scope))
            self._by_key[(scope, key)] = eid
            for g in grams:
                self._postings.setdefault((scope, g), []).append(eid)
        return True

    def recall(self, question: str, scope: str = ANONYMOUS) -> Memory | None:
        """The best remembered exchange for `question` in `scope` or the shared scope, or None."""
        key = normalize(question)
        if not key or len(key) > MAX_QUESTION_CHARS:
            return None
        grams = _grams_of(key)
        best: Memory | None = None
        with self._lock:
            for sc in dict.fromkeys((scope, SHARED)):
                for eid in self._candidates(grams, sc):
                    entry = self._entries[eid]
                    if entry is None:
                        continue
                    s = _cosine(grams, entry.grams)
                    if s >= self.threshold and (best is None or s > best.score):
                        best = Memory(entry.question, entry.answer, s, entry.scope)
        return best

    def _candidates(self, grams: Counter[str], scope: str) -> list[int]:
        """Entries sharing one of the query's rarest grams (the prefix filter), those sharing the rarest first."""
        postings = [(len(p), p) for g in grams if (p := self._postings.get((scope, g)))]
        if not postings:
            return []
        postings.sort(key=lambda x: x[0])
        prefix = len(grams) - math.ceil(self.threshold**2 * len(grams)) + 1
        absent = len(grams) - len(postings)  # grams no stored question has: the rarest of all
        weight: dict[int, float] = {}
        budget = READ_BUDGET
        for n, p in postings[: max(1, prefix - absent)]:
            if budget <= 0:
                break
            for eid in p[-budget:]:  # a rare shared gram says more than a common one (IDF-like)
                weight[eid] = weight.get(eid, 0.0) + 1.0 / n
            budget -= n
        return sorted(weight, key=weight.__getitem__, reverse=True)[:MAX_CANDIDATES]


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
