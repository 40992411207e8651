"""The terminal chat behind `danlu chat CHECKPOINT`: streaming, multi-turn, commands, tools, a bounded history.

Generation, the date line and the tool loop are the server's (danlu.serve.chat.answer_chat and with_date), so a
conversation in the terminal is answered exactly as the same conversation sent to `danlu serve` would be: the
model's `get_date` / `calculator` calls are executed (danlu.tools) and their results fed back before it answers.

What the terminal adds: the history (kept with its tool calls and results, so follow-up questions see them),
trimmed from the oldest turns with a notice when it no longer fits in the model's context next to the answer;
today's date in the system prompt by default (a model cannot know it); and the commands below.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HELP_TEXT = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (/system alone clears it)
  /temp X         sampling temperature (0 = greedy)
  /help           this text
  /quit           leave (or Ctrl-D)"""


@dataclass
class ChatSession:
    """One conversation with one served model (danlu.serve.routing.ServedModel)."""

    model: Any
    system: str | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    date: bool = True  # today's date in the system prompt
    tools: bool = True  # execute get_date / calculator calls
    now: Callable[[], dt.datetime] = dt.datetime.now
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def context(self) -> int:
        return int(self.model.context_length)

    def reserve(self) -> int:
        """Tokens kept free for the answer when trimming the history."""
        return max(1, min(self.max_tokens, self.context // 4))

    def prompt_messages(self, history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        from danlu.serve.chat import with_date

        history = self.history if history is None else history
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + list(history)
        return with_date(msgs, self.now()) if self.date else msgs

    def prompt_tokens(self, history: list[dict[str, Any]] | None = None) -> int:
        ids = self.model.tokenizer.render_chat(self.prompt_messages(history), add_generation_prompt=True)[0]
        return len(ids)

    def trim(self) -> int:
        """Drops the oldest turns (a user message and what answered it) until the prompt fits; returns how many."""
        dropped = 0
        limit = self.context - self.reserve()
        while self.prompt_tokens() > limit:
            starts = [i for i, m in enumerate(self.history) if m["role"] == "user"]
            if len(starts) <= 1:
                break
            self.history = self.history[starts[1] :]
            dropped += 1
        return dropped

    def reply(self, text: str, on_delta: Callable[[str], None] = lambda s: None,
              notice: Callable[[str], None] = lambda s: None) -> str:  # fmt: skip
        """Sends one user message; streams the answer through `on_delta`; returns the final answer text."""
        # typed control tokens are plain text, as the server makes them (danlu.serve.schemas.ChatMessage.plain)
        self.history.append({"role": "user", "content": self.model.tokenizer.defuse(text)})
        dropped = self.trim()
        if dropped:
            notice(
                f"[history too long for the {self.context}-token context: dropped the oldest {dropped} turn(s)]"
            )
        if self.prompt_tokens() >= self.context:
            self.history.pop()
            notice(f"[message too long: it does not fit in the model's {self.context}-token context]")
            return ""
        try:
            outcome = asyncio.run(self._answer(on_delta))
        except BaseException:  # Ctrl-C mid-answer: forget the unanswered question, keep the rest
            self.history.pop()
            raise
        for r in outcome.tool_results:
            notice(f"[tool {r['name']}({_args_text(r['arguments'])}) → {r['result']}]")
            call = {"type": "function", "function": {"name": r["name"], "arguments": r["arguments"]}}
            self.history += [{"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "name": r["name"], "content": r["result"]}]  # fmt: skip
        self.history.append({"role": "assistant", "content": outcome.content})
        if outcome.finish_reason == "length":
            notice("[answer cut at the token limit]")
        return outcome.content

    async def _answer(self, on_delta: Callable[[str], None]) -> Any:
        from danlu.serve.chat import Sampling, answer_chat

        budget = max(1, min(self.max_tokens, self.context - self.prompt_tokens()))
        sampling = Sampling(max_tokens=budget, temperature=self.temperature, top_p=self.top_p)
        outcome = None
        async for kind, payload in answer_chat(
            self.model,
            self.prompt_messages(),
            sampling,
            builtin_tools=self.tools,
            today=lambda: self.now().date(),
        ):
            if kind == "delta":
                on_delta(payload)
            elif kind == "done":
                outcome = payload
        assert outcome is not None
        return outcome

    def command(self, line: str) -> str | None:
        """Handles a /command; returns what to print, or None for `/quit`."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return None
        if name == "/reset":
            self.history = []
            return "[conversation reset]"
        if name == "/system":
            self.system = arg or None
            return f"[system prompt: {arg}]" if arg else "[system prompt cleared]"
        if name == "/temp":
            try:
                value = float(arg)
            except ValueError:
                return f"[/temp needs a number, e.g. /temp 0.7; now {self.temperature:g}]"
            if not 0.0 <= value <= 5.0:
                return "[/temp must be between 0 and 5]"
            self.temperature = value
            return f"[temperature {value:g}]"
        if name == "/help":
            return HELP_TEXT
        return f"[unknown command {name}]\n{HELP_TEXT}"


def _args_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return ", ".join(f"{k}={v!r}" for k, v in (arguments or {}).items())


def repl(
    session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], Any] | None = None
) -> int:
    """The loop: read a line, run a command or answer it with streaming output, until /quit or end of input."""
    import sys

    def out(s: str) -> None:
        if write is not None:
            write(s)
        else:
            sys.stdout.write(s)
            sys.stdout.flush()

    out(f"[danlu chat: {session.model.name}, context {session.context} tokens; /help for commands]\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            shown = session.command(line)
            if shown is None:
                return 0
            out(shown + "\n")
            continue
        try:
            session.reply(line, on_delta=out, notice=lambda s: out(f"\n{s}\n"))
        except KeyboardInterrupt:
            out("\n[interrupted]")
        out("\n")
