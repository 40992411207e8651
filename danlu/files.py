"""Reading user data files with errors that name file and line; writing outputs atomically.

One reader serves every command: text is decoded as UTF-8, UTF-8/16/32 with a BOM, or GB18030 (detected per file,
or `--encoding` / $DANLU_ENCODING), and a record longer than MAX_RECORD_CHARS is skipped unread and counted.

Everything danlu writes goes to a temporary path first and is renamed into place, so an interrupted run
never leaves a half-written file or folder where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv", ".tsv")

# Text encodings danlu reads without being told: what Chinese and English datasets are published in. A byte-order
# mark decides first; then UTF-8 is tried, then GB18030 (a superset of GBK and GB2312, so one name covers all three).
AUTO_ENCODINGS = ("utf-8", "gb18030")
ENCODING_ENV = "DANLU_ENCODING"  # set by the commands' --encoding, so every reader (and worker) sees it
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# The stated bound on one record (a JSONL line, a JSON list item, a CSV row, a chunk of a .txt file). A longer one
# is skipped before it is parsed or tokenized, counted with its file:line: tokenizing costs ~300 bytes of memory
# per character, so one 50 MB line would need ~14 GB. 4 M characters is ~1M tokens, far above any real record.
MAX_RECORD_CHARS = 4_000_000


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DanluError(f"{path}: no such file")
    if path.is_dir():
        raise DanluError(f"{path}: is a folder, expected a file")


# What a compressed file starts with, by the suffix that names it: a file whose bytes do not match is refused with
# one message (a renamed plain file, an HTML error page saved as .bz2), not a decompressor's "invalid data stream".
COMPRESSION_MAGIC = {
    ".gz": ("gzip", (b"\x1f\x8b",)),
    ".bz2": ("bzip2", (b"BZh",)),
    ".xz": ("xz", (b"\xfd7zXZ\x00",)),
    ".zst": ("zstd", (b"\x28\xb5\x2f\xfd",)),
    ".zstd": ("zstd", (b"\x28\xb5\x2f\xfd",)),
}


def check_compression(path: str | Path) -> None:
    """Raises a DanluError when a file named `.gz/.bz2/.xz/.zst` does not start with that format's magic bytes."""
    name = str(path).lower()
    for suffix, (fmt, magics) in COMPRESSION_MAGIC.items():
        if name.endswith(suffix):
            with open(path, "rb") as f:
                head = f.read(8)
            if head and not head.startswith(magics):
                text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
                raise DanluError(
                    f"{path}: named {suffix} but not {fmt}-compressed (it starts with {head!r}"
                    f"{', which looks like uncompressed text' if text else ''}); "
                    f"rename it without {suffix} or compress it with {fmt}"
                )
            return


def open_binary(path: str | Path) -> io.BufferedIOBase:
    """Opens a file for reading bytes, decompressing .gz/.bz2/.xz/.zst by name (dumps come compressed); a file
    whose bytes are not the format its name says is refused (check_compression)."""
    check_compression(path)
    name = str(path).lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        import bz2

        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        import lzma

        return lzma.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        # pushshift dumps use long-distance windows; the default limit rejects them
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        return io.BufferedReader(dctx.stream_reader(open(path, "rb"), read_across_frames=True, closefd=True))
    return open(path, "rb")


_open_bytes = open_binary


def chosen_encoding(encoding: str | None = None) -> str | None:
    """The encoding asked for (argument, else $DANLU_ENCODING), checked; None means detect it per file."""
    import codecs

    name = encoding or os.environ.get(ENCODING_ENV) or None
    if name in (None, "auto"):
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise DanluError(
            f"unknown text encoding {name!r} (e.g. utf-8, utf-16, gb18030, big5, latin-1)"
        ) from None


def _decode_error(
    path: Path, raw: bytes, e: UnicodeDecodeError, encoding: str, offset: int = 0
) -> DanluError:
    line = raw.count(b"\n", 0, e.start) + 1 + offset
    return DanluError(
        f"{path}:{line}: cannot decode the text as {encoding} (byte 0x{raw[e.start]:02x}: {e.reason}); "
        f"pass --encoding NAME (e.g. gb18030, big5, latin-1) or convert the file to UTF-8"
    )


def bad_byte_error(path: Path, encoding: str) -> DanluError:
    """The error for a file that stops decoding part-way: the exact line of the first bad byte (a text stream
    decodes ahead of the line it returns, so its position is not the line's)."""
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with _open_bytes(path) as f:
        while chunk := f.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk.count(b"\n", 0, max(0, e.start))
                break
            line += chunk.count(b"\n")
    shown = "utf-8" if encoding == "utf-8-sig" else encoding
    return DanluError(
        f"{path}:{line}: cannot decode the text as {shown}; pass --encoding NAME (e.g. gb18030, big5, latin-1) or "
        "convert the file to UTF-8"
    )


