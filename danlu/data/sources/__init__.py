"""Source readers, one per dump format; `READERS` maps a recipe input `type` to its reader and file suffixes."""

from __future__ import annotations

from danlu.data.sources.base import SourceError, SourceReader
from danlu.data.sources.html import HtmlReader, WarcReader
from danlu.data.sources.reddit import RedditReader
from danlu.data.sources.stackexchange import StackExchangeReader
from danlu.data.sources.text import TextReader
from danlu.data.sources.wikipedia import WikipediaReader

_COMPRESSED = ("", ".gz", ".bz2", ".zst", ".xz")


def _with(*exts: str) -> tuple[str, ...]:
    return tuple(e + c for e in exts for c in _COMPRESSED)


READERS: dict[str, tuple[type[SourceReader], tuple[str, ...]]] = {
    "wikipedia": (WikipediaReader, _with(".xml")),
    "stackexchange": (StackExchangeReader, _with(".xml")),
    "reddit": (RedditReader, _with(".jsonl", ".ndjson", ".json")),
    "html": (HtmlReader, _with(".html", ".htm")),
    "warc": (WarcReader, _with(".warc")),
    "text": (TextReader, _with(".txt", ".md")),
    "jsonl": (TextReader, _with(".jsonl", ".ndjson", ".json")),
    "parquet": (TextReader, (".parquet",)),
}

__all__ = ["READERS", "SourceError", "SourceReader"]
