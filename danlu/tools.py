"""The tools a danlu chat model can call: today's date and a calculator.

A model cannot know today's date (it stopped learning on its training day) and a small model cannot multiply
big numbers, so the world corpus teaches it to ask: the assistant writes a tool call in the chat template's
shape (Qwen / Hermes style), the runtime executes it, and the result comes back as a `tool` message.

Assistant message, OpenAI shape::

    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
        {"name": "calculator", "arguments": "{\\"expression\\": \\"1234*5678\\"}"}}]}

rendered by the chat template as::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "1234*5678"}}
    </tool_call>
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import math
import operator
import re
import time
from typing import Any

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_date",
            "description": "Today's date and the day of the week. 今天的日期和星期。",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluates an arithmetic expression (+ - * / // % ** and parentheses). 计算算式。",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 1234*5678"}},
                "required": ["expression"],
            },
        },
    },
]
TOOL_NAMES = [t["function"]["name"] for t in TOOL_SCHEMAS]

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64  # |b| in a ** b
MAX_BASE = 10**6  # |a| in a ** b
MAX_RESULT_DIGITS = 1000  # any intermediate integer; far below Python's 4,300-digit str() limit
MAX_SECONDS = 0.5


class ToolError(ValueError):
    """A tool call that cannot be executed; its message is fed back to the model as the tool's result."""


def calculate(expression: str) -> int | float:
    """Evaluates arithmetic only: numbers, + - * / // % ** and parentheses. Never code, names or calls.

    Every way arithmetic can fail or run away becomes a ToolError the model reads: exponents over MAX_EXPONENT or
    bases over MAX_BASE, integers over MAX_RESULT_DIGITS digits, float overflow, complex results (`(-8)**0.5`),
    division by zero, and evaluation over MAX_SECONDS. A tool call must never turn into a server error.
    """
    expr = expression.replace("×", "*").replace("÷", "/").replace("，", "").replace(",", "").strip()
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    deadline = time.monotonic() + MAX_SECONDS
    max_bits = int(MAX_RESULT_DIGITS * math.log2(10))

    def checked(value: Any) -> int | float:
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the result is too large")
        if isinstance(value, int) and value.bit_length() > max_bits:
            raise ToolError(f"the result has more than {MAX_RESULT_DIGITS} digits")
        if time.monotonic() > deadline:
            raise ToolError(f"the calculation took longer than {MAX_SECONDS} s")
        return value

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_BASE):
                raise ToolError("exponent too large")
            try:
                return checked(_BINARY[type(node.op)](left, right))
            except ToolError:
                raise
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            except (OverflowError, ValueError, TypeError):  # float overflow, complex operands of // or %
                raise ToolError(f"cannot compute {ast.unparse(node)}") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return checked(_UNARY[type(node.op)](ev(node.operand)))
        raise ToolError(f"not an arithmetic expression: {expression!r}")

    try:
        value = ev(tree)
    except RecursionError:
        raise ToolError("expression nested too deeply") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return round(value, 10) if isinstance(value, float) else value


def format_date(day: _dt.date) -> str:
    """The get_date result: ISO date plus weekday in both languages, e.g. `2026-11-21 Saturday 星期六`."""
    weekdays_zh = "一二三四五六日"
    return f"{day.isoformat()} {day.strftime('%A')} 星期{weekdays_zh[day.weekday()]}"


def run_tool(name: str, arguments: dict[str, Any] | str | None, today: _dt.date | None = None) -> str:
    """Executes one tool call and returns its result as text (errors as text too, for the model to read)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"error: arguments are not JSON: {arguments!r}"
    arguments = {} if arguments is None else arguments
    if not isinstance(arguments, dict):
        return f"error: arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        if name == "get_date":
            return format_date(today or _dt.date.today())
        if name == "calculator":
            return str(calculate(str(arguments.get("expression", ""))))
    except ToolError as e:
        return f"error: {e}"
    return f"error: unknown tool {name!r}; available: {', '.join(TOOL_NAMES)}"


_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """How the chat template writes one call inside an assistant turn."""
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Splits generated assistant text into (content, OpenAI-shaped tool_calls); malformed calls stay content."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            obj = json.loads(match.group(1))
            name, args = obj["name"], obj.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return match.group(0)
        calls.append(
            {
                "id": f"call_{len(calls)}",
                "type": "function",
                "function": {"name": str(name), "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
        return ""

    content = _CALL_RE.sub(take, text).strip()
    return content, calls
