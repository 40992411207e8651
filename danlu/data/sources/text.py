"""Plain text inputs: `.txt` (one document per file), JSONL (optionally .gz/.zst), a JSON list, or Parquet.

Rows keep their own `id`, `url`, `domain`, `lang`, `source` fields when the input does not set them. A row
with OpenAI `messages` and no text is a conversation: its text for pretraining is the turns joined, and the
messages go on to the dialog output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.data.sources.base import SourceError, SourceReader, iter_json_lines, source_error
from danlu.files import read_text


class TextReader(SourceReader):
    source_name = "text"
    default_domain = "web"

    def _record(self, obj: dict[str, Any], path: str, pos: str) -> dict[str, Any] | SourceError:
        field = self.options.get("text_field", "text")
        text = obj.get(field)
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            text = "\n".join(text)  # a poem's `paragraphs`, a document's lines
        msgs = obj.get("messages")
        if text is None and not _is_messages(msgs):
            from danlu.data.formats import ConversationError, detect_format, to_conversation

            if detect_format(obj) is not None:  # Alpaca, ShareGPT, role-less turns (KdConv): OpenAI messages
                try:
                    msgs = to_conversation(obj, f"{path}:{pos}").messages
                except ConversationError as e:
                    return SourceError(path, pos, str(e).split(": ", 1)[-1])
        if text is None and isinstance(msgs, list) and msgs:
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                return SourceError(path, pos, "'messages' must be a list of {role, content} objects")
            text = "\n\n".join(m["content"] for m in msgs)
        if not isinstance(text, str):
            what = "missing" if text is None else f"not a string ({type(text).__name__})"
            return SourceError(path, pos, f"field {field!r} is {what}")
        rec = {k: obj[k] for k in ("id", "url", "domain", "lang", "title") if obj.get(k) not in (None, "")}
        rec["text"] = text
        if isinstance(msgs, list) and msgs:
            rec["messages"] = msgs
        return rec

    def read_file(self, path: str) -> Iterator[dict[str, Any] | SourceError]:
        name = Path(path).name.lower()
        base = name.removesuffix(".gz").removesuffix(".zst").removesuffix(".bz2")
        if base.endswith((".jsonl", ".ndjson")):
            for lineno, obj in iter_json_lines(path):
                yield obj if isinstance(obj, SourceError) else self._record(obj, path, str(lineno))
        elif base.endswith(".json"):
            try:
                data = json.loads(read_text(path))
            except json.JSONDecodeError as e:
                raise SourceError(path, f"{e.lineno}:{e.colno}", f"malformed JSON ({e.msg})") from None
            except DanluError as e:  # undecodable bytes: the message names the line
                raise source_error(path, e) from None
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise SourceError(path, None, "expected a JSON list of objects")
            for i, obj in enumerate(data):
                if not isinstance(obj, dict):
                    yield SourceError(path, f"item {i}", "not a JSON object")
                else:
                    yield self._record(obj, path, f"item {i}")
        elif base.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
                row = 0
                for batch in pf.iter_batches(batch_size=1024):
                    for obj in batch.to_pylist():
                        row += 1
                        yield self._record(obj, path, f"row {row}")
            except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
                raise SourceError(path, None, f"cannot read Parquet file ({e})") from None
        elif base.endswith((".txt", ".md")):
            try:
                text = read_text(path)
            except DanluError as e:
                raise source_error(path, e) from None
            yield {"text": text, "id": Path(path).name}
        else:
            raise SourceError(path, None, "unsupported file type (expected .txt, .jsonl, .json or .parquet)")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
