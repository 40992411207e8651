"""The base of every source reader: a datatrove step that turns files into Documents with danlu's metadata.

Why our own base rather than datatrove's BaseDiskReader: the dump formats (MediaWiki XML, Posts.xml, pushshift
threads, WARC) need whole-file parsers, and users need errors that name the file and the position in it, with a
recipe switch between stopping (`on_error: fail`) and skipping-and-counting (`on_error: skip`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from danlu import DanluError
from danlu.files import Oversized, iter_lines, open_binary

__all__ = [
    "SourceError",
    "SourceReader",
    "iter_json_lines",
    "iter_xml_elements",
    "open_binary",
    "source_error",
]  # open_binary's home: danlu.files


class SourceError(Exception):
    """A problem in an input file at a position (`line 12`, `byte 4096`, `page 3`)."""

    def __init__(self, path: str | Path, position: str | None, message: str) -> None:
        self.path, self.position, self.message = str(path), position, message
        where = f"{path}:{position}" if position else str(path)
        super().__init__(f"{where}: {message}")


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | SourceError]]:
    """(line number, object) for each non-blank JSONL line, decoded as every danlu reader decodes (danlu.files:
    detected or --encoding); a malformed or oversized line yields a SourceError in its place, so the caller decides
    whether to stop or skip. Undecodable bytes and decompression errors (truncated file) are raised."""
    try:
        for lineno, line in iter_lines(path):
            if isinstance(line, Oversized):
                yield lineno, SourceError(path, str(lineno), f"a record of {line.chars:,} characters, longer than "
                                          f"the bound of {line.bound:,}; skipped unread")  # fmt: skip
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, SourceError(path, str(lineno), f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield (
                    lineno,
                    SourceError(path, str(lineno), f"expected a JSON object, got {type(obj).__name__}"),
                )
                continue
            yield lineno, obj
    except DanluError as e:  # undecodable or corrupt: stop with the reader's position
        raise source_error(path, e) from None


def _head_problem(head: bytes, what: str) -> str | None:
    """Why the first bytes of a file cannot be `what` (an XML dump), or None: JSON, HTML or other non-XML."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        return None  # empty: no records, reported as such by the pipeline
    lower = text[:512].lower()
    if lower.startswith((b"<!doctype html", b"<html")) or b"<html" in lower[:200]:
        return f"an HTML page, not {what}"
    if not text.startswith(b"<"):
        return f"not XML (it starts with {text[:24]!r}), so not {what}"
    return None


def iter_xml_elements(path: str, root_tag: str, what: str) -> Iterator[tuple[str, Any]]:
    """(local tag, element) at the end of each element of an XML dump, in bounded memory.

    Streams through `open_binary` (so .bz2/.gz/.xz/.zst dumps are decompressed on the fly), checks that the file is
    XML whose root element is `<root_tag>` (a JSON file, an HTML page or another dump's XML named like this one
    stops here with one message naming what it is), and detaches each finished child of the root, so the parsed
    tree never grows with the file: a 10 GB dump is read in the memory of one record. The caller must not keep
    elements after the next one is read. XML syntax errors are raised as ET.ParseError for the caller to place.
    """
    import xml.etree.ElementTree as ET

    with open_binary(path) as f:
        problem = _head_problem(f.peek(1024)[:1024] if hasattr(f, "peek") else b"", what)
        if problem:
            raise SourceError(path, None, problem)
        root = None
        depth = 0
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem
                tag = elem.tag.rsplit("}", 1)[-1]
                if tag != root_tag:
                    raise SourceError(
                        path, None, f"its root element is <{tag}>, not <{root_tag}>: not {what}"
                    )
            if event == "start":
                depth += 1
                continue
            depth -= 1
            if elem is root:
                continue
            yield elem.tag.rsplit("}", 1)[-1], elem
            if (
                depth == 1
            ):  # a finished child of the root: drop it (the parser may have read children past it)
                if root[0] is elem:
                    del root[0]
                else:
                    root.remove(elem)


def source_error(path: str | Path, error: DanluError) -> SourceError:
    """danlu.files' "PATH:LINE: message" errors as a SourceError at that line."""
    rest = str(error).removeprefix(f"{path}:")
    line, sep, message = rest.partition(": ")
    return (
        SourceError(path, line, message) if sep and line.isdigit() else SourceError(path, None, rest.strip())
    )


