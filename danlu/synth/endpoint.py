"""A teacher behind an OpenAI-compatible API, through the official `openai` client.

Why our own retry loop instead of the client's: a long synthesis run meets overloaded servers (5xx, 429) and
slow answers (timeouts); those are retried with exponential backoff and jitter, and counted, while the errors
that retrying cannot fix (a wrong key, an unknown model, a 4xx) stop the run at once with one clear line. The
client is built with `max_retries=0` so that every try is ours and counted.

Requests of a round run on `concurrency` threads, and a shared limiter spaces their starts to at most `rps` per
second (hosted APIs meter requests). The API key comes from an environment variable, never a flag, so it stays
out of shell history and process lists.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

from danlu import DanluError
from danlu.synth.teacher import Reply, Sampling

T = TypeVar("T")
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class PromptTooLong(Exception):
    """A request the server refused because the prompt does not fit its context: that one row fails (finish
    `too_long`, as a local teacher reports it), the run goes on."""


def _is_context_error(e: Any) -> bool:
    """HTTP 400 saying the prompt exceeds the context: OpenAI's and `danlu serve`'s code, vLLM's wording."""
    return getattr(e, "code", None) == "context_length_exceeded" or "maximum context length" in _message(e)


class RateLimiter:
    """Spaces request starts at least 1/rps seconds apart across threads (None: no limit)."""

    def __init__(self, rps: float | None) -> None:
        if rps is not None and rps <= 0:
            raise DanluError(f"--rps {rps}: must be a positive number of requests per second")
        self.interval = 1.0 / rps if rps else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def api_base(url: str) -> str:
    """`http://host:8000` → `http://host:8000/v1`; a URL with a path is taken as the API root as it is."""
    parsed = urlparse(url)
    if not parsed.netloc:
        raise DanluError(f"teacher {url!r}: not a URL (expected http://host:port or http://host:port/v1)")
    return url.rstrip("/") if parsed.path.strip("/") else url.rstrip("/") + "/v1"


def api_key(env: str | None) -> tuple[str, str]:
    """(key, where it came from). A named variable must be set; without one, $OPENAI_API_KEY or a placeholder
    (local servers such as vLLM and `danlu serve` without --api-key accept any key)."""
    if env:
        key = os.environ.get(env)
        if not key:
            raise DanluError(f"--api-key-env {env}: the environment variable {env} is not set or empty")
        return key, f"${env}"
    key = os.environ.get(DEFAULT_KEY_ENV)
    return (key, f"${DEFAULT_KEY_ENV}") if key else ("EMPTY", "no key (set --api-key-env)")


