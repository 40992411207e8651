"""Conversation files → one normalized form: a list of OpenAI messages (plus the tool schemas offered, if any).

Three shapes are read, from JSONL, JSON (a list of objects, or one object) or Parquet, and recognized per record:

- OpenAI: ``{"messages": [{"role", "content", "tool_calls"?}, …], "tools"?: [...]}``
- ShareGPT (as LLaMA-Factory writes it): ``{"conversations": [{"from", "value"}, …], "system"?, "tools"?}`` with
  roles human/gpt/system/function_call/observation (a ``function_call`` value is the JSON call
  ``{"name", "arguments"}`` or a list of them; an ``observation`` is the tool's result); role/content keys inside
  ``conversations`` work too.
- Alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], …]}``; the user turn is
  the instruction and the input joined by a newline, as LLaMA-Factory joins them.

Why one normalized form: the chat template and the assistant-loss mask are defined on OpenAI messages only
(danlu.tokenizer.render_chat), so whatever the source, training sees exactly what serving renders.

Turns without roles (plain strings, or KdConv's ``{message, attrs}``) alternate user/assistant. Any other shape is
read through a column mapping like LLaMA-Factory's dataset_info.json (``--columns prompt=question,response=answer``
or a dataset_info.yaml beside the data; dotted names reach nested fields), see Columns. Files are read by
danlu.files (UTF-8, UTF-16, GB18030, …; .jsonl, .json, .parquet, .csv, .tsv).

Bad conversations (no assistant turn, roles out of order, an unknown role, a tool call without a result, an empty
assistant turn, malformed JSON, an unknown shape) and empty files are reported as ``file:line: problem``. With
``on_error="error"`` the first one raises; with ``"skip"`` they are dropped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from danlu import DanluError

OnError = Literal["error", "skip"]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
    "function_call": "function_call", "observation": "tool", "tool": "tool", "function": "tool",
}  # fmt: skip


class ConversationError(DanluError):
    """One bad conversation; `reason` is the short key it is counted under when skipped."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    where: str = ""  # file:line, for later errors (e.g. a dialog longer than the context)
    format: str = "openai"


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    kept: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason → count
    first_skipped: dict[str, str] = field(
        default_factory=dict
    )  # reason → the first message, to show the user

    def as_metrics(self, prefix: str = "") -> dict[str, int]:
        out = {f"{prefix}records": self.records, f"{prefix}kept": self.kept}
        out.update({f"{prefix}format_{k}": v for k, v in sorted(self.formats.items())})
        out.update({f"{prefix}skipped_{k}": v for k, v in sorted(self.skipped.items())})
        return out


# ───────────────────────── reading records with their location ─────────────────────────


