"""One sentence splitter for Chinese and English text, and the key under which two sentences count as the same.

Why: "held-out" and "validation" claims are made at the sentence level (issue 20): an eval prompt, a dev row and a
test row, or a validation document must not contain a sentence the model trained on (or, for test rows, that
anyone tuned on). The world builder uses this module to choose and filter rows, and the tests use the same module
to prove the result, so both sides agree on what a sentence is.

A sentence ends at a line break, after 。！？ (with any closing quotes or brackets), and after . ! ? when the next
character is a Chinese one or the text goes on after whitespace with anything but a lowercase letter (so "U.S.
dollar" and "3.5" stay whole). A leading list number ("1. ") stays with its sentence. Two sentences are the same
when their keys are equal: Unicode NFKC (full-width ？，： → ASCII), case folded, whitespace collapsed, quotes and
end punctuation around it dropped; a sentence with a colon is also known by the key of what follows the colon
(`keys_of`). Keys are deliberately loose: they can only make more sentences count as shared.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

_CLOSERS = "\"'”’」』）)］]"
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
# an end of sentence inside a line: Chinese stops always; Latin stops only before a non-lowercase word or a CJK char
_C = re.escape(_CLOSERS)
_END = re.compile(rf"[。！？]+[{_C}]*|[.!?]+[{_C}]*(?=[ \t]*$|[ \t]+[^\sa-z]|[{_CJK}])")
_LINE = re.compile(r"[^\n]+")
_LIST_MARKER = re.compile(r"\d{1,3}\.")
_SPACE = re.compile(r"\s+")
_TRAILING = ".!?。;…" + _CLOSERS
_OPENERS = "\"'“‘「『（(［["
_COLON = re.compile(rf"：|:(?=\s|[{_CJK}])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of every sentence of `text`, in order, without surrounding whitespace."""
    spans: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start, stop = line.span()
        pieces: list[tuple[int, int]] = []
        cut = start
        for m in _END.finditer(text, start, stop):
            pieces.append((cut, m.end()))
            cut = m.end()
        pieces.append((cut, stop))
        merged: list[tuple[int, int]] = []
        for a, b in pieces:
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a == b:
                continue
            if merged and _LIST_MARKER.fullmatch(text[merged[-1][0] : merged[-1][1]]):
                merged[-1] = (merged[-1][0], b)  # "1." belongs to the sentence it numbers
            else:
                merged.append((a, b))
        spans += merged
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of `text` (see the module docstring for where one ends)."""
    return [text[a:b] for a, b in sentence_spans(text)]


def sentence_key(sentence: str) -> str:
    """What two sentences must share to count as the same sentence ("" for one with no words)."""
    key = _SPACE.sub(" ", unicodedata.normalize("NFKC", sentence).casefold()).strip()
    return key.strip(_TRAILING + _OPENERS + " ")


def keys_of(sentence: str) -> list[str]:
    """The keys one sentence is known by: its own, and that of what follows its first colon, when anything does.
    Why the second: a sentence behind a label or a speaker ("3楼 小明：中国的首都是北京。", "Q: What is …?",
    "王伟说：“…”") is new as a whole while its words after the colon may be a sentence read many times."""
    out = [k] if (k := sentence_key(sentence)) else []
    parts = _COLON.split(sentence, maxsplit=1)
    if len(parts) == 2 and (core := sentence_key(parts[1])) and core not in out:
        out.append(core)
    return out


def sentence_keys(texts: Iterable[str]) -> set[str]:
    """Every key (`keys_of`) of every sentence of every text."""
    # templated text repeats lines: each distinct line is cut once
    lines = {line for text in texts for line in text.split("\n")}
    return {k for line in lines for s in sentences(line) for k in keys_of(s)}


def record_strings(obj: Any) -> Iterator[str]:
    """Every string value inside a record (message contents, tool arguments, chosen/rejected …): what a training
    record could teach, read conservatively."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from record_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from record_strings(v)


def row_inputs(row: dict[str, Any]) -> list[str]:
    """The texts an eval row shows the model: a completion `prompt`, and the system and user turns of `messages`
    or of a preference `prompt` given as messages."""
    out = [row["prompt"]] if isinstance(row.get("prompt"), str) else []
    msgs = row.get("messages") or (row["prompt"] if isinstance(row.get("prompt"), list) else [])
    return out + [m["content"] for m in msgs if m.get("role") in ("system", "user")]


class Parts(NamedTuple):
    """A text cut in two by `keep_unseen`, with the number of sentences in each part."""

    unseen: str
    seen: str
    n_unseen: int
    n_seen: int


def keep_unseen(text: str, seen: set[str]) -> Parts:
    """`text` cut in two: its sentences none of whose keys is in `seen`, and the others. Each part keeps the order
    and line structure of `text`; a line left with no sentence goes, and blank lines collapse to one."""
    out: dict[bool, list[str]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    for line in text.split("\n"):
        if not line.strip():
            out[False].append("")
            out[True].append("")
            continue
        parts: dict[bool, list[str]] = {False: [], True: []}
        for s in sentences(line):
            parts[any(k in seen for k in keys_of(s))].append(s)
        for is_seen, pieces in parts.items():
            counts[is_seen] += len(pieces)
            if pieces:
                out[is_seen].append(line[: len(line) - len(line.lstrip())] + _join(pieces))  # keeps an indent
    return Parts(_lines(out[False]), _lines(out[True]), counts[False], counts[True])


def _join(pieces: list[str]) -> str:
    """Sentences of one line joined as the line joined them: no space between Chinese ones, one between others."""
    out = pieces[0]
    for p in pieces[1:]:
        out += p if out[-1] in "。！？" or re.match(rf"[{_CJK}]", p) else " " + p
    return out


def _lines(lines: list[str]) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
