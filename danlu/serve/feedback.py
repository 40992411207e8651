"""The feedback store: served answers, ratings and corrections in SQLite (WAL), and their export as training data.

Why SQLite in WAL mode: the server writes from many requests while `danlu feedback export` (or a person with the
`sqlite3` shell) reads at the same time; WAL lets readers and one writer proceed together, and a crash never
leaves a half-written row. Each connection is used by one thread only (short-lived connections per call).

Export writes what the training stages read directly:
- `sft.jsonl`: {"messages": [... the prompt ..., {"role": "assistant", "content": correction}]}
- `preference.jsonl`: {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg], "source"}
  (TRL's conversational preference format) from correction-vs-original and thumbs-up-vs-thumbs-down answers to
  the same prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import write_jsonl_atomic
from danlu.serve.memory import scope_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    title TEXT
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT NOT NULL,
    idx INTEGER NOT NULL DEFAULT 0,
    conversation_id TEXT REFERENCES conversations(id),
    model TEXT NOT NULL,
    messages TEXT NOT NULL,          -- the prompt: the client's messages as JSON (no server-added context)
    prompt_hash TEXT NOT NULL,       -- groups answers to the same prompt (regenerate) into preference pairs
    answer TEXT NOT NULL,
    finish_reason TEXT,
    mean_logprob REAL,
    params TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (id, idx)
);
CREATE INDEX IF NOT EXISTS responses_prompt ON responses(prompt_hash);
CREATE TABLE IF NOT EXISTS ratings (
    response_id TEXT NOT NULL,
    idx INTEGER NOT NULL DEFAULT 0,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
    comment TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (response_id, idx)
);
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL,
    idx INTEGER NOT NULL DEFAULT 0,
    correction TEXT NOT NULL,
    created REAL NOT NULL,
    scope TEXT NOT NULL DEFAULT 'anonymous',  -- whose prompts the correction memory may put it in
    approved REAL                             -- when an admin shared it with every user (NULL: not shared)
);
CREATE INDEX IF NOT EXISTS corrections_response ON corrections(response_id, idx);
"""
# Columns added after the first release, for databases created before them.
MIGRATIONS = {
    "corrections": {
        "scope": "ALTER TABLE corrections ADD COLUMN scope TEXT NOT NULL DEFAULT 'anonymous'",
        "approved": "ALTER TABLE corrections ADD COLUMN approved REAL",
    }
}


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    canonical = [{"role": m.get("role"), "content": m.get("content") or ""} for m in messages]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


