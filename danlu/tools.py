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
import operator
import re
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


class ToolError(ValueError):
    """A tool call that cannot be executed; its message is fed back to the model as the tool's result."""


def calculate(expression: str) -> int | float:
    """Evaluates arithmetic only: numbers, + - * / // % ** and parentheses. Never code, names or calls."""
    expr = expression.replace("×", "*").replace("÷", "/").replace("，", "").replace(",", "").strip()
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ToolError("exponent too large")
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ToolError(f"not an arithmetic expression: {expression!r}")

    value = ev(tree)
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
    arguments = arguments or {}
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
