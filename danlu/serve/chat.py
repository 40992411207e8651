"""One answer to one request, as a stream of events: context (date, memory), tool rounds, fallback.

Kept apart from the HTTP layer so that streaming and non-streaming responses, chat and plain completions share
exactly the same generation logic; app.py only formats the events as OpenAI JSON or SSE chunks.

Events (tuples):
    ("delta", text)                    content to show
    ("tool_calls", [OpenAI tool_call])  calls for the client to execute (client-defined `tools`)
    ("done", Outcome)                   the end, with finish reason, usage, the model that answered
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from danlu.serve.routing import ServedModel, confident, mean_logprob
from danlu.serve.sanitize import defuse_tree
from danlu.tools import parse_tool_calls, run_tool

TOOL_TAG = "<tool_call>"
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class Outcome:
    finish_reason: str
    model: str
    content: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    mean_logprob: float | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Sampling:
    """The request's sampling knobs, turned into danlu.generate.SamplingParams per call."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def params(self, max_tokens: int, seed_offset: int = 0):
        from danlu.generate import SamplingParams

        kw: dict[str, Any] = {"max_tokens": max_tokens, "stop": list(self.stop or [])}
        for k in ("temperature", "top_p", "top_k"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        if self.seed is not None:  # any 64-bit seed plus the choice's offset stays a valid 64-bit seed
            kw["seed"] = (self.seed + seed_offset) % 2**64
        if self.ignore_eos:
            kw["stop_token_ids"] = []
        return SamplingParams(**kw)


def date_system_prompt(now: _dt.datetime, messages: list[dict[str, Any]]) -> str:
    """Today's date and time in the language of the user's last message (as the world corpus teaches it)."""
    from danlu.tools import format_date

    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    weekday_zh = format_date(now.date()).split()[-1]
    if _CJK.search(last):
        return f"今天是{now.date().isoformat()} {weekday_zh}。现在时间{now:%H:%M}。"
    return f"Today is {now.date().isoformat()} ({now:%A}). The time is {now:%H:%M}."


def with_date(messages: list[dict[str, Any]], now: _dt.datetime) -> list[dict[str, Any]]:
    line = date_system_prompt(now, messages)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = line + "\n" + (first.get("content") or "")
        return [first, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]


class ToolCallHold:
    """Streams text but holds back anything that may start a `<tool_call>`, and swallows calls entirely."""

    def __init__(self) -> None:
        self.buf = ""
        self.emitted = ""
        self.swallowing = False

    def feed(self, delta: str) -> str:
        if self.swallowing:
            return ""
        self.buf += delta
        i = self.buf.find(TOOL_TAG)
        if i >= 0:
            out, self.buf, self.swallowing = self.buf[:i], "", True
        else:
            keep = next((k for k in range(min(len(TOOL_TAG) - 1, len(self.buf)), 0, -1)
                         if TOOL_TAG.startswith(self.buf[-k:])), 0)  # fmt: skip
            out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        self.emitted += out
        return out

    def finish(self, final: str) -> str:
        """What is still to show once the round's final content is known."""
        return final[len(self.emitted) :] if final.startswith(self.emitted) else ""


async def generate_round(model: ServedModel, prompt_ids: list[int], params: Any) -> AsyncIterator[str | Any]:
    """Text deltas then the Completion, from the model's worker thread."""
    job = model.worker.submit(prompt_ids, params)
    async for item in model.worker.iterate(job):
        yield item


async def answer_chat(
    model: ServedModel,
    messages: list[dict[str, Any]],
    sampling: Sampling,
    *,
    index: int = 0,
    client_tools: list[dict[str, Any]] | None = None,
    builtin_tools: bool = True,
    tool_rounds: int = 3,
    today: Callable[[], _dt.date] | None = None,
    resolve: Callable[[str], ServedModel] | None = None,
) -> AsyncIterator[tuple]:
    """Events for one chat choice; falls back to the base model when the answer is not confident enough."""
    if model.fallback and resolve is not None and model.min_logprob is not None:
        buffered: list[tuple] = []
        async for ev in _answer_chat(
            model, messages, sampling, index, client_tools, builtin_tools, tool_rounds, today
        ):
            buffered.append(ev)
        outcome = buffered[-1][1]
        if outcome.mean_logprob is None or outcome.mean_logprob >= model.min_logprob:
            for ev in buffered:
                yield ev
            return
        base = resolve(model.fallback)
        async for ev in _answer_chat(
            base, messages, sampling, index, client_tools, builtin_tools, tool_rounds, today
        ):
            yield ev
        return
    async for ev in _answer_chat(
        model, messages, sampling, index, client_tools, builtin_tools, tool_rounds, today
    ):
        yield ev


async def _answer_chat(
    model: ServedModel,
    messages: list[dict[str, Any]],
    sampling: Sampling,
    index: int,
    client_tools: list[dict[str, Any]] | None,
    builtin_tools: bool,
    tool_rounds: int,
    today: Callable[[], _dt.date] | None,
) -> AsyncIterator[tuple]:
    tok = model.tokenizer
    convo = list(messages)
    out = Outcome(finish_reason="stop", model=model.name)
    parse_calls = bool(client_tools) or builtin_tools
    for round_no in range(tool_rounds + 1):
        ids = tok.render_chat(convo, tools=client_tools, add_generation_prompt=True)[0]
        budget = min(sampling.max_tokens - out.completion_tokens, model.context_length - len(ids))
        if budget <= 0:
            out.finish_reason = "length"
            break
        hold = ToolCallHold() if parse_calls else None
        completion = None
        async for item in generate_round(model, ids, sampling.params(budget, index + 1000 * round_no)):
            if isinstance(item, str):
                shown = hold.feed(item) if hold else item
                if shown:
                    out.content += shown
                    yield ("delta", shown)
            else:
                completion = item
        assert completion is not None, "generator ended without a Completion"
        out.prompt_tokens += int(completion.prompt_tokens)
        out.completion_tokens += len(completion.token_ids)
        out.token_ids += list(completion.token_ids)
        out.logprobs += list(completion.logprobs or [])
        out.finish_reason = completion.finish_reason
        content, calls = parse_tool_calls(completion.text) if parse_calls else (completion.text, [])
        rest = hold.finish(content) if hold else ""
        if rest:
            out.content += rest
            yield ("delta", rest)
        if not calls:
            break
        if client_tools:
            out.finish_reason = "tool_calls"
            yield ("tool_calls", calls)
            break
        if round_no == tool_rounds:  # no more rounds: the calls stay unexecuted
            break
        # the model's calls and the tools' results (which may echo the call) reach the template defused too
        convo.append(defuse_tree({"role": "assistant", "content": content, "tool_calls": calls}, tok.defuse))
        for call in calls:
            fn = call["function"]
            day = today() if today else None
            result = await asyncio.to_thread(run_tool, fn["name"], fn["arguments"], day)
            out.tool_results.append({"name": fn["name"], "arguments": fn["arguments"], "result": result})
            convo.append(defuse_tree({"role": "tool", "name": fn["name"], "content": result}, tok.defuse))
    out.mean_logprob = mean_logprob(out)
    yield ("done", out)


async def answer_text(
    model: ServedModel, prompt_ids: list[int], sampling: Sampling, index: int = 0
) -> AsyncIterator[tuple]:
    """Events for one plain completion choice (no template, no tools)."""
    out = Outcome(finish_reason="stop", model=model.name)
    budget = min(sampling.max_tokens, model.context_length - len(prompt_ids))
    async for item in generate_round(model, prompt_ids, sampling.params(budget, index)):
        if isinstance(item, str):
            out.content += item
            yield ("delta", item)
        else:
            out.prompt_tokens = int(item.prompt_tokens)
            out.completion_tokens = len(item.token_ids)
            out.token_ids = list(item.token_ids)
            out.logprobs = list(item.logprobs or [])
            out.finish_reason = item.finish_reason
    out.mean_logprob = mean_logprob(out)
    yield ("done", out)


__all__ = ["Outcome", "Sampling", "answer_chat", "answer_text", "confident", "with_date", "ToolCallHold"]
