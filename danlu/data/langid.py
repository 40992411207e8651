"""Offline zh/en language identification, script counts, a CJK-aware word tokenizer and a cheap token estimate.

Why not fastText/CLD: they need a model download, and danlu must run offline. Telling Chinese from English (and
from Japanese/Korean/other scripts) is a question of which script dominates, which counting answers reliably.
The word tokenizer matters for two things datatrove does with words: MinHash shingles and the Gopher rules. Its
whitespace/NLTK/spaCy tokenizers either need downloads or leave a Chinese sentence as one "word"; ours makes each
Han character a token and each Latin word a token, so Chinese is shingled by characters.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WordTokenizer

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_RE = re.compile(f"[{HAN}]")
_LATIN_RE = re.compile(r"[A-Za-z\u00c0-\u024f]")
_KANA_RE = re.compile(r"[\u3040-\u30ff]")
_HANGUL_RE = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
_OTHER_LETTER_RE = re.compile(
    r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u05ff\u0600-\u06ff\u0900-\u0dff\u0e00-\u0e7f]"
)
# one token per Han character (or kana/hangul syllable), one per run of other word characters
_WORD_RE = re.compile(f"[{HAN}\u3040-\u30ff\uac00-\ud7af]|[^\\W{HAN}\u3040-\u30ff\uac00-\ud7af]+")
_SENT_RE = re.compile(r"[^。！？!?.\n]+(?:[。！？!?]+|\.(?=\s|$)|\n|$)[”’\"')）」』]*")

# An English word is ~4.5 letters and one Chinese character is about one word: weigh scripts in "words".
LATIN_LETTERS_PER_WORD = 4.5


def script_counts(text: str) -> dict[str, int]:
    return {
        "han": len(_HAN_RE.findall(text)),
        "latin": len(_LATIN_RE.findall(text)),
        "kana": len(_KANA_RE.findall(text)),
        "hangul": len(_HANGUL_RE.findall(text)),
        "other": len(_OTHER_LETTER_RE.findall(text)),
    }


def detect_language(text: str) -> tuple[str, float]:
    """Returns (lang, confidence): lang in zh, en, ja, ko, other, unknown; confidence = dominant script share."""
    c = script_counts(text)
    units = {
        "zh": c["han"],
        "en": c["latin"] / LATIN_LETTERS_PER_WORD,
        "ja": c["kana"] * 1.0,
        "ko": c["hangul"] * 1.0,
        "other": c["other"] / LATIN_LETTERS_PER_WORD,
    }
    # Japanese mixes kanji with kana: a text with a real share of kana is Japanese even if Han dominates.
    if c["kana"] >= 0.1 * (c["kana"] + c["han"]) and c["kana"] >= 5:
        units["ja"] += units.pop("zh")
    total = sum(units.values())
    if total == 0:
        return "unknown", 0.0
    lang = max(units, key=units.__getitem__)
    return lang, units[lang] / total


def han_ratio(text: str) -> float:
    """Share of Han characters among non-space characters."""
    visible = sum(1 for ch in text if not ch.isspace())
    return len(_HAN_RE.findall(text)) / visible if visible else 0.0


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate: ~1 token per 1.5 Han characters, ~1 per 4 other characters.

    Close to what a byte-level BPE trained on mixed zh/en text gives; stats say when this estimate is used.
    """
    han = len(_HAN_RE.findall(text))
    return int(round(han / 1.5 + (len(text) - han) / 4.0))


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
