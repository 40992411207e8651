"""Stack Exchange `Posts.xml` (the archive.org data dump): questions with their accepted or best answer.

Each answered question becomes a Q&A document for pretraining and a two-turn conversation (`messages`) for SFT.
A question without an accepted answer takes its best-scored answer (score ≥ `min_answer_score`); a question
without any answer is dropped and counted. Dumps list posts by Id, so a question comes before its answers and its
AcceptedAnswerId is known when they arrive; but an answer may come years (gigabytes) after its question, so no
question can be emitted before the whole file is read.

Bounded memory: the file is streamed (`iter_xml_elements`) and questions and the best answer so far per question
go to a temporary SQLite file beside the system's temp folder (`$TMPDIR`; disk use up to about the dump's size,
removed afterwards), not to Python dicts: a 10 GB Posts.xml is read in the memory of one post plus SQLite's page
cache (`CACHE_KIB`). Documents then come out in the order their questions appear in the file.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

from danlu.data.sources.base import SourceError, SourceReader, iter_xml_elements
from danlu.data.sources.html import html_to_text

# SQLite page cache per file being read: the spill's bound in memory (64 MiB measured no faster)
CACHE_KIB = 16 * 1024
ACCEPTED = 1 << 30  # the accepted answer's effective score: it wins over any scored answer

_SCHEMA = """
CREATE TABLE q (n INTEGER PRIMARY KEY, id TEXT UNIQUE, title TEXT, body TEXT, accepted TEXT);
CREATE TABLE a (qid TEXT PRIMARY KEY, score INTEGER, aid TEXT, body TEXT);
"""
_UPSERT_Q = (
    "INSERT INTO q (id, title, body, accepted) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
    "title = excluded.title, body = excluded.body, accepted = excluded.accepted"
)
_UPSERT_A = (
    "INSERT INTO a VALUES (?, ?, ?, ?) ON CONFLICT(qid) DO UPDATE SET "
    "score = excluded.score, aid = excluded.aid, body = excluded.body WHERE excluded.score > a.score"
)


def _spill(folder: str) -> sqlite3.Connection:
    db = sqlite3.connect(os.path.join(folder, "posts.sqlite"))
    for pragma in (
        "journal_mode = OFF",
        "synchronous = OFF",
        f"cache_size = -{CACHE_KIB}",
        "temp_store = FILE",
    ):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(_SCHEMA)
    return db


class StackExchangeReader(SourceReader):
    source_name = "stackexchange"
    default_domain = "qa"

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        with tempfile.TemporaryDirectory(prefix="danlu-posts-") as tmp:
            db = _spill(tmp)
            try:
                self._load(path, db)
                yield from self._emit(db)
            finally:
                db.close()

    def _load(self, path: str, db: sqlite3.Connection) -> None:
        """Questions and the best answer so far per question, from the stream of rows into the spill file."""
        min_score = int(self.options.get("min_answer_score", 0))
        rows = 0
        try:
            for tag, elem in iter_xml_elements(path, "posts", "a Stack Exchange Posts.xml dump"):
                if tag != "row":
                    raise SourceError(
                        path,
                        f"row {rows + 1}",
                        f"element <{tag}> inside <posts>: not a Stack Exchange Posts.xml dump",
                    )
                rows += 1
                a = elem.attrib
                kind = a.get("PostTypeId")
                if kind == "1":
                    db.execute(
                        _UPSERT_Q,
                        (
                            a.get("Id", ""),
                            a.get("Title", ""),
                            a.get("Body", ""),
                            a.get("AcceptedAnswerId", ""),
                        ),
                    )
                elif kind == "2":
                    qid = a.get("ParentId", "")
                    try:
                        score = int(a.get("Score", "0"))
                    except ValueError:
                        score = 0
                    aid = a.get("Id", "")
                    if aid:
                        hit = db.execute("SELECT accepted FROM q WHERE id = ?", (qid,)).fetchone()
                        if hit is not None and hit[0] == aid:
                            score = ACCEPTED
                    if score >= min_score:
                        db.execute(_UPSERT_A, (qid, score, aid, a.get("Body", "")))
        except ET.ParseError as e:
            line, col = e.position
            raise SourceError(
                path, f"{line}:{col}", f"malformed or truncated XML after {rows} rows ({e})"
            ) from None
        except (EOFError, OSError) as e:
            raise SourceError(
                path, f"row {rows + 1}", f"corrupt or truncated compressed file ({e})"
            ) from None
        db.commit()

    def _emit(self, db: sqlite3.Connection) -> Iterator[dict[str, Any]]:
        base_url = str(self.options.get("base_url") or "").rstrip("/")
        cursor = db.execute(
            "SELECT q.id, q.title, q.body, a.body FROM q LEFT JOIN a ON a.qid = q.id ORDER BY q.n"
        )
        for qid, title, body, answer_html in cursor:
            if answer_html is None:
                self.stat_update("questions_without_answer")
                continue
            question = html_to_text(body)
            answer = html_to_text(answer_html)
            title = title.strip()
            if not answer or not (title or question):
                self.stat_update("questions_without_answer")
                continue
            prompt = f"{title}\n\n{question}".strip()
            yield {
                "id": qid,
                "title": title,
                "url": f"{base_url}/questions/{qid}" if base_url else "",
                "text": f"{prompt}\n\n{answer}",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            }
