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
                name = f"{self.source}_{rank:05d}.jsonl"
                self._error_file = open(os.path.join(self.error_dir, name), "w", encoding="utf-8")  # noqa: SIM115
            row = {"step": "read", "reason": "read_error", "file": err.path, "position": err.position}
            self._error_file.write(json.dumps({**row, "error": err.message}, ensure_ascii=False) + "\n")

    def to_document(self, rec: dict[str, Any], path: str, n: int) -> Document:
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
            except OSError as e:
                self.error(SourceError(path, None, f"cannot read ({e})"), rank)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        try:
            for n, (path, rec) in enumerate(self.read_all(rank, world_size), 1):
                doc = self.to_document(rec, path, n)
                self.stat_update("documents")
                self.stat_update("chars", value=len(doc.text))
                yield doc
        finally:
            if self._error_file is not None:
                self._error_file.close()
                self._error_file = None
