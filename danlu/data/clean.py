"""Cleaning: Unicode normalization, control characters, leftover markup, whitespace, Traditional → Simplified
Chinese (optional), boilerplate lines and masking of e-mail addresses, phone numbers and ID numbers.

Code is kept as written (fenced and <pre> blocks untouched, indentation kept where a text carries code), HTML
becomes lines of text (block tags end lines), and every kind of edit is counted (stats.md, "Cleaning edits").

Normalization is NFC plus full-width ASCII → ASCII, not NFKC: NFKC would also turn Chinese full-width
punctuation (，？！：) into ASCII, which changes how Chinese text reads and tokenizes. Conversations
(`messages`) are cleaned turn by turn with the same rules, so SFT data gets the same masking as pretraining text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from danlu.data.langid import estimate_tokens

_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if chr(c - 0xFEE0).isalnum()}
_FULLWIDTH[0x3000] = 0x20  # ideographic space
_HAS_FULLWIDTH = re.compile("[" + "".join(map(chr, sorted(_FULLWIDTH))) + "]")
_THREE_DIGITS = re.compile(r"\d{3}")  # every phone and ID pattern below has three digits in a row
_CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060\ufeff\u00ad]"
)
_TAG = re.compile(r"</?(?:p|div|span|br|a|b|i|u|em|strong|font|img|li|ul|ol|table|tr|td|th|h[1-6]|script|style|html|head|body|title|meta|link|section|article|header|footer|nav|blockquote|pre|code|hr|small|sup|sub)\b[^<>]*>|<!doctype[^<>]*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)  # fmt: skip
# tags that end a line of text: turned into a newline, so an HTML page becomes lines of text, not one run-on line
_BLOCK = re.compile(r"<br\s*/?>|</(?:p|div|li|tr|h[1-6]|blockquote|pre|table|ul|ol|section|article|title)\s*>", re.IGNORECASE)  # fmt: skip
# code: fenced Markdown blocks and <pre> blocks are kept verbatim (whitespace, markup and all)
_FENCED = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$|<pre\b[^>]*>.*?</pre\s*>", re.MULTILINE | re.DOTALL | re.IGNORECASE)  # fmt: skip
_SLOT = (
    "\U000f0000{}\U000f0001"  # a placeholder for a kept code block (plane-15 private use: no rule touches it)
)
_SLOTS = re.compile("\U000f0000(\\d+)\U000f0001")
# indented lines beside code syntax: the text has code outside fences, whose indentation is kept
_INDENTED = re.compile(r"^(?: {2,}|\t)\S", re.MULTILINE)
_CODE_SYNTAX = re.compile(r"^\s*(?:def |class |return\b|import |from \S+ import|if .*:$|for .*:$|while .*:$|#include|function\b|public |private |var |let |const )|[{};]\s*$", re.MULTILINE)  # fmt: skip
_LEAD = re.compile(r"[ \t]*")
_PROSE_INDENT = re.compile(r"^[\u3000\u00a0]+", re.MULTILINE)  # Chinese paragraph indents (全角空格)
_SCRIPT = re.compile(r"<(script|style)[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")
_WIKI = re.compile(r"\{\{[^{}\n]*\}\}|\[\[(?:[^\[\]|\n]*\|)?([^\[\]\n]*)\]\]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")
_BLANKS = re.compile(r"\n{3,}")

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Chinese mobile numbers, and international/US-style numbers written with separators
PHONE_RE = re.compile(
    r"(?<![\d\w])(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?!\d)"
    r"|(?<![\d\w])\+?\d{1,3}[ .-]\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,4}(?!\d)"
    r"|(?<![\d\w])\(\d{3}\)\s?\d{3}[ .-]\d{4}(?!\d)"
)
# Chinese resident ID (18 characters with a birth date) and US SSN
ID_RE = re.compile(r"(?<![\d\w])\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\d\w])|(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")  # fmt: skip

DEFAULT_BOILERPLATE = [
    r"(?i)^(all rights reserved|copyright ©?|©).{0,80}$",
    r"(?i)^.{0,40}(cookie|cookies).{0,80}(accept|consent|policy).{0,40}$",
    r"(?i)^(share|share this|follow us|subscribe|sign up|log ?in|click here|read more|advertisement|related articles?)\b.{0,60}$",  # fmt: skip
    r"^(版权所有|本文来源|责任编辑|编辑[:：]|来源[:：]|原标题[:：]|点击(查看|进入|阅读)|上一篇|下一篇|相关(阅读|文章|新闻)|扫码|关注我们|分享到|广告).{0,60}$",  # fmt: skip
]


def _any_line(patterns: list[str]) -> re.Pattern[str]:
    """One multi-line regex that finds a line any of `patterns` (each anchored at the line start) would."""
    alts = []
    for p in patterns:
        flags, body = ("i", p[4:]) if p.startswith("(?i)") else ("", p)
        assert body.startswith("^"), p
        alts.append(f"(?{flags}:{body[1:]})" if flags else f"(?:{body[1:]})")
    return re.compile("^(?:" + "|".join(alts) + ")", re.MULTILINE)


_BOILERPLATE_ANY_LINE = _any_line(DEFAULT_BOILERPLATE)


@dataclass
class CleanConfig:
    """Recipe `data.clean:`; every step can be switched off."""

    normalize_unicode: bool = True
    remove_control: bool = True
    strip_markup: bool = True
    normalize_whitespace: bool = True
    traditional_to_simplified: bool = False
    remove_boilerplate: bool = True
    boilerplate_patterns: list[str] = field(default_factory=list)  # extra regexes, one line each
    mask_emails: bool = True
    mask_phones: bool = True
    mask_ids: bool = True
    email_token: str = "[EMAIL]"
    phone_token: str = "[PHONE]"
    id_token: str = "[ID]"


class TextCleaner:
    """The cleaning rules as a plain function object, so tests and the benchmark can use them without datatrove.

    Each rule first asks a cheap question of the whole text (is there a full-width character, three digits in
    a row, a line any boilerplate pattern matches?) and only then does the per-line or substituting work.
    """

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        patterns = DEFAULT_BOILERPLATE + list(cfg.boilerplate_patterns)
        self._boiler = [re.compile(p) for p in patterns]
        # the built-in patterns as one search over the whole text first; a recipe's own patterns line by line
        self._boiler_anywhere = None if cfg.boilerplate_patterns else _BOILERPLATE_ANY_LINE
        self._t2s = None

    def clean(self, text: str, lang: str = "", *, markup: bool = True) -> tuple[str, dict[str, int]]:
        """Cleaned text and counts of every kind of edit: masked_email/phone/id, boilerplate_lines, and edit_*
        (documents whose Unicode, control characters, markup, whitespace or script changed; code blocks kept).

        Code is kept as written: fenced and <pre> blocks are set aside before any rule and put back after, and in
        a text with indented code lines outside fences, indentation is kept. `markup=False` (chat turns, where an
        HTML answer is content the user asked for) leaves tags alone.
        """
        c = self.cfg
        counts: dict[str, int] = {}
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        blocks: list[str] = []
        if "```" in text or "~~~" in text or "<pre" in text or "<PRE" in text:

            def keep(m: re.Match[str]) -> str:
                blocks.append(m.group())
                return _SLOT.format(len(blocks) - 1)

            text = _FENCED.sub(keep, text)
            counts["edit_code_blocks_kept"] = len(blocks)
        before = text
        if c.normalize_unicode:
            text = unicodedata.normalize("NFC", text)
            if "\u3000" in text or "\u00a0" in text:
                text = _PROSE_INDENT.sub("", text)
            if _HAS_FULLWIDTH.search(text):
                text = text.translate(_FULLWIDTH)
            counts["edit_unicode"] = int(text != before)
        if c.remove_control:
            text, n = _CONTROL.subn("", text)
            counts["edit_control_chars"] = n
        if markup and c.strip_markup and ("<" in text or "&" in text or "{{" in text or "[[" in text):
            marked = text
            text = _SCRIPT.sub("", text)
            if "<" in text:
                text = _BLOCK.sub("\n", text)
                text = _TAG.sub("", text)
            text = _WIKI.sub(lambda m: m.group(1) or "", text)
            if "&" in text:
                text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
            counts["edit_markup"] = int(text != marked)
        if c.traditional_to_simplified and lang in ("zh", "auto", ""):
            if self._t2s is None:
                from opencc import OpenCC

                self._t2s = OpenCC("t2s")
            converted = self._t2s.convert(text)
            counts["edit_traditional_to_simplified"] = int(converted != text)
            text = converted
        if c.mask_emails and "@" in text:
            text, n = EMAIL_RE.subn(c.email_token, text)
            counts["masked_email"] = n
        digits = (c.mask_ids or c.mask_phones) and _THREE_DIGITS.search(text) is not None
        if c.mask_ids:
            text, n = ID_RE.subn(c.id_token, text) if digits else (text, 0)
            counts["masked_id"] = n
        if c.mask_phones:
            text, n = PHONE_RE.subn(c.phone_token, text) if digits else (text, 0)
            counts["masked_phone"] = n
        if c.normalize_whitespace or c.remove_boilerplate:
            spaced = text
            if c.normalize_whitespace and _INDENTED.search(text) and _CODE_SYNTAX.search(text):
                lines = []  # code outside fences: each line keeps its indentation, the rest is normalized
                for line in text.split("\n"):
                    lead = _LEAD.match(line).end()  # type: ignore[union-attr]
                    rest = _SPACES.sub(" ", line[lead:]).strip()
                    lines.append(line[:lead] + rest if rest else "")
            elif c.normalize_whitespace:
                text = _SPACES.sub(" ", text)
                lines = [line.strip() for line in text.split("\n")]
            else:
                lines = text.split("\n")
            text = "\n".join(lines)
            dropped = 0
            if c.remove_boilerplate and (self._boiler_anywhere is None or self._boiler_anywhere.search(text)):
                kept = [
                    ln
                    for ln in lines
                    if not (ln and len(ln) < 200 and any(p.search(ln) for p in self._boiler))
                ]
                dropped = len(lines) - len(kept)
                text = "\n".join(kept)
            counts["boilerplate_lines"] = dropped
            if c.normalize_whitespace:
                text = _BLANKS.sub("\n\n", text).strip()
                counts["edit_whitespace"] = int(text != spaced and not dropped)
        if blocks:
            text = _SLOTS.sub(lambda m: blocks[int(m.group(1))], text)
        return text, counts


class Cleaner(PipelineStep):
    """datatrove step applying TextCleaner to each document's text and conversation turns."""

    type = "✂️ - FORMAT"

    def __init__(self, cfg: CleanConfig) -> None:
        self.name = "clean"
        super().__init__()
        self.cfg = cfg
        self._cleaner: TextCleaner | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cleaner = self._cleaner = self._cleaner or TextCleaner(self.cfg)
        try:
            for doc in data:
                with self.track_time():
                    count_in(self, doc)
                    lang = doc.metadata.get("lang", "")
                    doc.text, counts = cleaner.clean(doc.text, lang)
                    for k, v in counts.items():
                        if v:
                            tally(self, k, v)
                    msgs = doc.metadata.get("messages")
                    if (
                        msgs
                    ):  # turn by turn; markup in a chat turn is content (an HTML answer), not page chrome
                        doc.metadata["messages"] = [
                            {**m, "content": cleaner.clean(m.get("content") or "", lang, markup=False)[0]}
                            for m in msgs
                        ]
                    count_out(self, doc)
                yield doc
        finally:
            flush_tally(self)


