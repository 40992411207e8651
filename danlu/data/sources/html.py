"""HTML news pages and WARC archives: main text through trafilatura; plus a small HTML-to-text for post bodies.

WARC is parsed here (records are a header block and a Content-Length body) because warcio is not a
dependency; `.warc.gz` files are concatenated gzip members, which `gzip` reads as one stream.
"""

from __future__ import annotations

import html as htmllib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu.data.sources.base import SourceError, SourceReader, open_binary

_BLOCK_END = re.compile(r"</(p|div|li|pre|h[1-6]|blockquote|tr|table|ul|ol)\s*>", re.IGNORECASE)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_LI = re.compile(r"<li[^>]*>", re.IGNORECASE)
_SCRIPT = re.compile(r"<(script|style)[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^<>]+>")
_CHARSET = re.compile(rb"charset=[\"']?([A-Za-z0-9_\-]+)", re.IGNORECASE)


def html_to_text(fragment: str) -> str:
    """A light HTML fragment → text (for Stack Exchange bodies): blocks become paragraphs, tags go."""
    t = _SCRIPT.sub("", fragment)
    t = _BR.sub("\n", t)
    t = _LI.sub("\n- ", t)
    t = _BLOCK_END.sub("\n\n", t)
    t = _TAG.sub("", t)
    t = htmllib.unescape(t)
    t = re.sub(r"[ \t]+\n", "\n", t)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


_BOILER_BLOCKS = re.compile(
    r"<(nav|header|footer|aside|form|noscript)[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE
)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.DOTALL | re.IGNORECASE)
_MAIN = re.compile(r"<(article|main)[^>]*>(.*?)</\1\s*>", re.DOTALL | re.IGNORECASE)
_CANONICAL = re.compile(r"<link[^>]+rel=[\"']canonical[\"'][^>]*href=[\"']([^\"']+)", re.IGNORECASE)


def _fallback_extract(page: str, url: str | None) -> dict[str, Any] | None:
    """Used only when trafilatura cannot be imported: <article>/<main> (else <body>) without nav/footer."""
    t = _SCRIPT.sub("", page)
    t = _BOILER_BLOCKS.sub("", t)
    m = _MAIN.search(t)
    text = html_to_text(m.group(2) if m else t)
    if not text:
        return None
    tm = _TITLE.search(page)
    cm = _CANONICAL.search(page)
    title = htmllib.unescape(tm.group(1)).strip() if tm else ""
    if title and not text.startswith(title):
        text = f"{title}\n\n{text}"
    return {"text": text, "title": title, "url": (cm.group(1) if cm else None) or url or ""}


def extract_main_text(page: str, url: str | None = None) -> dict[str, Any] | None:
    """trafilatura's main-text extraction (no comments, no tables of links) + title/url; None if nothing."""
    try:
        import trafilatura
    except ImportError:  # trafilatura ≥ 1.9 needs lxml_html_clean, which some environments lack
        return _fallback_extract(page, url)

    text = trafilatura.extract(
        page,
        url=url or None,
        include_comments=False,
        include_tables=False,
        favor_precision=True,
        deduplicate=True,
    )
    if not text or not text.strip():
        return None
    meta = trafilatura.extract_metadata(page, default_url=url or None)
    title = (meta.title if meta else None) or ""
    if title and not text.startswith(title):
        text = f"{title}\n\n{text}"
    return {"text": text, "title": title, "url": (meta.url if meta else None) or url or ""}


def _decode(body: bytes, content_type: bytes = b"") -> str:
    m = _CHARSET.search(content_type) or _CHARSET.search(body[:2048])
    enc = m.group(1).decode("ascii", "replace") if m else "utf-8"
    try:
        return body.decode(enc, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


class HtmlReader(SourceReader):
    """One HTML page per file (`.html`, `.htm`, optionally compressed) → its main text."""

    source_name = "html"
    default_domain = "news"

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        with open_binary(path) as f:
            raw = f.read()
        if b"\x00" in raw[:1024]:
            raise SourceError(path, None, "binary data, not an HTML page")
        page = _decode(raw)
        if "<" not in page:
            raise SourceError(path, None, "no HTML markup found (wrong file type?)")
        rec = extract_main_text(page)
        if rec is None:
            self.stat_update("pages_without_text")
            return
        rec["id"] = rec["url"] or Path(path).name
        yield rec


class WarcReader(SourceReader):
    """WARC (`.warc`, `.warc.gz`) `response` records with HTML payloads → main text, one document per page."""

    source_name = "warc"
    default_domain = "news"

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        with open_binary(path) as f:
            offset = 0
            n = 0
            while True:
                try:
                    line = f.readline()
                except (OSError, EOFError) as e:
                    raise SourceError(
                        path, f"record {n + 1}", f"corrupt or truncated compressed file ({e})"
                    ) from None
                if not line:
                    return
                offset += len(line)
                if not line.strip():
                    continue
                if not line.startswith(b"WARC/"):
                    raise SourceError(
                        path, f"byte {offset - len(line)}", "not a WARC record header (wrong file type?)"
                    )
                n += 1
                headers: dict[str, str] = {}
                while True:
                    h = f.readline()
                    offset += len(h)
                    if not h:
                        raise SourceError(path, f"record {n}", "truncated record header")
                    if not h.strip():
                        break
                    k, _, v = h.decode("utf-8", "replace").partition(":")
                    headers[k.strip().lower()] = v.strip()
                try:
                    length = int(headers.get("content-length", ""))
                except ValueError:
                    raise SourceError(path, f"record {n}", "missing or bad Content-Length") from None
                try:
                    block = f.read(length)
                except (OSError, EOFError) as e:
                    raise SourceError(
                        path, f"record {n}", f"corrupt or truncated compressed file ({e})"
                    ) from None
                offset += len(block)
                if len(block) < length:
                    raise SourceError(
                        path, f"record {n}", f"truncated record ({len(block)} of {length} bytes)"
                    )
                if headers.get("warc-type") != "response":
                    continue
                rec = self._response(block, headers.get("warc-target-uri", ""))
                if rec is not None:
                    yield rec

    def _response(self, block: bytes, url: str) -> dict[str, Any] | None:
        head, sep, body = block.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = block.partition(b"\n\n")
        content_type = b""
        for h in head.split(b"\n")[1:]:
            if h.lower().startswith(b"content-type:"):
                content_type = h.split(b":", 1)[1].strip()
        if content_type and b"html" not in content_type.lower():
            self.stat_update("non_html_records")
            return None
        rec = extract_main_text(_decode(body, content_type), url)
        if rec is None:
            self.stat_update("pages_without_text")
            return None
        rec["url"] = url or rec["url"]
        rec["id"] = rec["url"]
        return rec
