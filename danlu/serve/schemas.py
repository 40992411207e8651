"""Request bodies of the OpenAI API, validated with pydantic, plus the shapes of errors.

Only the fields danlu acts on are declared; other OpenAI fields (`user`, `presence_penalty`, …) are accepted and
ignored, as OpenAI-compatible servers commonly do, so that existing clients work unchanged. Validation failures
become OpenAI-shaped 400 errors naming the offending parameter (see app.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from danlu.tokenizer import defuse_special_tokens

MAX_N = 8
MAX_STOP = 4
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch.Generator.manual_seed takes
MAX_TOP_K = 1_000_000
MAX_INDEX = 1_023  # a choice index (n × prompts stays far below)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def plain(self, defuse: Callable[[str], str] = defuse_special_tokens) -> dict[str, Any]:
        """The message as the chat template reads it: text content only (image parts are refused earlier), with
        control tokens a client typed made harmless by `defuse` (the served tokenizer's `Tokenizer.defuse`; by
        default danlu's ChatML tokens)."""
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": defuse(text)}
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in self.tool_calls]
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ToolFunction(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: ToolFunction


class _Sampling(_Lenient):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool = False
    store: bool = False
    metadata: dict[str, str] | None = None

    @field_validator("messages")
    @classmethod
    def _no_images(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        for i, m in enumerate(v):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                raise ValueError(f"messages[{i}]: only text content parts are supported")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


class FeedbackRequest(_Lenient):
    """A rating and/or a correction for one served answer (a `store: true` chat completion)."""

    response_id: str = Field(min_length=1, max_length=200)
    index: int = Field(default=0, ge=0, le=MAX_INDEX)
    rating: Literal[-1, 0, 1] | None = None
    correction: str | None = Field(default=None, max_length=20_000)
    comment: str | None = Field(default=None, max_length=5_000)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
):
    """OpenAI's error shape; the official clients read `error.message` and `error.code` from it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
