"""Stack Exchange `Posts.xml` (the archive.org data dump): questions with their accepted or best answer.

Each answered question becomes a Q&A document for pretraining and a two-turn conversation (`messages`) for SFT.
A question without an accepted answer takes its best-scored answer (score ≥ `min_answer_score`); a question
without any answer is dropped and counted. Answers may come before or after their question in the file, so
the file is read whole (questions and the best answer so far) before documents are emitted. Dumps list posts
by Id, so a question comes before its answers and its AcceptedAnswerId is known when they arrive.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

from danlu.data.sources.base import SourceError, SourceReader, open_binary
from danlu.data.sources.html import html_to_text


class StackExchangeReader(SourceReader):
    source_name = "stackexchange"
    default_domain = "qa"

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        min_score = int(self.options.get("min_answer_score", 0))
        base_url = str(self.options.get("base_url") or "").rstrip("/")
        questions: dict[str, dict[str, str]] = {}
        best: dict[str, tuple[int, str, str]] = {}  # question id → (score, answer id, body)
        accepted: dict[str, str] = {}  # answer id → question id
        rows = 0
        try:
            with open_binary(path) as f:
                for _, elem in ET.iterparse(f, events=("end",)):
                    if elem.tag != "row":
                        if elem.tag not in ("posts",):
                            raise SourceError(
                                path, f"element {elem.tag!r}", "not a Stack Exchange Posts.xml file"
                            )
                        continue
                    rows += 1
                    a = elem.attrib
                    kind = a.get("PostTypeId")
                    if kind == "1":
                        questions[a.get("Id", "")] = {
                            "title": a.get("Title", ""),
                            "body": a.get("Body", ""),
                            "accepted": a.get("AcceptedAnswerId", ""),
                            "tags": a.get("Tags", ""),
                        }
                        if a.get("AcceptedAnswerId"):
                            accepted[a["AcceptedAnswerId"]] = a.get("Id", "")
                    elif kind == "2":
                        qid = a.get("ParentId", "")
                        try:
                            score = int(a.get("Score", "0"))
                        except ValueError:
                            score = 0
                        if a.get("Id") in accepted:
                            score = 1 << 30  # the accepted answer wins over any score
                        if score >= min_score and (qid not in best or score > best[qid][0]):
                            best[qid] = (score, a.get("Id", ""), a.get("Body", ""))
                    elem.clear()
        except ET.ParseError as e:
            line, col = e.position
            raise SourceError(
                path, f"{line}:{col}", f"malformed or truncated XML after {rows} rows ({e})"
            ) from None
        except (EOFError, OSError) as e:
            raise SourceError(
                path, f"row {rows + 1}", f"corrupt or truncated compressed file ({e})"
            ) from None
        for qid, q in questions.items():
            ans = best.get(qid)
            if ans is None:
                self.stat_update("questions_without_answer")
                continue
            question = html_to_text(q["body"])
            answer = html_to_text(ans[2])
            title = q["title"].strip()
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
