"""Offline zh/en language identification, script counts, a CJK-aware word tokenizer and a cheap token estimate.

Why not fastText/CLD: they need a model download, and danlu must run offline. Telling Chinese from English (and
from Japanese/Korean/other scripts) is a question of which script dominates, which counting answers reliably.
The word tokenizer matters for two things datatrove does with words: MinHash shingles and the Gopher rules. Its
whitespace/NLTK/spaCy tokenizers either need downloads or leave a Chinese sentence as one "word"; ours makes each
Han character a token and each Latin word a token, so Chinese is shingled by characters.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash
from datatrove.utils.word_tokenizers import WordTokenizer

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_RE = re.compile(f"[{HAN}]")
# one token per Han character (or kana/hangul syllable), one per run of other word characters
_WORD_RE = re.compile(f"[{HAN}\u3040-\u30ff\uac00-\ud7af]|[^\\W{HAN}\u3040-\u30ff\uac00-\ud7af]+")
_SENT_RE = re.compile(r"[^。！？!?.\n]+(?:[。！？!?]+|\.(?=\s|$)|\n|$)[”’\"')）」』]*")

# An English word is ~4.5 letters and one Chinese character is about one word: weigh scripts in "words".
LATIN_LETTERS_PER_WORD = 4.5

# Character classes, looked up for every character of a text at once (numpy) instead of one regex per script.
CLASSES = ("symbol", "space", "han", "latin", "kana", "hangul", "other", "digit")
SYMBOL, SPACE, HAN_C, LATIN, KANA, HANGUL, OTHER, DIGIT = range(len(CLASSES))
LETTERS = (HAN_C, LATIN, KANA, HANGUL, OTHER)


def _class_table() -> np.ndarray:
    t = np.zeros(0x110000, dtype=np.uint8)
    ranges = {
        HAN_C: [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)],
        LATIN: [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)],
        KANA: [(0x3040, 0x30FF)],
        HANGUL: [(0xAC00, 0xD7AF), (0x1100, 0x11FF)],
        OTHER: [
            (0x370, 0x3FF),
            (0x400, 0x4FF),
            (0x590, 0x5FF),
            (0x600, 0x6FF),
            (0x900, 0xDFF),
            (0xE00, 0xE7F),
        ],
        DIGIT: [(0x30, 0x39), (0xFF10, 0xFF19)],
    }
    for cls, spans in ranges.items():
        for a, b in spans:
            t[a : b + 1] = cls
    t[[0xD7, 0xF7]] = SYMBOL  # × and ÷ sit inside Latin-1's letter block
    t[[c for c in range(0x3001) if chr(c).isspace()]] = SPACE
    return t


_TABLE = _class_table()
_last: tuple[str, np.ndarray] | None = None


def char_classes(text: str) -> np.ndarray:
    """Counts of each class in CLASSES for `text`, in one vectorized pass.

    The language filter, the Chinese rules and the token estimate all ask about the same document one after
    another, so the last answer is kept (keyed by the string object itself).
    """
    global _last
    if _last is not None and _last[0] is text:
        return _last[1]
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(_TABLE[codes], minlength=len(CLASSES))
    _last = (text, counts)
    return counts


def script_counts(text: str) -> dict[str, int]:
    c = char_classes(text)
    return {"han": int(c[HAN_C]), "latin": int(c[LATIN]), "kana": int(c[KANA]), "hangul": int(c[HANGUL]), "other": int(c[OTHER])}  # fmt: skip


def detect_language(text: str) -> tuple[str, float]:
    """Returns (lang, confidence): lang in zh, en, ja, ko, other, unknown; confidence = dominant script share."""
    c = char_classes(text)
    han, kana = int(c[HAN_C]), int(c[KANA])
    units = {
        "zh": float(han),
        "en": c[LATIN] / LATIN_LETTERS_PER_WORD,
        "ja": float(kana),
        "ko": float(c[HANGUL]),
        "other": c[OTHER] / LATIN_LETTERS_PER_WORD,
    }
    # Japanese mixes kanji with kana: a text with a real share of kana is Japanese even if Han dominates.
    if kana >= 0.1 * (kana + han) and kana >= 5:
        units["ja"] += units.pop("zh")
    total = sum(units.values())
    if total == 0:
        return "unknown", 0.0
    lang = max(units, key=units.__getitem__)
    return lang, float(units[lang] / total)


def han_ratio(text: str) -> float:
    """Share of Han characters among letters (of any script).

    Digits, punctuation and symbols belong to no language, so they neither dilute nor add to the share: an
    arithmetic worksheet in Chinese is Chinese, a page of English with a few Chinese words is not.
    """
    c = char_classes(text)
    letters = int(c[list(LETTERS)].sum())
    return int(c[HAN_C]) / letters if letters else 0.0


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate: ~1 token per 1.5 Han characters, ~1 per 4 other characters.

    Close to what a byte-level BPE trained on mixed zh/en text gives; stats say when this estimate is used.
    """
    han = int(char_classes(text)[HAN_C])
    return int(round(han / 1.5 + (len(text) - han) / 4.0))


class WordMemo(dict):
    """A per-process memo of a pure function of a word (`compute`), emptied when it reaches `limit` entries.

    A worker meets the same words over and over, so each is looked at once instead of once per occurrence;
    the limit keeps a long run over a vocabulary of URLs, numbers and typos from growing without bound (the
    answers never change, so forgetting them is always safe).
    """

    limit = 2_000_000

    def compute(self, word: str) -> int:
        raise NotImplementedError

    def __missing__(self, word: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        self[word] = value = self.compute(word)
        return value


class _WordHashes(WordMemo):
    def compute(self, word: str) -> int:
        return xxhash.xxh64_intdigest(word.encode("utf-8", "surrogatepass"))


WORD_HASHES = _WordHashes()  # word → 64-bit xxhash, shared by the repetition rules and MinHash


class MixedWordTokenizer(WordTokenizer):
    """Words for datatrove: each Han/kana/hangul character is a token, other scripts split on non-word chars.

    Passed to datatrove steps in place of a language code (`language=MixedWordTokenizer()`), which its
    `load_word_tokenizer` accepts as a custom tokenizer. Needs no model or download.
    """

    def __init__(self) -> None:
        super().__init__("mixed")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD_RE.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENT_RE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for m in _SENT_RE.finditer(text):
            if m.group().strip():
                spans.append((m.start(), m.end()))
        return spans

    def __hash__(self) -> int:  # datatrove caches tokenizers by argument: one entry for all instances
        return hash("danlu.MixedWordTokenizer")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MixedWordTokenizer)