def detect_encoding(path: str | Path, sample: int = 1 << 16) -> str:
    """The text encoding of a file: its BOM (UTF-8/16/32), else UTF-8 if its first 64 KiB decode as UTF-8, else
    GB18030 if they decode as that. Otherwise one error naming the file and the line of the first bad byte."""
    import codecs

    path = Path(path)
    try:
        with _open_bytes(path) as f:
            raw = f.read(sample)
    except Exception as e:  # gzip/bz2/lzma/zstd each raise their own type on corrupt or truncated data
        raise DanluError(f"{path}:1: corrupt or truncated file ({e})") from None
    for bom, name in _BOMS:
        if raw.startswith(bom):
            return name
    final = len(raw) < sample
    first_error: UnicodeDecodeError | None = None
    for name in AUTO_ENCODINGS:
        try:
            codecs.getincrementaldecoder(name)().decode(raw, final=final)
            return name
        except UnicodeDecodeError as e:
            first_error = first_error or e
    assert first_error is not None
    raise _decode_error(path, raw, first_error, "UTF-8 or GB18030")


def open_text(path: str | Path, encoding: str | None = None, newline: str | None = None) -> Any:
    """A text stream of any file danlu reads (.gz decompressed), in the given or the detected encoding; a BOM
    is never part of the text. Decoding errors surface on read as UnicodeDecodeError (see iter_lines)."""
    path = Path(path)
    _check_file(path)
    enc = chosen_encoding(encoding) or detect_encoding(path)
    if enc in ("utf-8", "utf_8"):
        enc = "utf-8-sig"  # an explicit --encoding utf-8 on a file with a BOM
    return io.TextIOWrapper(_open_bytes(path), encoding=enc, errors="strict", newline=newline)


def _open_text(path: Path) -> Any:  # kept for callers written before open_text
    return open_text(path)


def read_text(path: str | Path, encoding: str | None = None) -> str:
    """A whole text file (.json, .txt, .csv) decoded as open_text does; a bad byte is an error with its line."""
    path = Path(path)
    _check_file(path)
    enc = chosen_encoding(encoding) or detect_encoding(path)
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as e:
        raise _decode_error(path, raw, e, enc) from None
    return text[1:] if text.startswith("\ufeff") else text


@dataclass
class Oversized:
    """A record longer than the stated bound, skipped unread: where it is and how long it is (at least)."""

    where: str
    chars: int
    bound: int = MAX_RECORD_CHARS

    def __str__(self) -> str:
        return f"{self.where}: a record of {self.chars:,} characters skipped (longer than the bound of {self.bound:,})"


@dataclass
class SkippedRecords:
    """Records skipped for their size, counted across files, with the first few locations to show."""

    count: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, item: Oversized) -> None:
        self.count += 1
        if len(self.where) < 5:
            self.where.append(str(item))


def iter_lines(
    path: str | Path, *, encoding: str | None = None, max_chars: int | None = None
) -> Iterator[tuple[int, str | Oversized]]:
    """(line number, line) for each non-blank line; a line longer than `max_chars` is read past in bounded pieces
    and yielded as Oversized, so memory never holds more than `max_chars` characters of it (default: the module's
    MAX_RECORD_CHARS, read at call time)."""
    max_chars = MAX_RECORD_CHARS if max_chars is None else max_chars
    path = Path(path)
    with open_text(path, encoding) as f:
        lineno = 0
        while True:
            try:
                line = f.readline(max_chars + 1)
                if len(line) > max_chars and not line.endswith("\n"):
                    size = len(line)
                    while line and not line.endswith("\n"):
                        line = f.readline(1 << 20)
                        size += len(line)
                    lineno += 1
                    yield lineno, Oversized(f"{path}:{lineno}", size, max_chars)
                    continue
            except UnicodeDecodeError:
                raise bad_byte_error(path, f.encoding) from None
            except (
                Exception
            ) as e:  # gzip/bz2/lzma/zstd each raise their own type on corrupt or truncated data
                raise DanluError(f"{path}:{lineno + 1}: corrupt or truncated file ({e})") from None
            if not line:
                return
            lineno += 1
            if line.strip():
                yield lineno, line


