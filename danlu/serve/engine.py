"""The scheduler: runs generation on a worker thread, off the event loop, interleaving concurrent requests.

A `danlu.generate.Generator` is not thread-safe and each of its streams owns its own KV cache, so one worker
thread per model advances every active stream by one token in turn (round-robin). Concurrent requests thus all
make progress together: a long answer never blocks another client's stream, and the event loop only moves
bytes. Streams beyond `max_active` wait in a queue. A request whose client went away sets its `cancelled`
event; the worker closes that stream before its next token, freeing its KV cache at once.

Results travel back to the event loop with `loop.call_soon_threadsafe` into an asyncio.Queue per job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_END = object()


@dataclass
class Job:
    """One generation stream: prompt ids + sampling params in, text deltas and a final Completion out."""

    prompt_ids: list[int]
    params: Any
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def post(self, item: Any) -> bool:
        """Hands an item to the event loop; False when the loop is gone (the job is then cancelled)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            return True
        except RuntimeError:
            self.cancelled.set()
            return False


@dataclass
class _Running:
    job: Job
    stream: Iterator[Any]


class ModelWorker:
    """Owns one model's Generator and the thread that drives it."""

    def __init__(self, stream_fn: Callable[..., Iterator[Any]], name: str = "model", max_active: int = 64):
        self._stream_fn = stream_fn
        self.name = name
        self.max_active = max_active
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[_Running] = []
        self.stats = {"started": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"danlu-gen-{name}", daemon=True)
        self._thread.start()

    # ---- event-loop side -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: Any) -> Job:
        job = Job(list(prompt_ids), params, asyncio.get_running_loop())
        self._inbox.put(job)
        return job

    async def iterate(self, job: Job) -> AsyncIterator[Any]:
        """Yields the job's items (str deltas, then the Completion); cancels the job if the consumer stops."""
        try:
            while True:
                item = await job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=5)

    # ---- worker-thread side --------------------------------------------------------------------------------
    def _admit(self, block: bool) -> None:
        while True:
            try:
                job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            self._waiting.append(job)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self._active and not self._waiting)
            while self._waiting and len(self._active) < self.max_active:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    job.post(_END)
                    continue
                stream = self._stream_fn(job.prompt_ids, job.params, cancelled=job.cancelled.is_set)
                self._active.append(_Running(job, stream))
                self.stats["started"] += 1
            for running in list(self._active):
                self._step(running)
        for running in self._active:
            with contextlib.suppress(Exception):
                running.stream.close()  # type: ignore[attr-defined]
            running.job.post(_END)

    def _step(self, running: _Running) -> None:
        job = running.job
        done = False
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            done = True
        else:
            try:
                item = next(running.stream)
            except StopIteration:
                self.stats["finished"] += 1
                done = True
            except Exception as e:  # reported to the request (4xx/5xx decided there); the worker lives on
                self.stats["failed"] += 1
                job.post(e)
                done = True
            else:
                if isinstance(item, str):
                    if item:
                        job.post(item)
                else:
                    self.stats["tokens"] += len(getattr(item, "token_ids", ()) or ())
                    job.post(item)
        if done:
            with contextlib.suppress(Exception):
                running.stream.close()  # type: ignore[attr-defined]
            job.post(_END)
            self._active.remove(running)