def located_records(path: str | Path, *, encoding: str | None = None) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) pairs through danlu.files' one reader (any encoding; .jsonl/.json/.parquet/.csv/.tsv);
    a malformed record is yielded as a ConversationError, an over-long one as one with reason `too_large`."""
    from danlu.files import Oversized, RecordProblem
    from danlu.files import located_records as file_records

    path = Path(path)
    if not path.name.lower().endswith(
        (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
    ):
        raise DanluError(
            f"{path}: unsupported conversation file type (expected .jsonl, .json, .parquet, .csv or .tsv)"
        )
    for where, rec in file_records(path, encoding=encoding):
        if isinstance(rec, Oversized):
            yield where, ConversationError(str(rec), TOO_LARGE)
        elif isinstance(rec, RecordProblem):
            yield where, ConversationError(str(rec), rec.reason)
        else:
            yield where, rec


TOO_LARGE = (
    "too_large"  # skipped and counted whatever on_error says: such a record is never worth stopping for
)


# ───────────────────────── column mapping (LLaMA-Factory's dataset_info) ─────────────────────────

COLUMN_KEYS = ("prompt", "query", "response", "system", "history", "messages", "tools")
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "observation_tag",
    "function_tag",
)
DATASET_INFO = ("dataset_info.yaml", "dataset_info.yml", "dataset_info.json")


@dataclass
class Columns:
    """Where a dataset keeps each part of a conversation, as LLaMA-Factory's dataset_info.json says it: `columns`
    (prompt, query, response, system, history, messages, tools → field names, dotted for nested fields) and
    `tags` for message lists (role_tag, content_tag, user_tag, assistant_tag, …)."""

    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    origin: str = "--columns"

    def __bool__(self) -> bool:
        return bool(self.columns or self.tags)


def parse_columns(spec: str | Mapping[str, Any] | None, origin: str = "--columns") -> Columns:
    """`prompt=question,response=answer,role_tag=from` (or a mapping) → Columns; unknown keys are errors."""
    if not spec:
        return Columns(origin=origin)
    if isinstance(spec, str):
        pairs = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep or not value.strip():
                raise DanluError(
                    f"{origin}: {part!r} is not KEY=FIELD (e.g. prompt=question,response=answer)"
                )
            pairs[key.strip()] = value.strip()
        spec = pairs
    cols, tags = {}, {}
    for key, value in spec.items():
        if key in ("columns", "tags") and isinstance(value, Mapping):
            sub = parse_columns(value, origin)
            cols.update(sub.columns)
            tags.update(sub.tags)
        elif key in COLUMN_KEYS:
            cols[key] = str(value)
        elif key in TAG_KEYS:
            tags[key] = str(value)
        elif key not in ("file_name", "formatting", "ranking", "split", "num_samples"):
            raise DanluError(f"{origin}: unknown key {key!r}; valid: {', '.join(COLUMN_KEYS + TAG_KEYS)}")
    return Columns(cols, tags, origin)


def columns_beside(path: Path) -> Columns:
    """The mapping for `path` from a dataset_info.yaml/.json in its folder: LLaMA-Factory's shape, {name: {file_name,
    columns, tags}}, the entry whose file_name is this file's name."""
    for name in DATASET_INFO:
        info = path.parent / name
        if not info.is_file():
            continue
        from danlu.files import read_text

        text = read_text(info)
        try:
            if name.endswith(".json"):
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # json and yaml raise their own types
            raise DanluError(f"{info}: cannot parse ({e})") from None
        if not isinstance(data, Mapping):
            raise DanluError(f"{info}: expected a mapping of dataset names to {{file_name, columns, tags}}")
        for entry in data.values():
            if isinstance(entry, Mapping) and entry.get("file_name") == path.name:
                return parse_columns(entry, str(info))
    return Columns()


def apply_columns(record: Any, cols: Columns, where: str) -> Any:
    """A record in a dataset's own field names → the standard shape (Alpaca or ShareGPT) the readers know."""
    from danlu.files import field_value

    if not cols or not isinstance(record, Mapping):
        return record
    c = cols.columns
    missing = [
        f"{k}={v}"
        for k, v in c.items()
        if k in ("prompt", "response", "messages") and field_value(record, v) is None
    ]
    if missing:
        raise ConversationError(
            f"{where}: field {missing[0].split('=', 1)[1]!r} (mapped by {cols.origin} {missing[0]}) is missing; the "
            f"record has fields {_fields(record)}; fix the mapping or pass --skip-bad",
            "missing_field",
        )
    out: dict[str, Any] = {}
    if "messages" in c:
        t = cols.tags
        role_key, content_key = t.get("role_tag", "from"), t.get("content_tag", "value")
        names = {t.get("user_tag", "human"): "user", t.get("assistant_tag", "gpt"): "assistant",
                 t.get("system_tag", "system"): "system", t.get("observation_tag", "observation"): "tool",
                 t.get("function_tag", "function_call"): "function_call"}  # fmt: skip
        turns = field_value(record, c["messages"])
        if isinstance(turns, list) and turns and all(isinstance(x, Mapping) for x in turns):
            conv = []
            for i, x in enumerate(turns):
                if role_key in x:
                    raw = x[role_key]
                    conv.append({"from": names.get(raw, raw), "value": x.get(content_key)})
                else:  # no roles: alternating turns
                    conv.append({"from": ("user", "assistant")[i % 2], "value": x.get(content_key)})
            turns = conv
        out["conversations"] = turns
    else:
        out["instruction"] = field_value(record, c["prompt"]) if "prompt" in c else ""
        out["output"] = field_value(record, c["response"]) if "response" in c else None
        if "query" in c:
            out["input"] = field_value(record, c["query"])
        if "history" in c:
            out["history"] = field_value(record, c["history"])
        if out["output"] is None:
            raise ConversationError(
                f"{where}: {cols.origin} maps no 'response' (the answer field); the record has fields "
                f"{_fields(record)}",
                "missing_field",
            )
    for key in ("system", "tools"):
        if key in c:
            out[key] = field_value(record, c[key])
    return out


