"""The filters a generated instruction (or user turn) and its answer must pass, in the order they are tried.

Self-Instruct's rules, made bilingual: length in words (a Han character counts as a word), the language the user
asked for, blocked words that point at things a text model cannot do (images, files, audio — Self-Instruct's
list plus its Chinese counterparts), output that is not what was asked for (empty, cut off at the token limit,
leaked template tokens, starting with punctuation), and last, because it is the expensive one, ROUGE-L > 0.7
against every instruction kept so far. Each check returns the name of the filter that failed and why, so every
row can record what it passed or failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from danlu.data.langid import detect_language
from danlu.synth.rouge import RougeIndex, rouge_tokens

BLOCKED_EN = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
              "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # fmt: skip
BLOCKED_ZH = (
    "图片",
    "图像",
    "照片",
    "视频",
    "音频",
    "音乐",
    "文件",
    "地图",
    "流程图",
    "图表",
    "画一",
    "绘制",
)
TEMPLATE_MARKS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "[INST]",
)
INSTRUCTION_FILTERS = ("malformed", "length", "language", "blocked_words", "rouge_l")
ANSWER_FILTERS = ("answer_malformed", "answer_length")

Verdict = tuple[str, str] | None  # (failed filter, why) or None when all passed


def passed_before(verdict: Verdict, order: tuple[str, ...] = INSTRUCTION_FILTERS) -> list[str]:
    """The filters of `order` a text passed: all of them, or those tried before the one it failed."""
    if verdict is None:
        return list(order)
    return list(order[: order.index(verdict[0])]) if verdict[0] in order else []


@dataclass
class Filters:
    min_words: int = 3
    max_words: int = 150
    max_answer_words: int = 2000
    languages: frozenset[str] | None = None  # None: any language
    blocked: tuple[str, ...] = BLOCKED_EN + BLOCKED_ZH
    rouge_threshold: float = 0.7
    _blocked_re: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def blocked_word(self, text: str) -> str | None:
        if not self.blocked:
            return None
        if self._blocked_re is None:
            # Latin words match as whole words ("file" not in "profile"); Chinese words as substrings
            parts = [rf"\b{re.escape(w)}\b" if w.isascii() else re.escape(w) for w in self.blocked]
            self._blocked_re = re.compile("|".join(parts), re.IGNORECASE)
        m = self._blocked_re.search(text)
        return m.group(0) if m else None

    def instruction(self, text: str, finish_reason: str, index: RougeIndex) -> Verdict:
        """Checks a new instruction; the caller adds it to `index` when it passes."""
        t = text.strip()
        why = _malformed(t, finish_reason)
        if why:
            return "malformed", why
        if not (t[0].isalnum() or "\u4e00" <= t[0] <= "\u9fff"):
            return "malformed", f"starts with {t[0]!r}"
        words = len(rouge_tokens(t))
        if not self.min_words <= words <= self.max_words:
            return "length", f"{words} words, not in [{self.min_words}, {self.max_words}]"
        if self.languages is not None:
            lang, _ = detect_language(t)
            if lang not in self.languages:
                return "language", f"{lang}, not one of {', '.join(sorted(self.languages))}"
        word = self.blocked_word(t)
        if word:
            return "blocked_words", f"contains {word!r}"
        score, other = index.most_similar(t, self.rouge_threshold)
        if score > self.rouge_threshold:
            return "rouge_l", f"{score:.3f} > {self.rouge_threshold} against {other!r}"
        return None

    def answer(self, text: str, finish_reason: str) -> Verdict:
        t = text.strip()
        why = _malformed(t, finish_reason)
        if why:
            return "answer_malformed", why
        words = len(rouge_tokens(t))
        if words > self.max_answer_words:
            return "answer_length", f"{words} words > {self.max_answer_words}"
        return None


def _malformed(text: str, finish_reason: str) -> str | None:
    """Why a teacher's output is not text at all (empty, cut off, template tokens, broken UTF-8), or None."""
    if finish_reason == "too_long":  # nothing was generated: the prompt itself did not fit
        return "the prompt exceeds the teacher's context"
    if not text:
        return "empty text"
    if finish_reason == "length":
        return "cut off (length)"
    mark = next((m for m in TEMPLATE_MARKS if m in text), None)
    if mark:
        return f"contains the template token {mark}"
    if "\ufffd" in text:  # a byte-level model that stopped inside a character, or wrote invalid UTF-8
        return "contains U+FFFD (broken UTF-8)"
    return None