class RecordProblem(DanluError):
    """A record that cannot be used (malformed JSON, not an object): yielded by located_records, raised by
    read_records; the caller decides whether to stop or skip."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # crosses to tokenizing worker processes
        return type(self), (str(self), self.reason)


def located_records(
    path: str | Path,
    *,
    text_field: str = "text",
    encoding: str | None = None,
    max_chars: int | None = None,
) -> Iterator[tuple[str, dict[str, Any] | RecordProblem | Oversized]]:
    """(`file:line`, record) for .jsonl(.gz)/.ndjson, .json (a list of objects, or one), .parquet, .csv/.tsv (a
    header row names the fields) and .txt (one record, or chunks of at most `max_chars` at paragraph breaks).

    Every record knows its line, JSON list items included. A bad record is yielded as a RecordProblem and an
    over-long one as Oversized in its place; a file that cannot be read at all raises DanluError.
    """
    max_chars = MAX_RECORD_CHARS if max_chars is None else max_chars
    path = Path(path)
    _check_file(path)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        for lineno, line in iter_lines(path, encoding=encoding, max_chars=max_chars):
            where = f"{path}:{lineno}"
            if isinstance(line, Oversized):
                yield where, line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    where,
                    RecordProblem(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed_json"),
                )
                continue
            if not isinstance(obj, dict):
                yield (
                    where,
                    RecordProblem(f"{where}: expected a JSON object, got {type(obj).__name__}", "bad_record"),
                )
                continue
            yield where, obj
    elif name.endswith(".json"):
        yield from _json_items(path, read_text(path, encoding), max_chars)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    row += 1
                    yield f"{path}:row {row}", obj
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
            raise DanluError(f"{path}: cannot read Parquet file ({e})") from None
    elif name.endswith((".csv", ".tsv")):
        yield from _csv_rows(path, encoding, max_chars, "\t" if name.endswith(".tsv") else ",")
    elif name.endswith(".txt"):
        yield from _txt_chunks(path, text_field, encoding, max_chars)
    else:
        raise DanluError(f"{path}: unsupported file type (expected one of {', '.join(RECORD_SUFFIXES)})")


def read_records(
    path: str | Path, *, text_field: str = "text", encoding: str | None = None, max_chars: int | None = None,
    skipped: SkippedRecords | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Records of a file (see located_records). A bad record raises DanluError naming file and line; an over-long
    one is skipped and counted in `skipped`, or, without it, reported on stderr."""
    for _, rec in located_records(path, text_field=text_field, encoding=encoding, max_chars=max_chars):
        if isinstance(rec, Oversized):
            if skipped is not None:
                skipped.add(rec)
            else:
                print(f"[danlu] warning: {rec}", file=sys.stderr)
            continue
        if isinstance(rec, RecordProblem):
            raise rec
        yield rec


def field_value(record: Any, name: str) -> Any:
    """A field by name, or by a dotted path into nested objects (`data.question`, `turns.0.text`); None if absent."""
    if isinstance(record, dict) and name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def record_text(record: dict[str, Any], text_field: str, where: str) -> str:
    """The text of a pretraining record: a string field (dotted for nested fields), or a list of strings joined by
    newlines (a poem's `paragraphs`, a document's lines). Anything else is an error naming the fields there are."""
    value = field_value(record, text_field)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    names = ", ".join(repr(k) for k in list(record)[:12]) or "none"
    what = "missing" if value is None else f"a {type(value).__name__}, not text"
    raise DanluError(f"{where}: field {text_field!r} is {what}; the record has fields {names} (choose one with "
                     "--text-field, dotted for nested fields)")  # fmt: skip


