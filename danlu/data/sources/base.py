"""The base of every source reader: a datatrove step that turns files into Documents with danlu's metadata.

Why our own base rather than datatrove's BaseDiskReader: the dump formats (MediaWiki XML, Posts.xml, pushshift
threads, WARC) need whole-file parsers, and users need errors that name the file and the position in it, with a
recipe switch between stopping (`on_error: fail`) and skipping-and-counting (`on_error: skip`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from danlu import DanluError


class SourceError(Exception):
    """A problem in an input file at a position (`line 12`, `byte 4096`, `page 3`)."""

    def __init__(self, path: str | Path, position: str | None, message: str) -> None:
        self.path, self.position, self.message = str(path), position, message
        where = f"{path}:{position}" if position else str(path)
        super().__init__(f"{where}: {message}")


def open_binary(path: str | Path) -> io.BufferedIOBase:
    """Opens a file, decompressing .gz/.bz2/.zst/.xz by name."""
    path = str(path)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        import bz2

        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        import lzma

        return lzma.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        import zstandard

        # pushshift dumps use long-distance windows; the default limit rejects them
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        return io.BufferedReader(dctx.stream_reader(open(path, "rb"), read_across_frames=True, closefd=True))
    return open(path, "rb")


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | SourceError]]:
    """(line number, object) for each non-blank JSONL line; a malformed line yields a SourceError in its place,
    so the caller decides whether to stop or skip. Decompression errors (truncated file) are raised."""
    with open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
        lineno = 0
        while True:
            try:
                line = text.readline()
            except UnicodeDecodeError as e:
                raise SourceError(path, f"{lineno + 1}", f"not UTF-8 text ({e.reason})") from None
            except Exception as e:  # zstd/gzip/bz2 errors on corrupt or truncated data
                raise SourceError(path, f"{lineno + 1}", f"corrupt or truncated file ({e})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
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
