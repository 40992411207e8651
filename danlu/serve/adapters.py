"""Several adapters served on one loaded base: `danlu serve BASE --adapter NAME=PATH …` (vLLM's --lora-modules).

The base is loaded once and every adapter is attached to it under its own name (peft keeps one set of LoRA
weights per name in each adapted layer). The base and its adapters share one generation worker thread: before
each step of a stream the worker selects that stream's adapter (or none, for the base), so requests for
different adapters interleave token by token on the same weights, and a request's `model` field picks which one
answers. An adapter made for another base is refused at start-up, with the reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from danlu import DanluError
from danlu.serve.routing import _NAME, ServedModel


def parse_adapter_specs(items: list[str], taken: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` options → [(name, path)], names well formed and distinct from the served models'."""
    out: list[tuple[str, str]] = []
    names = list(taken)
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DanluError(f"--adapter {item!r}: expected NAME=ADAPTER_FOLDER")
        if not _NAME.match(name):
            raise DanluError(
                f"adapter name {name!r}: use letters, digits and . _ - : / (at most 128 characters)"
            )
        if name in names:
            raise DanluError(f"model name {name!r} given twice; give each --model and --adapter its own name")
        names.append(name)
        out.append((name, path))
    return out


class SharedLane:
    """One served name's handle on a worker that a base and its adapters share: jobs carry the name along, so
    the worker's stream function knows which adapter to select. Same surface as ModelWorker for the app."""

    def __init__(self, worker: Any, adapter: str | None) -> None:
        self._worker = worker
        self.adapter = adapter

    def submit(self, prompt_ids: list[int], params: Any) -> Any:
        return self._worker.submit(prompt_ids, (self.adapter, params))

    def iterate(self, job: Any) -> Any:
        return self._worker.iterate(job)

    def reserve(self, streams: int) -> Any:
        """Room on the shared worker: the base and its adapters draw on one bound (`ModelWorker.reserve`)."""
        return self._worker.reserve(streams)

    def retry_after(self) -> int:
        return self._worker.retry_after()

    @property
    def max_active(self) -> int:
        return self._worker.max_active

    @property
    def max_queued(self) -> int:
        return self._worker.max_queued

    @property
    def active(self) -> int:
        return self._worker.active

    @property
    def queued(self) -> int:
        return self._worker.queued

    @property
    def stats(self) -> dict[str, int]:
        return self._worker.stats

    def close(self) -> None:
        self._worker.close()


def switching_stream(model: Any, generator: Any) -> Any:
    """The shared worker's stream function: each step of a stream runs with that stream's adapter selected."""
    from danlu.adapters.lora import select_adapter

    def stream(prompt_ids: list[int], tagged: tuple[str | None, Any], cancelled: Any = None) -> Iterator[Any]:
        adapter, params = tagged
        inner = generator.stream(prompt_ids, params, cancelled=cancelled)
        try:
            while True:
                select_adapter(model, adapter)
                try:
                    item = next(inner)
                except StopIteration:
                    return
                yield item
        finally:
            with contextlib.suppress(Exception):
                inner.close()

    return stream


def load_base_with_adapters(
    name: str, path: str, adapters: list[tuple[str, str]], *, device: str = "cpu", max_active: int = 64
) -> list[ServedModel]:
    """The base (served as `name`) and each adapter (served as its own name, `parent` = the base's name), all on
    one copy of the base's weights. Decoding stays eager: a compiled decode graph would be traced for one adapter."""
    from danlu.adapters.folder import add_adapter
    from danlu.generate import Generator
    from danlu.io import load_checkpoint
    from danlu.serve.engine import ModelWorker

    ckpt = load_checkpoint(path, device=device)
    if (ckpt.meta or {}).get("adapter"):
        raise DanluError(f"{path}: the base given to --adapter is itself an adapter; serve its base and pass both "
                         "as --adapter NAME=PATH, or merge it first (danlu export --merge)")  # fmt: skip
    infos = [(n, add_adapter(ckpt, p, n)) for n, p in adapters]
    ckpt.model.eval()
    worker = ModelWorker(switching_stream(ckpt.model, Generator(ckpt.model, ckpt.tokenizer)), name=name,
                         max_active=max_active)  # fmt: skip
    now, context = int(time.time()), int(ckpt.config.max_position_embeddings)
    served = [ServedModel(name=name, path=str(path), tokenizer=ckpt.tokenizer, context_length=context,
                          worker=SharedLane(worker, None), meta=dict(ckpt.meta or {}), created=now)]  # fmt: skip
    for adapter, info in infos:
        served.append(ServedModel(name=adapter, path=info["path"], tokenizer=ckpt.tokenizer, context_length=context,
                                  worker=SharedLane(worker, adapter), meta={"chat": info["chat"], "adapter": info},
                                  created=now, parent=name))  # fmt: skip
    return served
