"""The scheduler: runs generation off the event loop, with continuous batching.

`danlu serve` runs this loop in an engine process per checkpoint (danlu.serve.engine_process), so that the decode
loop does not share the event loop's GIL; adapters, ensembles and `load_served_model(engine="thread")` run it in a
worker thread of the server. One worker per model owns its `danlu.generate.Generator` (not thread-safe). For a
model with a batched decode step (`Generator.batches`: danlu's own Transformer) the worker decodes every active
stream together: one `SlotBatch` step per loop, one forward over all streams, each at its own position; streams
join (their prompts prefilled) and leave (finished, or cancelled because the client went away: the slot is freed
before the next step) between steps, so a new request waits at most one step, and with `Generator(compile=True)`
every step runs a compiled graph. Other models (transformers-backed, ensembles, adapters switched per stream) keep
the round robin: each stream has its own KV cache and advances one token in turn. Either way, concurrent requests
all make progress together and the event loop only moves bytes.

Streams beyond `max_active` wait in a queue; the HTTP layer admits at most `max_active + max_queued` streams
(`reserve`) and answers 429 with a `retry_after` estimate beyond that, so a burst cannot grow the queue without
bound. Results travel back to the event loop with `loop.call_soon_threadsafe` into an asyncio.Queue per job
(`Job.deliver`; the engine process sends each round's items over its pipe instead).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import functools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from danlu.generate import Generator, Row, SlotBatch

_END = object()


@dataclass
class Job:
    """One generation stream: prompt ids + sampling params in, text deltas and a final Completion out.

    `deliver` hands one item to whoever reads the job (the event loop's `out` queue, or the pipe back to the server
    when the model runs in a process of its own) and raises RuntimeError once that reader is gone."""

    prompt_ids: list[int]
    params: Any
    deliver: Callable[[Any], Any]
    out: asyncio.Queue | None = None  # the event loop's end of the job, where `iterate` reads
    loop: asyncio.AbstractEventLoop | None = None  # the loop `out` belongs to
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    ticket: int = 0  # the job's number on a ProcessWorker's pipe

    def post(self, item: Any) -> bool:
        """Hands an item over; False when its reader is gone (the job is then cancelled)."""
        try:
            self.deliver(item)
            return True
        except RuntimeError:
            self.cancelled.set()
            return False


def job_on_this_loop(prompt_ids: list[int], params: Any) -> Job:
    """A job whose items arrive in an asyncio.Queue of the running event loop, from any thread."""
    loop, out = asyncio.get_running_loop(), asyncio.Queue()
    return Job(
        list(prompt_ids), params, functools.partial(loop.call_soon_threadsafe, out.put_nowait), out, loop
    )


@dataclass
class _Running:
    job: Job
    stream: Iterator[Any]


class Reservation:
    """Room for a request's streams on a worker (`Admission.reserve`); `release` once, or on garbage collection."""

    def __init__(self, worker: Admission, streams: int) -> None:
        self._worker, self.streams, self._held = worker, streams, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._worker._release(self.streams)

    def __del__(self) -> None:
        self.release()


def batching_generator(source: Any) -> Generator | None:
    """The Generator whose streams a worker may decode together: `source` when it is a Generator of a model with a
    batch step; None for a stream function (an adapter switch, an ensemble) or a model without one (round robin)."""
    return source if isinstance(source, Generator) and source.batches else None


class Admission(abc.ABC):
    """What the HTTP layer sees of a worker, wherever its model runs: a bound on streams (`reserve`, the 429 with
    `retry_after`) and the job's items as an async iterator. `ModelWorker` (a thread of this process) and
    `danlu.serve.engine_process.ProcessWorker` (a process of its own) fill in the rest."""

    max_active: int
    max_queued: int

    def __init__(self) -> None:
        self._reserved = 0  # streams the HTTP layer admitted and has not released
        self._lock = threading.Lock()
        self._job_seconds = 0.0  # moving average of a stream's time from submission to its end
        self.stats = {"started": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0, "peak_active": 0}

    @property
    @abc.abstractmethod
    def queued(self) -> int:
        """Streams waiting for a slot."""

    def _cancel(self, job: Job) -> None:
        """Tells the generating side that nobody reads the job any more."""
        job.cancelled.set()

    async def iterate(self, job: Job) -> AsyncIterator[Any]:
        """Yields the job's items (str deltas, then the Completion); cancels the job if the consumer stops."""
        assert job.out is not None, "a job submitted from an event loop"
        try:
            while True:
                item = await job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._cancel(job)

    def reserve(self, streams: int) -> Reservation | None:
        """Admits `streams` more concurrent streams (a request's choices) if active + waiting stays within
        `max_active + max_queued`, else None (the HTTP layer's 429). The request releases its reservation when
        it ends; a reservation dropped unreleased (a response never started) releases itself."""
        with self._lock:
            if self._reserved + streams > self.max_active + self.max_queued:
                return None
            self._reserved += streams
        return Reservation(self, streams)

    def _release(self, streams: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - streams)

    def retry_after(self) -> int:
        """Seconds until a full worker likely has room: the queue ahead, at the recent time per stream (1 when
        nothing has finished yet)."""
        if self._job_seconds <= 0:
            return 1
        waves = 1 + self.queued / max(1, self.max_active)
        return max(1, math.ceil(self._job_seconds * waves))