class FeedbackStore:
    """Thread-safe access to the feedback database at `path` (created with its schema when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise DanluError(f"{self.path}: is a folder, expected an SQLite file for feedback")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                for table, columns in MIGRATIONS.items():
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for column, sql in columns.items():
                        if column not in have:
                            db.execute(sql)
        except sqlite3.DatabaseError as e:
            raise DanluError(f"{self.path}: not a usable SQLite feedback database ({e})") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with db:  # commits on success, rolls back on error
                yield db
        finally:
            db.close()

    # ---- writing -------------------------------------------------------------------------------------------
    def record_response(
        self,
        response_id: str,
        *,
        model: str,
        messages: list[dict[str, Any]],
        answer: str,
        idx: int = 0,
        conversation_id: str | None = None,
        finish_reason: str | None = None,
        mean_logprob: float | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        now = time.time()
        with self._lock, self._connect() as db:
            if conversation_id:
                title = next((m.get("content") for m in messages if m.get("role") == "user"), None)
                db.execute(
                    "INSERT INTO conversations(id, created, updated, title) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated",
                    (conversation_id, now, now, (title or "")[:200]),
                )
            db.execute(
                "INSERT OR REPLACE INTO responses(id, idx, conversation_id, model, messages, prompt_hash, answer, "
                "finish_reason, mean_logprob, params, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    response_id,
                    idx,
                    conversation_id,
                    model,
                    json.dumps(messages, ensure_ascii=False),
                    prompt_hash(messages),
                    answer,
                    finish_reason,
                    mean_logprob,
                    json.dumps(params or {}, ensure_ascii=False),
                    now,
                ),
            )

    def response(self, response_id: str, idx: int = 0) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM responses WHERE id = ? AND idx = ?", (response_id, idx)
            ).fetchone()
        return _response_dict(row) if row else None

    def rate(self, response_id: str, rating: int, idx: int = 0, comment: str | None = None) -> None:
        self._require(response_id, idx)
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO ratings(response_id, idx, rating, comment, created) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(response_id, idx) DO UPDATE SET rating = excluded.rating, "
                "comment = COALESCE(excluded.comment, ratings.comment), created = excluded.created",
                (response_id, idx, int(rating), comment, time.time()),
            )

    def correct(
        self, response_id: str, correction: str, idx: int = 0, scope: str | None = None
    ) -> dict[str, Any]:
        """Stores a correction in `scope` (default: the scope of the user who asked, so a correction helps that
        user at once and others only once an admin approves it); returns the corrected response with the
        correction's `correction_id` and `scope` (its prompt feeds the correction memory)."""
        correction = correction.strip()
        if not correction:
            raise DanluError("correction is empty")
        resp = self._require(response_id, idx)
        scope = scope or scope_of((resp.get("params") or {}).get("user"))
        with self._lock, self._connect() as db:
            cur = db.execute(
                "INSERT INTO corrections(response_id, idx, correction, created, scope) VALUES (?, ?, ?, ?, ?)",
                (response_id, idx, correction, time.time(), scope),
            )
        return {
            **resp,
            "correction": correction,
            "correction_id": cur.lastrowid,
            "scope": scope,
            "approved": False,
        }

    def approve(self, correction_id: int) -> dict[str, Any]:
        """Marks a correction as shared with every user (an admin's decision); returns it. KeyError if absent."""
        with self._lock, self._connect() as db:
            n = db.execute(
                "UPDATE corrections SET approved = COALESCE(approved, ?) WHERE id = ?",
                (time.time(), correction_id),
            ).rowcount
        if not n:
            raise KeyError(f"no correction {correction_id}")
        return next(c for c in self.corrections(latest_only=False) if c["correction_id"] == correction_id)

    def _require(self, response_id: str, idx: int) -> dict[str, Any]:
        resp = self.response(response_id, idx)
        if resp is None:
            raise KeyError(f"no stored response {response_id!r} (index {idx}); only answers requested with "
                           "store=true are kept")  # fmt: skip
        return resp

    # ---- reading -------------------------------------------------------------------------------------------
    def corrections(self, *, latest_only: bool = True) -> list[dict[str, Any]]:
        """Corrections (by default the latest per response) with their prompt, the original answer, their id,
        scope and whether an admin approved them for everyone."""
        latest = (
            "WHERE c.id = (SELECT MAX(c2.id) FROM corrections c2 WHERE c2.response_id = c.response_id "
            "AND c2.idx = c.idx) "
            if latest_only
            else ""
        )
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.*, c.correction, c.created AS corrected, c.id AS correction_id, c.scope, c.approved "
                "FROM corrections c JOIN responses r ON r.id = c.response_id AND r.idx = c.idx "
                + latest
                + "ORDER BY c.id"
            ).fetchall()
        return [
            {**_response_dict(r), "correction": r["correction"], "correction_id": r["correction_id"],
             "scope": r["scope"], "approved": r["approved"] is not None}
            for r in rows
        ]  # fmt: skip

    def rated(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.*, t.rating FROM ratings t JOIN responses r ON r.id = t.response_id AND r.idx = t.idx "
                "WHERE t.rating != 0 ORDER BY t.created"
            ).fetchall()
        return [{**_response_dict(r), "rating": r["rating"]} for r in rows]

    def stats(self) -> dict[str, int]:
        with self._connect() as db:
            one = lambda q: db.execute(q).fetchone()[0]  # noqa: E731
            return {
                "conversations": one("SELECT COUNT(*) FROM conversations"),
                "responses": one("SELECT COUNT(*) FROM responses"),
                "thumbs_up": one("SELECT COUNT(*) FROM ratings WHERE rating = 1"),
                "thumbs_down": one("SELECT COUNT(*) FROM ratings WHERE rating = -1"),
                "corrections": one("SELECT COUNT(*) FROM corrections"),
            }

    # ---- export --------------------------------------------------------------------------------------------
    def export(self, out: str | Path, *, include_upvoted: bool = False) -> dict[str, int]:
        """Writes sft.jsonl and preference.jsonl into `out`; returns row counts."""
        out = Path(out)
        sft: list[dict[str, Any]] = []
        pairs: list[dict[str, Any]] = []
        seen_sft: set[tuple[str, str]] = set()
        for c in self.corrections():
            key = (c["prompt_hash"], c["correction"])
            if key not in seen_sft:
                seen_sft.add(key)
                sft.append(
                    {"messages": [*c["messages"], _assistant(c["correction"])], "source": "correction"}
                )
            if c["answer"].strip() != c["correction"].strip():
                pairs.append(_pair(c["messages"], c["correction"], c["answer"], "correction"))
        rated = self.rated()
        if include_upvoted:
            for r in rated:
                key = (r["prompt_hash"], r["answer"])
                if r["rating"] > 0 and key not in seen_sft:
                    seen_sft.add(key)
                    sft.append({"messages": [*r["messages"], _assistant(r["answer"])], "source": "thumbs_up"})
        by_prompt: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for r in rated:
            by_prompt.setdefault(r["prompt_hash"], {}).setdefault(r["rating"], []).append(r)
        for groups in by_prompt.values():
            for good in groups.get(1, []):
                for bad in groups.get(-1, []):
                    if good["answer"].strip() != bad["answer"].strip():
                        pairs.append(_pair(good["messages"], good["answer"], bad["answer"], "thumbs"))
        out.mkdir(parents=True, exist_ok=True)
        n_sft = write_jsonl_atomic(out / "sft.jsonl", sft)
        n_pref = write_jsonl_atomic(out / "preference.jsonl", pairs)
        return {"sft": n_sft, "preference": n_pref}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _pair(prompt: list[dict[str, Any]], chosen: str, rejected: str, source: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": [_assistant(chosen)],
        "rejected": [_assistant(rejected)],
        "source": source,
    }


def _response_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["messages"] = json.loads(d["messages"])
    d["params"] = json.loads(d.get("params") or "{}")
    return d