def _json_items(path: Path, text: str, max_chars: int) -> Iterator[tuple[str, Any]]:
    """Items of a JSON list scanned one by one, so that each knows its line as JSONL records do."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos >= len(text):
        return
    if text[pos] != "[":
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DanluError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        where = f"{path}:{line_of(pos)}"
        yield where, _json_item(obj, where, end - pos, max_chars)
        return
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:  # the rest of a JSON list cannot be resynchronized: always fatal
            raise DanluError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        where = f"{path}:{line_of(pos)}"
        yield where, _json_item(obj, where, end - pos, max_chars)
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DanluError(f"{path}:{line_of(pos)}: malformed JSON (expected ',' or ']' after an item)")


def _json_item(obj: Any, where: str, size: int, max_chars: int) -> Any:
    if size > max_chars:
        return Oversized(where, size, max_chars)
    if not isinstance(obj, dict):
        return RecordProblem(f"{where}: expected a JSON object, got {type(obj).__name__}", "bad_record")
    return obj


def _csv_rows(path: Path, encoding: str | None, max_chars: int, delimiter: str) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV/TSV file with a header, as {column: cell}; the row's first line is its location."""
    import csv

    csv.field_size_limit(max(max_chars, 131072))
    with open_text(path, encoding, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            start = reader.line_num + 1
            for row in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield (
                        where,
                        RecordProblem(
                            f"{where}: {len(row)} cells, the header has {len(header)} ({', '.join(header)})",
                            "bad_record",
                        ),
                    )
                    continue
                yield where, dict(zip(header, row))
        except csv.Error as e:
            msg = str(e)
            if "field larger than field limit" in msg:
                raise DanluError(
                    f"{path}:{reader.line_num}: a cell is longer than the bound of {max_chars:,} characters"
                ) from None
            raise DanluError(f"{path}:{reader.line_num}: malformed CSV ({msg})") from None
        except UnicodeDecodeError:
            raise bad_byte_error(path, f.encoding) from None


def _txt_chunks(
    path: Path, text_field: str, encoding: str | None, max_chars: int
) -> Iterator[tuple[str, Any]]:
    """A .txt file is one record; a file longer than `max_chars` becomes several, cut at paragraph breaks
    (blank lines) where it can, so a whole book is read in bounded memory instead of skipped."""
    if path.stat().st_size <= max_chars and not path.name.lower().endswith(".gz"):
        yield f"{path}:1", {text_field: read_text(path, encoding), "id": path.name}
        return
    parts: list[str] = []
    size, n, start, lineno = 0, 0, 1, 1  # lineno: the line the next read begins
    with open_text(path, encoding) as f:
        while True:
            try:
                line = f.readline(max_chars)
            except UnicodeDecodeError:
                raise bad_byte_error(path, f.encoding) from None
            blank = not line.strip()
            if parts and (not line or size + len(line) > max_chars or (blank and size >= max_chars // 2)):
                chunk = "".join(parts)
                if chunk.strip():
                    n += 1
                    yield f"{path}:{start}", {text_field: chunk, "id": f"{path.name}#{n}"}
                parts, size, start = [], 0, lineno
            if not line:
                return
            parts.append(line)
            size += len(line)
            lineno += line.endswith("\n")


def expand_inputs(paths: Iterable[str | Path], suffixes: tuple[str, ...] = RECORD_SUFFIXES) -> list[Path]:
    """Files and folders (searched recursively for `suffixes`) → a sorted list of files; errors if empty."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(suffixes))
            if not found:
                raise DanluError(f"{p}: folder has no data files ({', '.join(suffixes)})")
            out.extend(found)
        else:
            _check_file(p)
            out.append(p)
    if not out:
        raise DanluError("no input files given")
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling path; on success it is renamed onto `path` (file or folder).

    A full disk (ENOSPC, or the `basic_ios::clear` torch.save reports for it) becomes one DanluError naming `path`;
    whatever was at `path` before is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    tmp.rmdir()  # the caller creates a file or a folder there
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:
            if is_disk_full(e, path.parent):
                raise DanluError(f"{path}: no space left on device while writing it; the previous version, if "
                                 "any, is intact (free some space and rerun)") from None  # fmt: skip
            raise
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def is_disk_full(error: BaseException, where: Path | None = None) -> bool:
    """True for ENOSPC/EDQUOT, and for the opaque errors torch.save and C++ writers give on a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text:
        return True
    if isinstance(error, RuntimeError) and ("basic_ios" in text or "file write failed" in text) and where:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(where).free < 64 * 2**20
    return False


def leftovers(path: str | Path) -> list[Path]:
    """What interrupted `atomic_path` writes of `path` left beside it: temp folders/files and a swapped-out old."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}$")
    old = f".{path.name}{OLD_SUFFIX}"
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name == old or pattern.match(p.name))


def remove_leftovers(path: str | Path, keep: Path | None = None) -> None:
    """Deletes `leftovers(path)` (except `keep`): after a successful save or resume they are never needed."""
    for p in leftovers(path):
        if keep is not None and p == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def recover_swapped(path: str | Path, rank: Callable[[Path], float | None] | None = None) -> Path | None:
    """Puts the best complete version of folder `path` in place after an interrupted `atomic_path` swap.

    Without `rank`: finishes the swap when only the old folder is left (a reader's repair; nothing is deleted).
    With `rank` (None for an incomplete folder, else a number, higher = newer, e.g. a checkpoint's step): the
    best-ranked of `path`, the swapped-out old folder and complete temp folders is renamed into place (a complete
    newer checkpoint that was written but not yet swapped in wins), then every leftover is removed. A complete
    version is never deleted before a better one is in place. Returns the folder now at `path`, or None.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}{OLD_SUFFIX}")
    if rank is None:
        if not path.exists() and old.is_dir():
            old.rename(path)
        return path if path.exists() else None
    scored = []
    for p in [path, *leftovers(path)]:
        if p.is_dir() and not p.is_symlink():
            r = rank(p)
            if r is not None:
                scored.append((r, p == path, p))
    if not scored:
        return None
    _, _, best = max(scored, key=lambda x: (x[0], x[1]))
    if best != path:
        if path.exists():  # incomplete or older: moved aside first, so a crash here loses nothing
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
            aside.rmdir()
            path.rename(aside)
        best.rename(path)
    remove_leftovers(path)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Writes rows as JSONL (UTF-8, not ASCII-escaped); returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
