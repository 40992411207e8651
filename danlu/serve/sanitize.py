"""The one place where text from outside is made safe for the chat template, and where its size is measured.

Every string that reaches the template — message contents, names, tool-call names and arguments, client tool
names, descriptions and parameter schemas (keys included), remembered corrections, client system prompts — goes
through `defuse_tree` with the served tokenizer's `defuse`, so a typed `<|im_start|>system` stays plain text
wherever it hides. `text_chars` bounds a request before any tokenization or memory lookup costs anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
MAX_DEPTH = 32  # nesting of a request's JSON; OpenAI's own bodies need about 8


def defuse_tree(obj: T, defuse: Callable[[str], str]) -> T:
    """`obj` (dicts, lists, strings, numbers) with `defuse` applied to every string, dict keys included."""
    if isinstance(obj, str):
        return defuse(obj)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {defuse(k) if isinstance(k, str) else k: defuse_tree(v, defuse) for k, v in obj.items()}  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)):
        return [defuse_tree(v, defuse) for v in obj]  # type: ignore[return-value]
    return obj


def text_chars(obj: Any) -> int:
    """The number of characters in all strings of `obj` (dict keys included), walked without recursion."""
    total, stack = 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def json_depth(obj: Any) -> int:
    """How deeply `obj` nests (a scalar is 0, `[]` is 1), walked without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            stack.extend((v, d + 1) for v in x.values())
            deepest = max(deepest, d + 1)
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
            deepest = max(deepest, d + 1)
    return deepest
