"""ROUGE-L between instructions, and the near-duplicate index Self-Instruct filters new instructions with.

Why our own: `rouge_score` splits on whitespace after dropping non-ASCII, so a Chinese sentence scores as zero
tokens (or one). Here each Han character is a token and each Latin word is one (the CJK-aware word splitter of
danlu/data/langid.py), lower-cased, punctuation dropped: Chinese is scored by characters, English by words.

Why bit-parallel: Self-Instruct compares every candidate with every kept instruction (52k of them in Alpaca), so
the LCS is the inner loop. Hyyrö's bit-vector LCS does one big-integer step per token of one string instead of a
row of a dynamic-programming table, about two orders of magnitude less Python work per pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from danlu.data.langid import MixedWordTokenizer

_WORDS = MixedWordTokenizer()


def rouge_tokens(text: str) -> list[str]:
    """Han characters and lower-cased words of other scripts, without punctuation."""
    return _WORDS.word_tokenize(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (Hyyrö 2004: bit i of V is 0 where a[i] is in the LCS so far)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (symmetric: precision and recall swap with the arguments)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    return 2 * lcs / (len(a) + len(b))  # = 2PR/(P+R) with P = lcs/len(b), R = lcs/len(a)


class RougeIndex:
    """Kept instructions, and the most similar one to a candidate (ROUGE-L F1), with a length bound as shortcut.

    F1 = 2·lcs/(m+n) ≤ 2·min(m, n)/(m+n): pairs whose lengths alone keep them at or below the threshold are
    never compared.
    """

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._tokens.append(rouge_tokens(text))

    def most_similar(self, text: str, threshold: float = 0.0) -> tuple[float, str | None]:
        """(best score, that text) over the kept texts; pairs that cannot exceed `threshold` are skipped."""
        cand = rouge_tokens(text)
        n = len(cand)
        best, best_text = 0.0, None
        for other, toks in zip(self.texts, self._tokens):
            m = len(toks)
            if not m or not n or 2 * min(m, n) / (m + n) <= max(threshold, best):
                continue
            score = rouge_l(cand, toks)
            if score > best:
                best, best_text = score, other
        return best, best_text
