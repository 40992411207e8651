"""Reading user data files with errors that name file and line; writing outputs atomically.

Everything danlu writes goes to a temporary path first and is renamed into place, so an interrupted run
never leaves a half-written file or folder where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DanluError(f"{path}: no such file")
    if path.is_dir():
        raise DanluError(f"{path}: is a folder, expected a file")


def read_records(path: str | Path, *, text_field: str = "text") -> Iterator[dict[str, Any]]:
    """Yields dict records from .jsonl, .json (a list of objects), .parquet or .txt (one record per file).

    A malformed line raises DanluError naming the file and line number. Blank JSONL lines are skipped.
    """
    path = Path(path)
    _check_file(path)
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".ndjson"):
        opener = _open_text(path)
        with opener as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DanluError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DanluError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield obj
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DanluError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DanluError(f"{path}: expected a JSON list of objects")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DanluError(f"{path}: item {i} is not a JSON object")
            yield obj
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DanluError(f"{path}: cannot read Parquet file ({e})") from None
        yield from table.to_pylist()
    elif name.endswith(".txt"):
        yield {text_field: path.read_text(encoding="utf-8"), "id": path.name}
    else:
        raise DanluError(f"{path}: unsupported file type (expected one of {', '.join(RECORD_SUFFIXES)})")


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


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
    """Yields a temporary sibling path; on success it is renamed onto `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller creates a file or a folder there
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
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


def recover_swapped(path: str | Path) -> None:
    """Finishes a folder swap that `atomic_path` was interrupted in (between its two renames)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        old.rename(path)


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