def doc_tokens(doc: Document) -> int:
    """Token estimate of a document, cached in its metadata until its text length changes."""
    meta: dict[str, Any] = doc.metadata
    if meta.get("_tok_len") != len(doc.text):
        meta["_tok"] = estimate_tokens(doc.text)
        meta["_tok_len"] = len(doc.text)
    return meta["_tok"]


def tally(step: PipelineStep, label: str, value: int = 1) -> None:
    """Adds to a step's counter without datatrove's per-call bookkeeping (running mean, variance, min, max:
    several Python calls per update, per document, per step); `flush_tally` hands the totals over at the end.
    danlu's stats read only the totals."""
    pending = step.__dict__.get("_pending")
    if pending is None:
        pending = step.__dict__["_pending"] = defaultdict(int)
    pending[label] += value


def flush_tally(step: PipelineStep) -> None:
    """Moves the step's tallied totals into its datatrove stats (call when its `run` ends, in a `finally`)."""
    for label, total in step.__dict__.pop("_pending", {}).items():
        step.stat_update(label, value=total)


def count_in(step: PipelineStep, doc: Document) -> None:
    tally(step, "docs_in")
    tally(step, "chars_in", len(doc.text))
    tally(step, "tokens_in", doc_tokens(doc))


def count_out(step: PipelineStep, doc: Document) -> None:
    tally(step, "docs_out")
    tally(step, "chars_out", len(doc.text))
    tally(step, "tokens_out", doc_tokens(doc))