class EndpointTeacher:
    """Chat and raw completions from an OpenAI-compatible server; thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 4,
        timeout: float = 120.0,
        retries: int = 4,
        rps: float | None = None,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
    ) -> None:
        import openai

        if concurrency < 1:
            raise DanluError(f"--concurrency {concurrency}: must be at least 1")
        if timeout <= 0:
            raise DanluError(f"--timeout {timeout}: must be positive (seconds)")
        if retries < 0:
            raise DanluError(f"--retries {retries}: must be 0 or more")
        self.url = api_base(url)
        key, self._key_source = api_key(api_key_env)
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)
        self.model = model
        self.concurrency, self.retries, self.backoff, self.max_backoff = (
            concurrency,
            retries,
            backoff,
            max_backoff,
        )
        self.limiter = RateLimiter(rps)
        self.stats: Counter[str] = Counter()  # requests, retries and what caused them
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.url}#{self.model}"

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # ── one request, retried ────────────────────────────────────────────────────────────────────────────────
    def _call(self, fn: Callable[[], T], what: str) -> T:
        import openai

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
                time.sleep(delay)
            self.limiter.wait()
            self._count("requests")
            try:
                return fn()
            except openai.APITimeoutError:
                self._count("timeouts")
                last = "timed out"
            except openai.APIConnectionError as e:
                if attempt == 0 and self.stats["replies"] == 0:  # never reached: retrying will not help
                    raise DanluError(f"teacher {self.url}: cannot connect ({_cause(e)}); is the server running?"
                                     ) from None  # fmt: skip
                self._count("connection_errors")
                last = f"connection failed ({_cause(e)})"
            except (openai.InternalServerError, openai.RateLimitError) as e:
                self._count(f"http_{e.status_code}")
                last = f"HTTP {e.status_code}: {_message(e)}"
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise DanluError(
                    f"teacher {self.url} refused the API key ({self._key_source}): HTTP {e.status_code}: "
                    f"{_message(e)}"
                ) from None
            except openai.BadRequestError as e:
                if _is_context_error(e):
                    self._count("too_long")
                    raise PromptTooLong(_message(e)) from None
                raise DanluError(f"teacher {self.url}: {what}: HTTP 400: {_message(e)}") from None
            except openai.NotFoundError as e:
                raise DanluError(f"teacher {self.url}: {what}: HTTP 404: {_message(e)} (is this an OpenAI-"
                                 "compatible API root, and is the model served?)") from None  # fmt: skip
            except openai.APIStatusError as e:
                raise DanluError(f"teacher {self.url}: {what}: HTTP {e.status_code}: {_message(e)}") from None
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
                raise DanluError(f"teacher {self.url}: {what}: the answer is not the JSON of the OpenAI API "
                                 f"({type(e).__name__}: {str(e)[:120]})") from None  # fmt: skip
        raise DanluError(f"teacher {self.url}: {what} failed after {self.retries + 1} tries (last: {last})")

    def check(self) -> None:
        """Reachable, key accepted, model served (the first one listed when none was named)."""
        models = self._call(lambda: self.client.models.list(), "listing models")
        self._count("replies")
        ids = [m.id for m in getattr(models, "data", None) or [] if getattr(m, "id", None)]
        if not isinstance(getattr(models, "data", None), list):
            raise DanluError(f"teacher {self.url}: /models did not answer with the OpenAI list of models")
        if self.model is None:
            if not ids:
                raise DanluError(f"teacher {self.url} serves no models; name one with --model")
            self.model = ids[0]
        elif ids and self.model not in ids:
            raise DanluError(f"teacher {self.url} does not serve model {self.model!r} (it serves: "
                             f"{', '.join(ids[:10])})")  # fmt: skip

    # ── the Teacher interface ──────────────────────────────────────────────────────────────────────────────
    def _map(self, fn: Callable[[int, Any], Reply], items: list[Any]) -> list[Reply]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(i, x) for i, x in enumerate(items)]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, range(len(items)), items))

    def _kwargs(self, s: Sampling, i: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model, "max_tokens": s.max_tokens, "temperature": s.temperature,
                              "top_p": s.top_p}  # fmt: skip
        if s.seed is not None:
            kw["seed"] = s.seed + i
        if s.stop:
            kw["stop"] = list(s.stop)
        return kw

    def chat(self, conversations: list[list[dict[str, Any]]], sampling: Sampling) -> list[Reply]:
        def one(i: int, messages: list[dict[str, Any]]) -> Reply:
            try:
                r = self._call(
                    lambda: self.client.chat.completions.create(
                        messages=messages, **self._kwargs(sampling, i)
                    ),
                    "chat completion",
                )
            except PromptTooLong:
                return Reply("", "too_long")
            choices = getattr(r, "choices", None)
            if not choices:
                raise DanluError(f"teacher {self.url}: a chat completion came back without choices")
            self._count("replies")
            c = choices[0]
            return Reply((c.message.content if c.message else None) or "", c.finish_reason or "stop")

        return self._map(one, conversations)

    def complete(self, prompts: list[str], sampling: Sampling) -> list[Reply]:
        def one(i: int, prompt: str) -> Reply:
            try:
                r = self._call(
                    lambda: self.client.completions.create(prompt=prompt, **self._kwargs(sampling, i)),
                    "completion",
                )
            except PromptTooLong:
                return Reply("", "too_long")
            choices = getattr(r, "choices", None)
            if not choices:
                raise DanluError(f"teacher {self.url}: a completion came back without choices")
            self._count("replies")
            return Reply(choices[0].text or "", choices[0].finish_reason or "stop")

        return self._map(one, prompts)

    def chat_template_prefix(self, system: str | None = None) -> str | None:
        return None  # an API does not say its template; Magpie takes it from --template or assumes ChatML


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:200]
    return str(getattr(e, "message", e))[:200]