def _fields(record: Mapping[str, Any]) -> str:
    names = [str(k) for k in record]
    return (
        ", ".join(repr(n) for n in names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
        or "none"
    )


# ───────────────────────── the three shapes → OpenAI messages ─────────────────────────


def detect_format(record: Mapping[str, Any]) -> str | None:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def to_conversation(record: Any, where: str) -> Conversation:
    """One record of any supported shape → a validated Conversation; ConversationError says what is wrong."""
    if not isinstance(record, Mapping):
        raise ConversationError(f"{where}: expected a JSON object, got {type(record).__name__}", "bad_record")
    fmt = detect_format(record)
    if fmt == "openai":
        messages = _openai(record["messages"], where)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, where)
    elif fmt == "alpaca":
        messages = _alpaca(record, where)
    else:
        raise ConversationError(
            f"{where}: not a conversation: the record has fields {_fields(record)}; expected 'messages' (OpenAI), "
            "'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca). Map your fields with --columns "
            "(e.g. --columns prompt=question,response=answer, or messages=dialog,role_tag=speaker,content_tag=text) "
            "or a dataset_info.yaml beside the data",
            "unknown_format",
        )
    tools = _tools(record.get("tools"), where)
    validate_messages(messages, where)
    return Conversation(messages, tools, where, fmt)


def _text(value: Any, where: str, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) for p in value):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in value if p.get("type") == "text")
    raise ConversationError(f"{where}: {what} must be a string, got {type(value).__name__}", "bad_record")


def _openai(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise ConversationError(
            f"{where}: 'messages' must be a list, got {type(messages).__name__}", "bad_record"
        )
    messages = _alternating(messages, where)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConversationError(f"{where}: messages[{i}] is not an object", "bad_record")
        role = m.get("role")
        if role not in ROLES:
            raise ConversationError(
                f"{where}: messages[{i}] has unknown role {role!r}; valid roles: {', '.join(ROLES)}",
                "unknown_role",
            )
        msg: dict[str, Any] = {
            "role": role,
            "content": _text(m.get("content"), where, f"messages[{i}].content"),
        }
        if m.get("tool_calls"):
            if role != "assistant":
                raise ConversationError(f"{where}: messages[{i}] ({role}) has tool_calls", "role_order")
            msg["tool_calls"] = [_call(c, f"{where}: messages[{i}].tool_calls") for c in m["tool_calls"]]
        if role == "tool" and m.get("name"):
            msg["name"] = str(m["name"])
        out.append(msg)
    return out


TURN_TEXT_KEYS = ("content", "message", "text", "value", "utterance")


def _alternating(turns: list[Any], where: str) -> list[Any]:
    """Turns without roles — plain strings, or objects whose text is under `message`/`text`/… as KdConv stores
    `{message, attrs}` — alternate user, assistant, user… (the convention of every such dataset). Turns with
    roles are returned unchanged."""
    if not turns or any(isinstance(t, Mapping) and ("role" in t or "from" in t) for t in turns):
        return turns
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, Mapping):
            key = next((k for k in TURN_TEXT_KEYS if k in t), None)
            if key is None:
                raise ConversationError(
                    f"{where}: turn {i} has no role and no text field (fields {_fields(t)}; expected one of "
                    f"{', '.join(TURN_TEXT_KEYS)}); map it with --columns messages=FIELD,content_tag=FIELD",
                    "unknown_role",
                )
            text = t[key]
        else:
            text = t
        out.append({"role": ("user", "assistant")[i % 2], "content": text})
    return out