class ModelWorker(Admission):
    """Owns one model's Generator and the thread that drives it.

    `source` is a Generator (or its bound `stream`), whose streams are decoded together when the model allows it,
    or any `stream_fn(prompt_ids, params, cancelled=...)` iterator factory, advanced round robin. `batched=False`
    keeps the round robin for a Generator too (benchmarks/serve_load.py compares the two). `thread=False` starts
    no thread: the caller runs `_run` itself (the engine process does, in its main thread)."""

    def __init__(
        self, source: Generator | Callable[..., Iterator[Any]], name: str = "model", max_active: int = 64,
        max_queued: int = 256, batched: bool = True, thread: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self._generator = batching_generator(source) if batched else None
        self._stream_fn = source.stream if isinstance(source, Generator) else source
        self.name = name
        self.max_active = max_active
        self.max_queued = max_queued
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[_Running] = []
        self._batch = SlotBatch(self._generator, most=max_active) if self._generator is not None else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"danlu-gen-{name}", daemon=True)
        if thread:
            self._thread.start()

    @property
    def batched(self) -> bool:
        return self._batch is not None

    @property
    def generator(self) -> Generator | None:
        """The Generator whose streams this worker decodes together (None for a round robin of stream functions)."""
        return self._generator

    # ---- event-loop side -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: Any) -> Job:
        job = job_on_this_loop(prompt_ids, params)
        self._inbox.put(job)
        return job

    @property
    def active(self) -> int:
        return len(self._batch) if self._batch is not None else len(self._active)

    @property
    def queued(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
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

    def _next_waiting(self) -> Job | None:
        """The next queued job that still wants an answer (cancelled ones end here)."""
        while self._waiting:
            job = self._waiting.popleft()
            if not job.cancelled.is_set():
                return job
            self.stats["cancelled"] += 1
            job.post(_END)
        return None

    def _end(self, job: Job, outcome: str, error: BaseException | None = None) -> None:
        self.stats[outcome] += 1
        if error is not None:
            job.post(error)
        job.post(_END)
        elapsed = time.perf_counter() - job.submitted
        self._job_seconds = elapsed if self._job_seconds <= 0 else 0.8 * self._job_seconds + 0.2 * elapsed

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self._active or (self._batch is not None and len(self._batch))
            self._admit(block=not busy and not self._waiting)
            if self._batch is not None:
                self._batch_step()
                self._round_done()
                continue
            while len(self._active) < self.max_active:
                job = self._next_waiting()
                if job is None:
                    break
                stream = self._stream_fn(job.prompt_ids, job.params, cancelled=job.cancelled.is_set)
                self._active.append(_Running(job, stream))
                self.stats["started"] += 1
            self.stats["peak_active"] = max(self.stats["peak_active"], len(self._active))
            for running in list(self._active):
                self._step(running)
            self._round_done()
        for running in self._active:
            with contextlib.suppress(Exception):
                running.stream.close()  # type: ignore[attr-defined]
            running.job.post(_END)
        for row in self._batch.active if self._batch is not None else []:
            row.tag.post(_END)
        self._round_done()

    def _round_done(self) -> None:
        """After each round of steps (a batch step, or one token of each round-robin stream): nothing here; the
        engine process sends the round's items to the server in one message."""

    # ---- continuous batching -----------------------------------------------------------------------------------
    def _batch_step(self) -> None:
        """Cancelled streams leave, waiting ones join (prefilled), then one decode step of them all."""
        batch, gen = self._batch, self._generator
        assert batch is not None and gen is not None
        for row in batch.active:
            if row.tag.cancelled.is_set():
                batch.drop(row)
                self._end(row.tag, "cancelled")
        joining: list[Row] = []
        while len(joining) < batch.room:
            job = self._next_waiting()
            if job is None:
                break
            try:
                joining.append(gen.row(job.prompt_ids, job.params, tag=job))
            except Exception as e:  # a bad prompt fails its own request only
                self._end(job, "failed", e)
            else:
                self.stats["started"] += 1
        events: list[tuple[Row, str]] = []
        try:
            if joining:
                events += batch.admit(joining)
            events += batch.advance()
        except (
            Exception
        ) as e:  # reported to every stream of the step (4xx/5xx decided there); the worker lives on
            for row in {id(r): r for r in batch.active + joining}.values():  # none has had this step's events
                batch.drop(row)
                self._end(row.tag, "failed", e)
            return
        self.stats["peak_active"] = max(
            self.stats["peak_active"], len(batch) + sum(r.done for r, _ in events)
        )
        for row, delta in events:
            job = row.tag
            if delta:
                job.post(delta)
            if row.done:
                tail, completion = row.close()
                if tail:
                    job.post(tail)
                self.stats["tokens"] += len(completion.token_ids)
                job.post(completion)
                self._end(job, "finished")

    # ---- round robin ---------------------------------------------------------------------------------------------
    def _step(self, running: _Running) -> None:
        job = running.job
        outcome, error = None, None
        if job.cancelled.is_set():
            outcome = "cancelled"
        else:
            try:
                item = next(running.stream)
            except StopIteration:
                outcome = "finished"
            except Exception as e:  # reported to the request (4xx/5xx decided there); the worker lives on
                outcome, error = "failed", e
            else:
                if isinstance(item, str):
                    if item:
                        job.post(item)
                else:
                    self.stats["tokens"] += len(getattr(item, "token_ids", ()) or ())
                    job.post(item)
        if outcome is not None:
            with contextlib.suppress(Exception):
                running.stream.close()  # type: ignore[attr-defined]
            self._active.remove(running)
            self._end(job, outcome, error)
