"""What a teacher is: something that answers batches of chats and raw completions; and which one a spec names.

Two kinds behind one interface, so every generator (self-instruct, answers, Magpie) works with whatever teacher
a user has: an OpenAI-compatible endpoint (`danlu serve`, vLLM, Ollama, a hosted API) or a local checkpoint
generating in batches in this process. A teacher answers a whole round of requests at once: an endpoint sends
them concurrently, a checkpoint decodes them as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from danlu import DanluError

CHATML_USER_PREFIX = "<|im_start|>user\n"
SENTINEL = "DANLUMAGPIESENTINEL"


def template_prefix(tokenizer: Any, system: str | None = None) -> str:
    """The chat template's text before a user message's content (with `system` first when given)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": SENTINEL}
    ]
    text = tokenizer.apply_chat_template(messages)
    k = text.find(SENTINEL)
    if k <= 0:
        raise DanluError("the chat template does not render a user message's content where Magpie can cut it")
    return text[:k]


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None  # per round; request i of a round gets seed + i where the teacher takes one
    stop: tuple[str, ...] = ()


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop", "length", or "too_long" (the prompt did not fit the teacher's context)


class Teacher(Protocol):
    name: str  # what rows record as meta.teacher (URL#model or the checkpoint folder)

    def chat(self, conversations: list[list[dict[str, Any]]], sampling: Sampling) -> list[Reply]:
        """The assistant's next turn for each conversation (OpenAI messages), in order."""
        ...

    def complete(self, prompts: list[str], sampling: Sampling) -> list[Reply]:
        """Raw continuations of each prompt text, special tokens written as text (Magpie's template prefix)."""
        ...

    def chat_template_prefix(self, system: str | None = None) -> str | None:
        """The template's text up to a user turn's content (see magpie.py), or None when it is unknown."""
        ...


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_teacher(
    spec: str,
    *,
    model: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 4,
    timeout: float = 120.0,
    retries: int = 4,
    rps: float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> Teacher:
    """`http(s)://…` → an endpoint teacher (checked at once: reachable, key accepted, model served); anything else
    → a local checkpoint folder (or HF causal-LM folder) loaded into this process."""
    if is_url(spec):
        from danlu.synth.endpoint import EndpointTeacher

        teacher = EndpointTeacher(
            spec, model=model, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
            retries=retries, rps=rps,
        )  # fmt: skip
        teacher.check()
        return teacher
    from danlu.synth.local import LocalTeacher

    return LocalTeacher(spec, batch_size=batch_size, device=device)