def _call(call: Any, where: str) -> dict[str, Any]:
    """A tool call in any of the usual spellings → the OpenAI shape with JSON-string arguments."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise ConversationError(f"{where}: tool call is not JSON: {call[:80]!r}", "bad_record") from None
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ConversationError(f"{where}: a tool call needs a 'name' and 'arguments'", "bad_record")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ConversationError(
                f"{where}: arguments of {fn['name']!r} are not JSON", "bad_record"
            ) from None
    if not isinstance(args, Mapping):
        raise ConversationError(f"{where}: arguments of {fn['name']!r} must be a JSON object", "bad_record")
    return {
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _sharegpt(record: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise ConversationError(f"{where}: 'conversations' must be a list", "bad_record")
    turns = _alternating(turns, where)
    out: list[dict[str, Any]] = []
    system = record.get("system")
    if system:
        out.append({"role": "system", "content": _text(system, where, "system")})
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping):
            raise ConversationError(f"{where}: conversations[{i}] is not an object", "bad_record")
        raw = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(str(raw).lower()) if raw is not None else None
        if role is None:
            raise ConversationError(
                f"{where}: conversations[{i}] has unknown role {raw!r}; valid: {', '.join(SHAREGPT_ROLES)}",
                "unknown_role",
            )
        if role == "function_call":
            parsed: Any = value
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    raise ConversationError(
                        f"{where}: conversations[{i}] function_call is not JSON: {value[:80]!r}", "bad_record"
                    ) from None
            calls = parsed if isinstance(parsed, list) else [parsed]
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [_call(c, f"{where}: conversations[{i}]") for c in calls]})  # fmt: skip
            continue
        msg = {"role": role, "content": _text(value, where, f"conversations[{i}].value")}
        if role == "tool" and out and out[-1].get("tool_calls"):
            msg["name"] = out[-1]["tool_calls"][0]["function"]["name"]
        out.append(msg)
    return out


def _alpaca(record: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if record.get("system"):
        out.append({"role": "system", "content": _text(record["system"], where, "system")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ConversationError(f"{where}: 'history' must be a list of [user, assistant] pairs", "bad_record")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ConversationError(f"{where}: history[{i}] is not a [user, assistant] pair", "bad_record")
        out += [{"role": "user", "content": _text(pair[0], where, f"history[{i}][0]")},
                {"role": "assistant", "content": _text(pair[1], where, f"history[{i}][1]")}]  # fmt: skip
    instruction = _text(record.get("instruction"), where, "instruction")
    extra = _text(record.get("input"), where, "input")
    user = "\n".join(x for x in (instruction, extra) if x)
    out += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(record["output"], where, "output")},
    ]
    return out


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """Tool schemas: OpenAI's list, or LLaMA-Factory's JSON string of bare function specs."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConversationError(f"{where}: 'tools' is not JSON", "bad_record") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ConversationError(f"{where}: 'tools' must be a list of tool schemas", "bad_record")
    return [
        dict(t) if t.get("type") == "function" else {"type": "function", "function": dict(t)} for t in value
    ]


