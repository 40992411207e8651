"""Prompt and seed-task files → conversations that end with a user turn, each with its `file:line`.

Read: OpenAI `messages` / ShareGPT `conversations` (cut after the last user turn: the teacher writes the answer),
Alpaca `instruction` (+`input`; `output` optional, so Self-Instruct's seed_tasks.jsonl reads too), `prompt` (a
string or a message list), and .txt with one prompt per line. Anything else is refused with the place and the
shapes that are read, before a single request is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.data.formats import ConversationError, located_records, to_conversation

SHAPES = ("'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction' (Alpaca / Self-Instruct seed tasks), "
          "'prompt', or a .txt file with one prompt per line")  # fmt: skip


def _to_prompt(rec: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(rec, dict):
        raise DanluError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    if isinstance(rec.get("prompt"), list):
        rec = {"messages": rec["prompt"]}
    if "instruction" in rec and "output" not in rec and "messages" not in rec:
        rec = {**rec, "output": "-"}
    if (
        "messages" in rec or "conversations" in rec
    ):  # a prompt may end with the user's turn: add a placeholder
        key = "messages" if "messages" in rec else "conversations"
        turns = rec[key]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            last = turns[-1].get("role", turns[-1].get("from"))
            if last in ("user", "human"):
                role_key = "role" if "role" in turns[-1] else "from"
                text_key = "content" if role_key == "role" else "value"
                rec = {
                    **rec,
                    key: [*turns, {role_key: "assistant" if role_key == "role" else "gpt", text_key: "-"}],
                }
    try:
        messages = to_conversation(rec, where).messages
    except ConversationError as e:
        if e.reason == "unknown_format":
            keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
            raise DanluError(f"{where}: not a prompt (keys: {keys}); expected {SHAPES}") from None
        raise DanluError(str(e)) from None
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0 or not messages[last_user]["content"].strip():
        raise DanluError(f"{where}: no user turn with text to answer")
    return messages[: last_user + 1]


def read_prompts(path: str | Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(file:line, messages ending with a user turn)]; DanluError for an unknown format or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise DanluError(
            f"{path}: no such file" if not path.exists() else f"{path}: is a folder, expected a file"
        )
    out: list[tuple[str, list[dict[str, Any]]]] = []
    if path.name.lower().endswith(".txt"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                out.append((f"{path}:{lineno}", [{"role": "user", "content": line.strip()}]))
    else:
        suffixes = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")
        if not path.name.lower().endswith(suffixes):
            raise DanluError(
                f"{path}: unknown file type (expected .jsonl, .json, .parquet or .txt with {SHAPES})"
            )
        for where, rec in located_records(path):
            if isinstance(rec, ConversationError):
                raise DanluError(str(rec))
            out.append((where, _to_prompt(rec, where)))
    if not out:
        raise DanluError(f"{path}: empty file (no prompts)")
    return out
