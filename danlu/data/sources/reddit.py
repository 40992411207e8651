"""Reddit pushshift dumps (submissions and comments, JSONL, plain or `.zst`) → threads and multi-turn dialogs.

A thread is a submission with its comment tree. Each thread gives one forum document (title, post and
comments in reading order) and, when it has a reply chain, one conversation: starting from the post, follow the
best-scored reply at each level; turns alternate user/assistant and end on an assistant turn. Deleted/removed
content and bots (AutoModerator, names ending in "bot", "I am a bot" footers) are dropped with their replies.

Comments and submissions usually sit in different files, so a thread can only be built once all files are read.
In the pipeline the files are split among tasks rather than parsed by all: `RedditPartition` (a stage of its own)
has each task parse its share of the files and send every record to the task that owns its thread
(`crc32(thread id) % world_size`), and `RedditReader` with `options["partitions"]` then reads only what was sent to
its rank. Without that option (a reader used on its own) every task reads all the files and keeps its threads.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import xxhash
from datatrove.data import DocumentsPipeline

from danlu.data.sources.base import SourceError, SourceReader, iter_json_lines

DELETED = {"[deleted]", "[removed]", "[deleted by user]", ""}
BOT_NAMES = {"automoderator", "remindmebot", "sneakpeekbot", "wikitextbot", "tweetposter", "repostsleuthbot"}
_BOT_TEXT = re.compile(r"i am a bot|i'm a bot|this action was performed automatically", re.IGNORECASE)


def is_bot(author: str, body: str) -> bool:
    a = (author or "").lower()
    return a in BOT_NAMES or a.endswith("bot") or a.endswith("_bot") or bool(_BOT_TEXT.search(body or ""))


def _strip_prefix(x: str) -> str:
    return x.split("_", 1)[1] if x[:3] in ("t1_", "t3_") else x


def is_submission(obj: dict[str, Any]) -> bool:
    """A pushshift submission (it has a title or a t3_ name); otherwise a comment when it has a body."""
    return "title" in obj or str(obj.get("name", "")).startswith("t3_")


def _score(r: dict[str, Any]) -> int:
    try:
        return int(r.get("score") or 0)
    except (TypeError, ValueError):
        return 0


class RedditReader(SourceReader):
    source_name = "reddit"
    default_domain = "forum"

    def thread_of(self, obj: dict[str, Any], path: str, lineno: int) -> str | SourceError:
        """The id of the thread a submission or comment belongs to, or why the record has none."""
        if is_submission(obj):
            tid = _strip_prefix(str(obj.get("id") or obj.get("name") or ""))
            return tid or SourceError(path, str(lineno), "submission without an id")
        if "body" in obj:
            link = _strip_prefix(str(obj.get("link_id") or ""))
            return link or SourceError(path, str(lineno), "comment without a link_id")
        msg = "neither a submission (title) nor a comment (body): not a pushshift dump?"
        return SourceError(path, str(lineno), msg)

    def partition_files(self, rank: int) -> list[str]:
        return sorted(glob.glob(os.path.join(str(self.options["partitions"]), f"{rank:05d}", "*.jsonl")))

    def read_all(self, rank: int, world_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
        subs: dict[str, dict[str, Any]] = {}
        comments: dict[str, list[dict[str, Any]]] = defaultdict(list)
        partitioned = bool(self.options.get("partitions"))
        # partitioned: only what RedditPartition sent to this rank; else every file, keeping this rank's threads
        for path in self.partition_files(rank) if partitioned else self.files:
            try:
                for lineno, obj in iter_json_lines(path):
                    tid = obj if isinstance(obj, SourceError) else self.thread_of(obj, path, lineno)
                    if isinstance(tid, SourceError):
                        self.error(tid, rank)
                    elif partitioned or zlib.crc32(tid.encode()) % world_size == rank:
                        if is_submission(obj):
                            subs[tid] = obj
                        else:
                            comments[tid].append(obj)
            except SourceError as e:
                self.error(e, rank)
        for tid in sorted(set(subs) | set(comments)):
            rec = self._thread(tid, subs.get(tid), comments.get(tid, []))
            if rec is not None:
                rec["_order"] = xxhash.xxh64_intdigest(tid.encode())  # order_key: the same on any task count
                yield self.files[0], rec

    def _keep(self, r: dict[str, Any], text_key: str) -> bool:
        text = (r.get(text_key) or "").strip()
        if r.get("author") in ("[deleted]",) and text in DELETED or text in DELETED - {""}:
            self.stat_update("deleted_dropped")
            return False
        if is_bot(r.get("author") or "", text):
            self.stat_update("bot_dropped")
            return False
        return bool(text) or text_key == "selftext"

    def _thread(
        self, tid: str, sub: dict[str, Any] | None, comments: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        children: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in comments:
            if self._keep(c, "body"):
                children[_strip_prefix(str(c.get("parent_id") or ""))].append(c)
        for lst in children.values():
            lst.sort(key=lambda c: (-_score(c), str(c.get("id"))))
        if sub is not None and not self._keep(sub, "selftext"):
            return None
        if sub is not None and (sub.get("title") or "").strip() in DELETED:
            return None
        first = ""
        if sub is not None:
            first = f"{sub.get('title', '').strip()}\n\n{(sub.get('selftext') or '').strip()}".strip()
        # reading order: depth-first through the kept comments
        parts = [first] if first else []

        def walk(pid: str, depth: int) -> None:
            for c in children.get(pid, []):
                parts.append(c["body"].strip())
                if depth < 50:
                    walk(str(c.get("id")), depth + 1)

        walk(tid, 0)
        if not parts:
            return None
        # the dialog: post → best reply → best reply to it …
        turns = [first] if first else []
        node = tid
        while children.get(node):
            best = children[node][0]
            turns.append(best["body"].strip())
            node = str(best.get("id"))
        if len(turns) % 2:
            turns = turns[:-1]
        rec: dict[str, Any] = {"id": tid, "text": "\n\n".join(parts)}
        if sub is not None:
            rec["title"] = sub.get("title", "")
            link = sub.get("permalink") or ""
            rec["url"] = (
                f"https://www.reddit.com{link}" if link.startswith("/") else link or sub.get("url", "")
            )
        if len(turns) >= int(self.options.get("min_turns", 2)):
            roles = ["user", "assistant"]
            rec["messages"] = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
        self.stat_update("threads")
        return rec


class RedditPartition(RedditReader):
    """A stage before the readers: each task parses its share of an input's reddit files (every `world_size`-th
    from `rank`) and writes each record to `<partitions>/<owner rank>/<rank>.jsonl`, where the owner is the task
    that builds the record's thread. Bad records are reported here (counted under the source's `read:` step), so
    the readers afterwards see only well-formed records of their own threads."""

    error_suffix = ".partition"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        folder = str(self.options["partitions"])
        outs: dict[int, Any] = {}
        try:
            for path in self.files_for_rank(rank, world_size):
                try:
                    for lineno, obj in iter_json_lines(path):
                        tid = obj if isinstance(obj, SourceError) else self.thread_of(obj, path, lineno)
                        if isinstance(tid, SourceError):
                            self.error(tid, rank)
                            continue
                        owner = zlib.crc32(tid.encode()) % world_size
                        if owner not in outs:
                            os.makedirs(os.path.join(folder, f"{owner:05d}"), exist_ok=True)
                            name = os.path.join(folder, f"{owner:05d}", f"{rank:05d}.jsonl")
                            outs[owner] = open(name, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
                        outs[owner].write(json.dumps(obj, ensure_ascii=False) + "\n")
                        self.stat_update("records_partitioned")
                except SourceError as e:  # also a file that is not what its name says (danlu.files)
                    self.error(e, rank)
        finally:
            for f in outs.values():
                f.close()
            if self._error_file is not None:
                self._error_file.close()
                self._error_file = None