def validate_messages(messages: list[dict[str, Any]], where: str) -> None:
    """The order a chat model is trained on: [system] user assistant (user assistant)…, where an assistant's
    tool calls are followed by their results (tool messages) and then an assistant turn may follow."""
    if not messages:
        raise ConversationError(f"{where}: empty conversation", "no_assistant")
    expect_user = True  # what may come next: user (True) or assistant (False)
    pending_calls = 0  # tool results still allowed after the last assistant tool call
    results = 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise ConversationError(
                    f"{where}: messages[{i}]: a system message must come first", "role_order"
                )
            continue
        if pending_calls and role != "tool" and results == 0:
            raise ConversationError(
                f"{where}: messages[{i - 1}]: tool call without a result (the next message is {role!r}, not 'tool')",
                "tool_call_without_result",
            )
        if role == "tool":
            if not pending_calls:
                raise ConversationError(
                    f"{where}: messages[{i}]: a tool result without a preceding assistant tool call",
                    "role_order",
                )
            results += 1
            if results > pending_calls:
                raise ConversationError(
                    f"{where}: messages[{i}]: more tool results than tool calls ({pending_calls})",
                    "role_order",
                )
            expect_user = False  # after results the assistant answers
            continue
        if role == "user":
            if not expect_user:
                raise ConversationError(
                    f"{where}: messages[{i}]: two user turns in a row (expected an assistant turn)",
                    "role_order",
                )
            expect_user = False
            pending_calls = results = 0
            continue
        # assistant
        if expect_user:
            what = (
                "the conversation starts"
                if i == 0 or messages[i - 1]["role"] == "system"
                else "two assistant turns"
            )
            raise ConversationError(
                f"{where}: messages[{i}]: {what} with an assistant turn where a user turn is expected",
                "role_order",
            )
        calls = m.get("tool_calls") or []
        if not calls and not (m.get("content") or "").strip():
            raise ConversationError(f"{where}: messages[{i}]: empty assistant turn", "empty_turn")
        pending_calls, results = len(calls), 0
        expect_user = not calls
    if pending_calls and results == 0:
        raise ConversationError(
            f"{where}: messages[{len(messages) - 1}]: tool call without a result (the conversation ends there)",
            "tool_call_without_result",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: no assistant turn to learn from", "no_assistant")


# ───────────────────────── files → conversations ─────────────────────────


def read_conversations(
    paths: Iterable[str | Path], *, on_error: OnError = "error", stats: ReadStats | None = None,
    columns: str | Mapping[str, Any] | Columns | None = None, encoding: str | None = None,
) -> list[Conversation]:  # fmt: skip
    """All conversations of the files, validated; bad ones raise (on_error="error") or are counted and skipped.

    `columns` maps a dataset's own field names (see Columns); without it, a dataset_info.yaml/.json beside a file
    is used. Records longer than danlu.files.MAX_RECORD_CHARS are always skipped and counted (`too_large`).
    """
    if on_error not in ("error", "skip"):
        raise DanluError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    paths = list(paths)
    stats = stats if stats is not None else ReadStats()
    given = columns if isinstance(columns, Columns) else parse_columns(columns)
    out: list[Conversation] = []
    for path in paths:
        stats.files += 1
        n_before = stats.records
        cols = given or columns_beside(Path(path))
        for where, rec in located_records(path, encoding=encoding):
            stats.records += 1
            try:
                if isinstance(rec, ConversationError):
                    raise rec
                conv = to_conversation(apply_columns(rec, cols, where), where)
            except ConversationError as e:
                if on_error == "error" and e.reason != TOO_LARGE:
                    raise ConversationError(
                        f"{e} (--skip-bad, or sft.on_error=skip, skips such conversations and counts them)",
                        e.reason,
                    ) from None
                stats.skipped[e.reason] += 1
                stats.first_skipped.setdefault(e.reason, str(e))
                continue
            stats.formats[conv.format] += 1
            stats.kept += 1
            out.append(conv)
        if stats.records == n_before:
            err = ConversationError(f"{path}:1: empty file (no conversations)", "empty_file")
            if on_error == "error":
                raise err
            stats.skipped["empty_file"] += 1
            stats.first_skipped.setdefault("empty_file", str(err))
    if not out:
        shown = "; ".join(stats.first_skipped.values())
        raise DanluError(
            f"no usable conversations in {', '.join(map(str, paths))}" + (f" ({shown})" if shown else "")
        )
    return out


def turns_to_messages(turns: list[str], system: str | None = None) -> list[dict[str, Any]]:
    """Alternating turns (user first), as chatterbot and KdConv store dialogs → OpenAI messages."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