class SourceReader(PipelineStep):
    """Reads its share of `files` (every `world_size`-th file from `rank`) after passing on upstream documents.

    Several readers chain in one pipeline, one per recipe input. Subclasses implement `read_file(path)`
    yielding record dicts with `text` and optional `id`, `url`, `messages`, `domain`, `lang`, `title`; a
    problem yields or raises a SourceError. Malformed records are counted (`read_errors`) and logged to
    `error_dir` when `on_error` is "skip", or stop the run with a DanluError when it is "fail".
    """

    type = "📖 - READER"
    source_name = "text"
    default_domain = "web"
    error_suffix = ""  # error log `<source>_<rank><suffix>.jsonl`: a stage before the readers uses its own

    def __init__(
        self,
        files: list[str],
        *,
        domain: str | None = None,
        lang: str | None = None,
        source: str | None = None,
        on_error: str = "fail",
        error_dir: str | None = None,
        options: dict[str, Any] | None = None,
        input_index: int = 0,
    ) -> None:
        self.name = f"read:{source or self.source_name}"
        super().__init__()
        self.files = [str(f) for f in files]
        self.domain = domain
        self.lang = lang
        self.source = source or self.source_name
        self.on_error = on_error
        self.error_dir = error_dir
        self.options = dict(options or {})
        self._error_file = None
        self.input_index = input_index  # the recipe input this reader serves: the first part of order_key
        self._file_index: dict[str, int] = {}

    # -- subclasses -------------------------------------------------------------------------------------
    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        raise NotImplementedError

    def files_for_rank(self, rank: int, world_size: int) -> list[str]:
        return self.files[rank::world_size]

    # -- shared -----------------------------------------------------------------------------------------
    def error(self, err: SourceError, rank: int) -> None:
        """Stops (on_error=fail) or counts and logs the problem (skip)."""
        if self.on_error == "fail":
            raise DanluError(f"{err} (set data.on_error: skip to skip such records)")
        self.stat_update("read_errors")
        if self.error_dir:
            if self._error_file is None:
                os.makedirs(self.error_dir, exist_ok=True)
                name = f"{self.source}_{rank:05d}{self.error_suffix}.jsonl"
                self._error_file = open(os.path.join(self.error_dir, name), "w", encoding="utf-8")  # noqa: SIM115
            row = {"step": "read", "reason": "read_error", "file": err.path, "position": err.position}
            self._error_file.write(json.dumps({**row, "error": err.message}, ensure_ascii=False) + "\n")

    def to_document(self, rec: dict[str, Any], path: str, n: int) -> Document:
        """The record as a Document; `n` numbers the records of `path` (the id of a record without one)."""
        meta: dict[str, Any] = {
            "source": self.source,
            "domain": self.domain or rec.get("domain") or self.default_domain,
            "lang": self.lang or rec.get("lang") or "auto",
            "url": rec.get("url") or "",
        }
        if rec.get("title"):
            meta["title"] = rec["title"]
        if rec.get("messages"):
            meta["messages"] = rec["messages"]
        doc_id = rec.get("id")
        if doc_id in (None, ""):
            doc_id = f"{Path(path).name}:{n}"
        return Document(text=rec.get("text") or "", id=f"{self.source}:{doc_id}", metadata=meta)

    def order_key(self, path: str, n: int, rec: dict[str, Any]) -> int:
        """Where the record stands in the order one task would read every input: (input, file, record) packed in
        64 bits. It does not depend on how files are split among tasks, so dedup keeps the same twin and the mix
        picks the same documents on 1 task or 100 (danlu.data.dedup.DedupPlan); a record may bring its own."""
        if "_order" in rec:
            return (self.input_index << 56) | (int(rec["_order"]) & ((1 << 56) - 1))
        file_i = self._file_index.get(path, 0)
        return (self.input_index << 56) | (min(file_i, (1 << 20) - 1) << 36) | min(n, (1 << 36) - 1)

    def read_all(self, rank: int, world_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(path, record) for this rank's files; a file that fails part-way is reported and the next one read."""
        for path in self.files_for_rank(rank, world_size):
            try:
                for rec in self.read_file(path):
                    if isinstance(rec, SourceError):
                        self.error(rec, rank)
                    else:
                        yield path, rec
            except SourceError as e:
                self.error(e, rank)
            except DanluError as e:  # danlu.files: a file that is not what its name says
                self.error(source_error(path, e), rank)
            except OSError as e:
                self.error(SourceError(path, None, f"cannot read ({e})"), rank)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        self._file_index = {f: i for i, f in enumerate(self.files)}
        last, n = None, 0
        try:
            for path, rec in self.read_all(rank, world_size):
                n = n + 1 if path == last else 1  # records are numbered per file, whichever task reads it
                last = path
                doc = self.to_document(rec, path, n)
                doc.metadata["_order"] = self.order_key(path, n, rec)
                self.stat_update("documents")
                self.stat_update("chars", value=len(doc.text))
                yield doc
        finally:
            if self._error_file is not None:
                self._error_file.close()
                self._error_file = None
