"""A served model in a process of its own: the HTTP server's event loop and the decode loop stop sharing one GIL.

In one process the worker thread's compiled batch step gives up the interpreter lock while it computes and must
take it back from the event loop to return; with 16 streaming clients the loop held it often enough that the
same 16-row step took 5.6 ms in the server against 2.6 ms alone (BENCHMARKS.md, fourteenth session). So
`danlu serve` starts one engine process per checkpoint (vLLM's engine core does the same): it loads the model,
builds the Generator (`served_generator`) and runs `ModelWorker`'s loop in its main thread, reading jobs and
cancellations from a pipe between steps and sending each round's items back in one message. The server keeps a
`ProcessWorker`: the same surface as a `ModelWorker` (submit, iterate, reserve, stats), a sender thread that writes
jobs and cancellations to the pipe (so a busy engine with a full pipe never holds up the event loop), a reader
thread that hands each message's items to the event loop in one call, and the tokenizer and context the engine
reported when it was ready. If the engine dies, every open request fails with a message saying so, and new ones
are refused.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import itertools
import multiprocessing
import pickle
import queue
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from danlu import DanluError
from danlu.generate import Generator
from danlu.serve.engine import _END, Admission, Job, ModelWorker, job_on_this_loop

# a big model on a slow disk plus its first compilation; the engine's death ends the wait sooner
LOAD_TIMEOUT_S = 3600.0


def _room_for_a_copy(model: Any) -> bool:
    """Whether the memory available now holds the model's weights twice over: a frozen batch graph packs a copy of
    them (a depth-12 model's 309 MB of weights: 1.25 GB resident frozen against 0.96 GB plain). False where it
    cannot be told."""
    from danlu.machine import available_memory

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights <= available_memory()


def freeze_heap() -> None:
    """Exempts everything a server has built so far (the model, dynamo's and inductor's graphs) from the cyclic
    garbage collector (gc.freeze): a full collection of that heap took 260–450 ms with the GIL held
    (17 of them while a depth-4 model loaded and compiled), and one during serving would hold up every stream. Call
    it once loading and compiling are done; what requests allocate later is collected as before."""
    gc.collect()
    gc.freeze()


def served_generator(name: str, path: str, device: str, compile: bool) -> tuple[Generator, Any]:
    """A checkpoint (danlu.io) loaded for serving: (its Generator, the Checkpoint). A server never trains its model,
    so the batch graph may hold the weights as constants (if their copy fits) and prompts may reuse the keys and
    values of the prefixes they share with earlier ones (the system prompt); `compile` compiles the decode steps
    now, so no request waits for the compiler."""
    from danlu.io import load_checkpoint
    from danlu.prefix_cache import PrefixCache

    ckpt = load_checkpoint(path, device=device)
    gen = Generator(ckpt.model, ckpt.tokenizer, compile=compile, frozen_weights=_room_for_a_copy(ckpt.model),
                    prefix_cache=PrefixCache())  # fmt: skip
    if compile:
        print(
            f"[danlu] compiling {name}'s decode step (once per process; --compile off skips it)", flush=True
        )
        gen.warm_up()
    return gen, ckpt


@dataclass(frozen=True)
class EngineSpec:
    """What an engine process needs to build its model: pickled to the child."""

    name: str
    path: str
    device: str = "cpu"
    compile: bool = False
    max_active: int = 64
    threads: int | None = None  # CPU threads of its matrix products; None: `engine_threads` decides


def engine_threads(asked: int | None, device: str) -> tuple[int | None, str]:
    """(torch threads for an engine process, why); None leaves torch's own choice. On a CPU the engine leaves one
    core to the HTTP server: two OpenMP threads on two cores wait for each other whenever the server's event loop
    takes a core (a 2-core CPU, 16 clients: 2,860 tokens/s with 2 threads, 3,836 with 1; BENCHMARKS.md)."""
    import os

    from danlu.cpu_threads import usable_cores

    cores = usable_cores()
    if asked is not None:
        if asked < 1:
            raise DanluError(f"--threads {asked}: at least 1")
        return asked, f"{asked} of {cores} cores, as asked"
    if not device.startswith("cpu"):
        return None, "torch's default (the model is on " + device + ")"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} of {cores} cores"
    threads = max(1, cores - 1)
    return threads, f"{threads} of {cores} cores, one left to the HTTP server"


# ---- the engine process ------------------------------------------------------------------------------------
def _sendable(item: Any) -> Any:
    """The item as it can cross the pipe: the end marker as None (never an item otherwise), an exception that does
    not pickle as a RuntimeError with its message."""
    if item is _END:
        return None
    if isinstance(item, BaseException):
        try:
            pickle.dumps(item)
        except Exception:
            return RuntimeError(f"{type(item).__name__}: {item}")
    return item


class _EngineLoop(ModelWorker):
    """`ModelWorker`'s loop in the engine process's main thread: jobs come from the pipe, items go back to it."""

    def __init__(self, gen: Generator, conn: Connection, spec: EngineSpec) -> None:
        super().__init__(gen, name=spec.name, max_active=spec.max_active, thread=False)
        self._conn = conn
        self._jobs: dict[int, Job] = {}
        self._outbox: list[tuple[int, Any]] = []

    def _admit(self, block: bool) -> None:
        try:
            if not self._conn.poll(0.5 if block else 0):
                return
            while True:
                message = self._conn.recv()
                if message[0] == "job":
                    _, ticket, prompt_ids, params = message
                    job = Job(prompt_ids, params, self._outbox_for(ticket), ticket=ticket)
                    self._jobs[ticket] = job
                    self._waiting.append(job)
                elif message[0] == "cancel" and message[1] in self._jobs:
                    self._jobs[message[1]].cancelled.set()
                elif message[0] == "stop":
                    self._stop.set()
                    return
                if not self._conn.poll(0):
                    return
        except (EOFError, OSError):  # the server is gone
            self._stop.set()

    def _outbox_for(self, ticket: int) -> Any:
        def deliver(item: Any) -> None:
            if item is _END:
                self._jobs.pop(ticket, None)
            self._outbox.append((ticket, _sendable(item)))

        return deliver

    def _round_done(self) -> None:
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        status = {"active": self.active, "queued": len(self._waiting), "stats": dict(self.stats),
                  "job_seconds": self._job_seconds}  # fmt: skip
        try:
            self._conn.send(("items", items, status))
        except (BrokenPipeError, EOFError, OSError):
            self._stop.set()


def _engine_main(spec: EngineSpec, conn: Connection) -> None:
    """The engine process: load, say ready (or why not), then decode until told to stop or the server goes.
    Ctrl-C reaches the whole process group: the server stops its engines, so the engine itself ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        threads, why = engine_threads(spec.threads, spec.device)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        print(f"[danlu] {spec.name}: engine process, CPU threads {why} (danlu serve --threads N to choose)",
              flush=True)  # fmt: skip
        gen, ckpt = served_generator(spec.name, spec.path, spec.device, spec.compile)
    except BaseException as e:  # reported to the server, which raises it there
        conn.send(("failed", str(e) if isinstance(e, DanluError) else f"{type(e).__name__}: {e}"))
        return
    freeze_heap()
    conn.send(("ready", {"tokenizer": ckpt.tokenizer, "context_length": int(ckpt.config.max_position_embeddings),
                         "meta": dict(ckpt.meta or {}), "batched": gen.batches}))  # fmt: skip
    _EngineLoop(gen, conn, spec)._run()


# ---- the server's side -------------------------------------------------------------------------------------
def _hand_over(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in batch:
        out.put_nowait(item)


class ProcessWorker(Admission):
    """A `ModelWorker` whose model runs in an engine process; `info` holds what the engine reported when ready
    (tokenizer, context_length, meta, batched), `stats` the engine's counters as of its last message."""

    def __init__(self, spec: EngineSpec, max_queued: int = 256) -> None:
        super().__init__()
        self.name, self.max_active, self.max_queued = spec.name, spec.max_active, max_queued
        self._active = self._queued = 0
        self._jobs: dict[int, Job] = {}
        self._tickets = itertools.count(1)
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()  # to the engine, via the sender
        self._gone: str | None = None
        # spawned, not forked: a fork of a process with threads (uvicorn's, torch's pools) can deadlock in the child
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_engine_main, args=(spec, child), name=f"danlu-engine-{spec.name}"
        )
        self._process.start()
        child.close()
        try:
            self.info = self._wait_ready()
        except BaseException:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            raise
        self._reader = threading.Thread(
            target=self._read, name=f"danlu-engine-reader-{spec.name}", daemon=True
        )
        self._reader.start()
        self._sender = threading.Thread(
            target=self._write, name=f"danlu-engine-sender-{spec.name}", daemon=True
        )
        self._sender.start()
        atexit.register(self.close)

    def _wait_ready(self) -> dict[str, Any]:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._process.is_alive() or waited > LOAD_TIMEOUT_S:
                raise DanluError(f"the engine process of model {self.name!r} stopped while loading it "
                                 f"(exit code {self._process.exitcode})")  # fmt: skip
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise DanluError(f"the engine process of model {self.name!r} exited while loading it") from None
        if kind != "ready":
            raise DanluError(payload)
        return payload

    @property
    def batched(self) -> bool:
        return bool(self.info["batched"])

    @property
    def gone(self) -> str | None:
        """Why the engine process is no longer there (None while it runs)."""
        return self._gone

    @property
    def generator(self) -> None:
        """None: the Generator lives in the engine process."""
        return None

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return self._queued

    # ---- event-loop side -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: Any) -> Job:
        job = job_on_this_loop(prompt_ids, params)
        job.ticket = next(self._tickets)
        self._jobs[job.ticket] = job
        # the reader sets _gone before it fails the jobs it holds: a job added after that is failed here
        if self._gone is None:
            self._outbox.put(("job", job.ticket, job.prompt_ids, params))
            self._queued += 1  # until the engine's next report
        elif self._jobs.pop(job.ticket, None) is not None:
            job.post(DanluError(self._gone))
            job.post(_END)
        return job

    def _cancel(self, job: Job) -> None:
        job.cancelled.set()
        if self._jobs.pop(job.ticket, None) is not None:
            self._outbox.put(("cancel", job.ticket))

    # ---- sender thread ---------------------------------------------------------------------------------------
    def _write(self) -> None:
        """Writes the outbox to the pipe in order. A send blocks while the pipe is full (the engine reads between
        steps, and a long prefill of many big prompts fills it); here that holds up nobody. A pipe that breaks
        means the engine is gone: the reader sees it too and fails the open jobs."""
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                return

    # ---- reader thread ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                _, items, status = self._conn.recv()
            except (EOFError, OSError):
                break
            self._active, self._queued = status["active"], status["queued"]
            self.stats.update(status["stats"])
            self._job_seconds = status["job_seconds"]
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
            for ticket, item in items:
                job = self._jobs.get(ticket)
                if job is None:  # cancelled here already
                    continue
                if item is None:
                    item = _END
                    self._jobs.pop(ticket, None)
                assert job.loop is not None and job.out is not None  # made by job_on_this_loop
                batches.setdefault(job.loop, []).append((job.out, item))
            for loop, batch in batches.items():
                with contextlib.suppress(RuntimeError):  # that event loop is closed: its requests are gone
                    loop.call_soon_threadsafe(_hand_over, batch)
        self._process.join(timeout=5)
        self._gone = (f"the engine process of model {self.name!r} exited (exit code {self._process.exitcode}); "
                      "restart the server")  # fmt: skip
        self._active = self._queued = 0
        for ticket in list(self._jobs):
            job = self._jobs.pop(ticket, None)
            if job is not None:
                job.post(DanluError(self._gone))
                job.post(_END)

    def close(self) -> None:
        """Stops the engine (it finishes the step it is in) and waits for it; idempotent."""
        if self._process.is_alive():
            self._outbox.put(("stop",))
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._outbox.put(None)
        self._conn.close()
        for thread in (self._reader, self._sender):
            if thread is not threading.current_thread():
                thread.join(timeout=5)
