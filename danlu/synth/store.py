"""Resumable output: kept rows in OUT (JSONL that SFT reads as it is), the journal of every job in OUT's log.

Why two files and a journal: SFT must read the output directly, so rejected rows cannot live in it; and a kill
may come between any two writes. The journal line of a job (its rejected rows, its counts) is written after the
job's kept rows and is the commit point: on resume, a torn last line of either file is cut off, and kept rows
whose job has no journal line are dropped (that job runs again). So a kill loses no committed job and
duplicates no row. The journal's first line holds the run's settings; resuming with other settings is refused
instead of mixing two runs in one file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import write_jsonl_atomic


def log_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".log.jsonl")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of an append-only file; a torn last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DanluError(f"{path}:{lineno}: malformed JSON in a file danlu synth writes; was it edited? "
                             "Choose another --out to start over") from None  # fmt: skip
    return rows


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class SynthStore:
    """Open with the run's settings; `done` holds the committed jobs, `kept` the kept rows so far."""

    def __init__(self, out: str | Path, settings: dict[str, Any]) -> None:
        self.out = Path(out)
        if not self.out.name.endswith(".jsonl"):
            raise DanluError(f"--out {out}: the output must be a .jsonl file")
        if self.out.is_dir():
            raise DanluError(f"--out {out}: is a folder, expected a .jsonl file")
        self.log = log_path(self.out)
        self.settings = settings
        self.done: set[int] = set()
        self.kept = 0
        self.rejected: Counter[str] = Counter()
        self.journal: list[dict[str, Any]] = []
        self._resume()

    def _resume(self) -> None:
        if not self.log.exists():
            if self.out.exists() and self.out.stat().st_size:
                raise DanluError(f"{self.out} exists but has no journal {self.log.name}: it was not written by "
                                 "danlu synth; choose another --out or remove it")  # fmt: skip
            return
        lines = _read_lines(self.log)
        if not lines:
            return
        head = lines[0].get("settings")
        if head != self.settings:
            diff = sorted(k for k in set(head or {}) | set(self.settings)
                          if (head or {}).get(k) != self.settings.get(k))  # fmt: skip
            raise DanluError(f"{self.out} was started with other settings ({', '.join(diff)} differ); resume with "
                             "the same ones, or choose another --out")  # fmt: skip
        for entry in lines[1:]:
            self.done.add(entry["job"])
            self.journal.append(entry)
            for r in entry.get("rejected", []):
                self.rejected[r["meta"]["failed"]] += 1
        rows = _read_lines(self.out)
        committed = [r for r in rows if r.get("meta", {}).get("job") in self.done]
        if len(committed) < len(rows):  # rows of a job whose journal line was never written: it runs again
            write_jsonl_atomic(self.out, committed)
        self.kept = len(committed)

    def start(self) -> None:
        """Writes the settings line of a new run (nothing is created before the first job is ready)."""
        if not self.log.exists() or not self.log.stat().st_size:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            _append(self.log, [{"settings": self.settings}])

    def rows(self) -> Iterator[dict[str, Any]]:
        """The kept rows committed so far."""
        yield from _read_lines(self.out)

    def commit(
        self, job: int, kept: list[dict[str, Any]], rejected: list[dict[str, Any]], **info: Any
    ) -> None:
        if job in self.done:
            raise DanluError(f"internal error: job {job} committed twice")
        self.start()
        for r in kept + rejected:
            r["meta"]["job"] = job
        _append(self.out, kept)
        entry = {"job": job, "kept": len(kept), "rejected": rejected, **info}
        _append(self.log, [entry])
        self.done.add(job)
        self.journal.append(entry)
        self.kept += len(kept)
        for r in rejected:
            self.rejected[r["meta"]["failed"]] += 1
