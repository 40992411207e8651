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


def located_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) pairs; malformed JSON is yielded as a ConversationError instead of a record.

    JSON lists are scanned item by item so that every record knows its line, as JSONL records do.
    """
    path = Path(path)
    if not path.exists():
        raise DanluError(f"{path}: no such file")
    if path.is_dir():
        raise DanluError(f"{path}: is a folder, expected a file")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        f"{path}:{lineno}",
                        ConversationError(
                            f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})", "malformed_json"
                        ),
                    )
    elif name.endswith(".json"):
        yield from _json_items(path, path.read_text(encoding="utf-8"))
    elif name.endswith(".parquet"):
        from danlu.files import read_records

        for i, rec in enumerate(read_records(path), 1):
            yield f"{path}:row {i}", rec
    else:
        raise DanluError(f"{path}: unsupported conversation file type (expected .jsonl, .json or .parquet)")


def _json_items(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos < len(text) and text[pos] == "\ufeff":
        pos = skip_ws(pos + 1)
    if pos >= len(text):
        return
    if text[pos] != "[":
        try:
            obj, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DanluError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}:{line_of(pos)}", obj
        return
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:  # the rest of a JSON list cannot be resynchronized: always fatal
            raise DanluError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}:{line_of(pos)}", obj
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DanluError(f"{path}:{line_of(pos)}: malformed JSON (expected ',' or ']' after an item)")


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
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise ConversationError(
            f"{where}: not a conversation (keys: {keys}); expected 'messages' (OpenAI), 'conversations' "
            "(ShareGPT) or 'instruction'/'output' (Alpaca)",
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
    paths: Iterable[str | Path], *, on_error: OnError = "error", stats: ReadStats | None = None
) -> list[Conversation]:
    """All conversations of the files, validated; bad ones raise (on_error="error") or are counted and skipped."""
    if on_error not in ("error", "skip"):
        raise DanluError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    paths = list(paths)
    stats = stats if stats is not None else ReadStats()
    out: list[Conversation] = []
    for path in paths:
        stats.files += 1
        n_before = stats.records
        for where, rec in located_records(path):
            stats.records += 1
            try:
                if isinstance(rec, ConversationError):
                    raise rec
                conv = to_conversation(rec, where)
            except ConversationError as e:
                if on_error == "error":
                    raise
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
