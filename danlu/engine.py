"""The one training loop every stage uses: a stage brings a data source and a loss, the engine does the rest.

Device and precision (bf16 autocast where the hardware has it, fp32 master weights), torch.compile, AdamW or Muon,
warmup + cosine/WSD schedules, clipping, gradient accumulation, DDP/FSDP2 under torchrun, evaluation, samples,
early stopping, atomic checkpoints with exact resume, a NaN/inf guard, a progress bar and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from danlu import DanluError
from danlu.compiler import is_compiler_error, resolve_compile
from danlu.files import atomic_path, recover_swapped, write_jsonl_atomic


class DataSource(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """Engine settings, shared by every training stage (a recipe's `train:` section, overridden per stage)."""

    steps: int = 1000
    batch_size: int = 16  # rows per micro-batch per process
    # Rows per micro-batch over all processes (0 = off): each process then takes global_batch_size / world_size
    # (`resolve_batch`), so a relaunch on another number of processes trains on the same rows and resumes exactly.
    # A step takes grad_accum of them. It beats a batch_size of its own section or below; a stage's own
    # `train.batch_size` beats a recipe-wide global_batch_size (stage section > recipe `train:`).
    global_batch_size: int = 0
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_ratio: float = 0.2  # WSD: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    device: str = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    eval_every: int = 100
    eval_rows: int = 256
    save_every: int = 0  # also save every N steps; 0: by time only
    save_minutes: float = (
        10.0  # save at least this often (and always at the end, on Ctrl-C and SIGTERM); 0: off
    )
    log_every: int = 10
    sample_every: int = 0
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    overfit_warning_gap: float = 0.5  # warn when val loss exceeds train loss by this many nats
    max_nonfinite_steps: int = 3
    seed: int = 0
    # Same seed, same run, bit for bit (same machine and software): torch's deterministic algorithms. Without it
    # compiled CPU kernels give slightly different sums from run to run, so same-seed runs drift apart; with it
    # they do not, at 0–6% more time a step on the tiny recipe (BENCHMARKS.md). Ops with no deterministic version
    # warn instead of failing.
    deterministic: bool = False
    threads: int = 0  # CPU threads; 0 = the cores other processes leave free (danlu.cpu_threads)
    peak_flops: float = 0.0  # for MFU; 0 = estimate from the device
    progress: bool = True


# ───────────────────────── device, precision, distributed ─────────────────────────


def resolve_device(name: str) -> torch.device:
    """A `device` setting as a torch device: `auto` picks CUDA (this rank's GPU), then MPS, then the CPU; a named
    device that this torch cannot reach stops here with one line, not deep in a model's first `.to()`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DanluError(f"device {name!r}: not a device (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DanluError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DanluError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DanluError(f"device {name!r}: this torch sees no Apple GPU (MPS)")
    return device


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux), empty where /proc/cpuinfo is absent."""
    return set(
        next((ln.split(":", 1)[1].split() for ln in _cpuinfo().splitlines() if ln.startswith("flags")), [])
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX); without them bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _amx_in_use(flags: set[str]) -> bool:
    """Whether oneDNN runs bf16 products on AMX tiles: the CPU has them and no ONEDNN_MAX_CPU_ISA (or its older
    name) caps oneDNN below them (`ALL` and the AMX levels leave them on), as a user does to compare, or an image."""
    caps = [os.environ.get(k, "").upper() for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")]
    return "amx_bf16" in flags and not any(cap and cap != "ALL" and "AMX" not in cap for cap in caps)


BF16_MUST_WIN = 1.25  # bf16 also costs casts and a lossier loss: its matrix products must be clearly faster


def _bf16_matmul_speedup(rows: int = 1024, inner: int = 512, cols: int = 1536, repeats: int = 5) -> float:
    """bf16 over fp32 throughput of one (rows × inner) @ (inner × cols) product on this CPU, best of `repeats` each
    (the shape of a small model's MLP): what oneDNN's bf16 kernels give here against MKL's fp32 ones."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
        a @ b  # first call: kernel choice and packing
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        seconds[dtype] = min(times)
    return seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-9)


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether `dtype: auto` trains in bf16 on this CPU. With AMX, always (oneDNN runs bf16 products on its tiles,
    ~4× fp32 here); without bf16 instructions, never. With AVX-512 BF16 alone it depends on the chip, so it is
    measured, once per process: on Zen 4 bf16 products ran ~3.5× fp32, but on an Intel Xeon whose AMX was hidden
    (oneDNN capped at AVX-512 BF16, as a VM that does not pass AMX through shows it) 0.56×, and the tiny recipe's
    compiled step 0.71× fp32 (BENCHMARKS.md, seventeenth session)."""
    flags = cpu_flags()
    if _amx_in_use(flags):
        return True
    if not {"avx512_bf16", "amx_bf16"} & flags:
        return False
    speedup = _bf16_matmul_speedup()
    pays = speedup >= BF16_MUST_WIN
    if os.environ.get("RANK", "0") == "0":  # each process measures; the trainer keeps rank 0's choice for all
        how = "oneDNN capped" if "amx_bf16" in flags else "AVX-512 BF16, no AMX"
        print(f"[danlu] this CPU's bf16 matrix products ({how}) "
              f"ran {speedup:.2f}× its fp32 ones: dtype auto is {'bf16' if pays else 'fp32'} (train.dtype=bf16 or "
              "fp32 decides instead)")  # fmt: skip
    return pays


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_pays() else torch.float32


@functools.cache
def _say_training_runs_in_fp32() -> None:
    """A CPU without bf16 instructions trains ~3× slower (BENCHMARKS.md); said once, so the ETA is no surprise."""
    if not cpu_has_bf16():
        print("[danlu] this CPU has no bf16 instructions (AVX-512 BF16 or AMX): training runs in fp32, about 3× "
              "slower than on a CPU that has them")  # fmt: skip


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense peak FLOP/s of the device for MFU. GPUs by name; CPUs estimated from cores × clock × SIMD width."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40": 181e12, "4090": 165e12, "a10": 125e12}
        for key, value in table.items():
            if key in name:
                return value if dtype == torch.bfloat16 else value / 2
        return 100e12
    cores = torch.get_num_threads()
    ghz = 2.5
    for line in _cpuinfo().splitlines():
        if line.startswith("cpu MHz"):
            ghz = float(line.split(":")[1]) / 1000
            break
    flags = cpu_flags()
    if dtype == torch.bfloat16 and _amx_in_use(flags):
        # AMX's tile unit: 1,024 bf16 FLOPs per core per cycle, 8× the AVX-512 BF16 dot products. oneDNN runs
        # bf16 matrix products on it, so a peak from vector widths would report an MFU several times too high.
        return cores * ghz * 1e9 * 1024
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4  # fp32 lanes of the widest vectors
    # Per core per cycle: 2 FMA units × lanes × 2 FLOPs; bf16 dot products (AVX-512 BF16) double that.
    per_cycle = 2 * lanes * 2 * (2 if dtype == torch.bfloat16 else 1)
    return cores * ghz * 1e9 * per_cycle


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_world_size() -> int:
    """The number of processes this launch has (torchrun's WORLD_SIZE; 1 without torchrun), known before the process
    group starts: what `resolve_batch` divides the global batch by, and what `init_distributed` starts."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def resolve_batch(cfg: TrainConfig, world_size: int, setting: str = "train.global_batch_size") -> TrainConfig:
    """Sets `cfg.batch_size` (per process) from `cfg.global_batch_size` when that is on: the one place the global
    batch becomes a per-process one, so every stage's data source is built from the same resolved value. A world
    size that does not divide it stops here, before any model loads, with the numbers that would."""
    g = cfg.global_batch_size
    if g < 0:
        raise DanluError(f"{setting} {g}: must be 0 (off: train.batch_size per process) or a row count")
    if g == 0:
        return cfg
    if g % world_size:
        limit = max(8, 2 * world_size)
        fits = [n for n in range(2, min(g, limit) + 1) if g % n == 0] or [1]
        launch = fits[0] if len(fits) == 1 else f"{', '.join(map(str, fits[:-1]))} or {fits[-1]}"
        raise DanluError(f"{setting} {g} is not divisible by {world_size} processes; use a multiple of "
                         f"{world_size} or launch {launch} process{'es' if fits != [1] else ''}")  # fmt: skip
    cfg.batch_size = g // world_size
    return cfg


def init_distributed(device_name: str) -> Dist:
    """Starts the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU."""
    world = launch_world_size()
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


_RUN_GROUP: Any = None  # _wait_group's gloo group
RANK_ZERO_WAIT = datetime.timedelta(days=7)  # how long the other ranks wait for a stage rank 0 runs alone


def close_distributed() -> None:
    """Destroys the process group `init_distributed` started, if there is one: once, where a command ends (every
    stage of `danlu run` shares the group), while Python is still fully alive. A gloo worker thread can still hold
    a collective's tensors after its `wait()` has returned; a process that exits with the group alive leaves that
    thread to free them while the interpreter shuts down, and the process dies with SIGABRT ("terminate called
    without an active exception"). Destroying the group first drains and joins those threads. No barrier: the
    teardown is local, so a rank that is done (rank 1, while rank 0 writes its reports) leaves without waiting."""
    global _RUN_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _RUN_GROUP = None


def _wait_group() -> Any:
    """A gloo group in which ranks wait for rank 0 while it works alone (a stage of `danlu run` without a distributed
    form, compression's pruning, the detector's sampling), made by every rank at its first wait. A data stage on a
    dump can run for hours, past the default group's collective timeout, which stays as it is so that a hung
    training step still fails."""
    global _RUN_GROUP
    if _RUN_GROUP is None:
        _RUN_GROUP = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
    return _RUN_GROUP


def wait_for_main(d: Dist) -> None:
    """Every rank waits here until all arrive: after rank 0 has finished a stage it ran alone."""
    if d.world_size > 1:
        with _main_gone(d):
            dist.barrier(group=_wait_group())


def broadcast_from_main(value: Any, d: Dist) -> Any:
    """Rank 0's `value` (any picklable object) on every rank: what one rank decided or made for all."""
    if d.world_size == 1:
        return value
    box = [value]
    with _main_gone(d):
        dist.broadcast_object_list(box, src=0, group=_wait_group())
    return box[0]


@contextlib.contextmanager
def _main_gone(d: Dist) -> Iterator[None]:
    """A waiting rank whose peer stopped (rank 0's stage failed and its process ended) says so in one line instead
    of gloo's traceback, which would bury rank 0's own message."""
    try:
        yield
    except RuntimeError:
        raise DanluError(f"rank {d.rank}: another process of this launch stopped while this one waited for it; "
                         "its own message says why") from None  # fmt: skip


def _launch_variable(name: str) -> bool:
    """The environment torchrun gives its workers, which `init_distributed` and any child process would act on."""
    return name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "MASTER_ADDR", "MASTER_PORT") or name.startswith(("ROLE_", "TORCHELASTIC_"))  # fmt: skip


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """The body runs as a launch without torchrun: what rank 0 runs alone while the other ranks wait (the stages of
    `danlu run` that have no distributed form: the corpus, data, tokenizer, evaluation, export; compression's chat
    restore). Inside, `launch_world_size` is 1, so `init_distributed` starts no collective the waiting ranks would
    never join, and a child process (compression's restore SFT) starts as a launch of its own; on a CPU it uses the
    threads of all the cores the node's processes share (less those other programs keep busy:
    `cpu_threads.choose_threads`), as the other ranks sit idle in `wait_for_main`."""
    from danlu.cpu_threads import choose_threads

    saved = {k: os.environ.pop(k) for k in list(os.environ) if _launch_variable(k)}
    threads = torch.get_num_threads()
    torch.set_num_threads(choose_threads(0, 1).threads)
    try:
        yield
    finally:
        os.environ.update(saved)
        torch.set_num_threads(threads)


def all_reduce_mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / d.world_size


# ───────────────────────── optimizers and schedules ─────────────────────────


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.decay_ratio))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return 1.0 - (1.0 - floor) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _zeropower_newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalizes g (the Muon update) with a quintic Newton–Schulz iteration in `dtype`; g is one
    matrix or a stack of same-shape matrices (..., m, n), each orthogonalized on its own. Under FSDP g is a DTensor:
    its matrix products act on the whole matrix (DTensor gathers what it needs), not a slice."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / ((x.norm() if x.dim() == 2 else x.norm(dim=(-2, -1), keepdim=True)) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if transposed else x).to(g.dtype)


MUON_STACK_BYTES = 256 << 20  # the most a stack of same-shape updates holds: bounded extra memory on big models


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalized updates for 2-D weight matrices (Keller Jordan's Muon, nanochat's choice).

    The iteration runs in the precision training computes in (`dtype`): bf16 where the hardware has it, as Muon's
    authors run it; fp32 elsewhere, where bf16 products are emulated and slow — and where runs on 1 and on 2
    processes must agree to 1e-5, which bf16 rounding of all-reduced gradients does not give."""

    def __init__(
        self, params: list[nn.Parameter], lr: float = 0.02, momentum: float = 0.95,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for stack in self._stacks(params):
                updates = [self._nesterov(params[i], group["momentum"]) for i in stack]
                if len(updates) == 1:
                    orthogonal = [_zeropower_newton_schulz(updates[0], dtype=self.dtype)]
                else:
                    orthogonal = list(_zeropower_newton_schulz(torch.stack(updates), dtype=self.dtype).unbind(0))
                for i, update in zip(stack, orthogonal):
                    p = params[i]
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(update, alpha=-group["lr"] * scale)

    def _nesterov(self, p: nn.Parameter, momentum: float) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        return p.grad.lerp(buf, momentum)

    def _stacks(self, params: list[nn.Parameter]) -> list[list[int]]:
        """Which updates are orthogonalized together, as one batch of matrix products: in bf16, those of one shape
        (a model's layers repeat a few shapes), up to MUON_STACK_BYTES of updates a stack. The results are the same
        bits as one at a time, in 0.63× the time (the tiny recipe's 28 matrices on this Xeon's AMX: 34 against 53 ms
        a step). In fp32 on a CPU batching ran 1.08× slower (MKL's single products are its best), and FSDP's
        DTensors stay one at a time (benchmarks/muon_step.py; BENCHMARKS.md, eighteenth session)."""
        if self.dtype != torch.bfloat16 or any(hasattr(p, "full_tensor") for p in params):
            return [[i] for i in range(len(params))]
        by_shape: dict[tuple[int, ...], list[list[int]]] = {}
        for i, p in enumerate(params):
            stacks = by_shape.setdefault(tuple(p.shape), [[]])
            if stacks[-1] and (len(stacks[-1]) + 1) * p.numel() * p.element_size() > MUON_STACK_BYTES:
                stacks.append([])
            stacks[-1].append(i)
        return [stack for stacks in by_shape.values() for stack in stacks]


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything (decay on matrices only), or Muon for hidden matrices + AdamW for the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = []
    for n, p in named:  # tied embeddings appear twice
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    fused = device.type in ("cuda", "cpu") and all(p.is_floating_point() for _, p in unique)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        hidden = [p for n, p in unique if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for _, p in unique if id(p) not in hidden_ids]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.0},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        adam = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)
        return [Muon(hidden, lr=cfg.muon_lr, dtype=resolve_dtype(cfg.dtype, device)), adam]
    decay = [p for _, p in unique if p.dim() >= 2]
    no_decay = [p for _, p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)]


def clip_gradients(params: list[nn.Parameter], grad_clip: float) -> float:
    """The gradient norm before clipping, clipping to `grad_clip` when it is > 0. Measured even without clipping:
    the engine's guard needs it, since a finite loss can still give an inf/NaN gradient (an overflow in backward)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
        norm = norm.full_tensor()
    return float(norm)


def optimizer_step(
    optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter], grad_clip: float,
    grad_norm: float | None = None,
) -> float:  # fmt: skip
    """Clips the gradients to `grad_clip` (0: no clipping), steps every optimizer and frees the gradients.

    Returns the gradient norm before clipping; `grad_norm` given means the caller clipped already
    (`clip_gradients`). The one place the engine and the training benchmark take a step, so what the benchmark
    times is what training runs."""
    if grad_norm is None:
        grad_norm = clip_gradients(params, grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grad_norm


LossUnits = Callable[[dict[str, torch.Tensor]], float]


def target_tokens(batch: dict[str, torch.Tensor]) -> float:
    """The units a per-token mean loss averages over: the batch's scored targets (not IGNORE_INDEX). The engine
    weights each micro-batch's mean by its share of the global batch's units, so a short answer's tokens count as
    much as a long one's whatever the accumulation and world size; a batch without targets counts as one unit."""
    if "targets" not in batch:
        return 1.0
    from danlu.losses_fused import IGNORE_INDEX

    return float((batch["targets"] != IGNORE_INDEX).sum())


def per_batch(batch: dict[str, torch.Tensor]) -> float:
    """Every micro-batch weighs the same: right for a loss averaged over a fixed number of pairs or sequences per
    micro-batch (reward, DPO, GRPO), where equal-size micro-batches make the mean of means the global mean."""
    return 1.0


# ───────────────────────── the trainer ─────────────────────────


def use_deterministic(on: bool, device: torch.device) -> None:
    """Turns torch's deterministic algorithms on or off for this process (`TrainConfig.deterministic`). cuBLAS
    needs its workspace fixed for that, before its first use in the process."""
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteLoss(DanluError):
    pass


@dataclass
class Hooks:
    """What a stage plugs into the loop besides data and loss."""

    save_model: Callable[[dict[str, torch.Tensor], Path, dict[str, Any]], None]  # (state dict, folder, meta)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = (
        None  # must include "val_loss" for early stopping
    )
    sample: Callable[[nn.Module], list[str]] | None = None


class Trainer:
    """Runs `cfg.steps` optimizer steps of `loss_fn` over `data`, saving into `out` (a model folder).

    `out/` holds the model files (written by hooks.save_model), `out/trainer_state/` the optimizer, data position,
    RNG and step, and `out/metrics.jsonl` one JSON line per log/eval event. Each save writes a complete new folder
    beside the old one and swaps them with renames, so a crash or a full disk leaves the previous checkpoint.
    """

    def __init__(
        self, cfg: TrainConfig, model: nn.Module, data: DataSource, loss_fn: LossFn, out: Path, hooks: Hooks,
        *, tokens_per_row: int = 0, flops_per_token: float = 0.0, stage: str = "train",
        loss_units: LossUnits = target_tokens,
    ) -> None:  # fmt: skip
        self.cfg, self.data, self.loss_fn, self.out, self.hooks, self.stage = (
            cfg,
            data,
            loss_fn,
            Path(out),
            hooks,
            stage,
        )
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            from danlu.cpu_threads import choose_threads

            threads = choose_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(threads.threads)
            if threads.new and self.dist.main:
                print(threads.message())
        elif cfg.threads:
            torch.set_num_threads(cfg.threads)
        use_deterministic(cfg.deterministic, self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.dtype == "auto" and self.device.type == "cpu":  # a measured choice (cpu_bf16_pays): rank 0's for all
            self.dtype = broadcast_from_main(self.dtype, self.dist)
            if self.dtype == torch.float32:
                _say_training_runs_in_fp32()
        self.raw_model = model.to(self.device)
        self.compiled = self._use_compile()
        self.model = self._wrap(self.raw_model)
        self.optimizers = build_optimizers(self.raw_model, cfg, self.device)
        for (
            opt
        ) in self.optimizers:  # the schedule scales base_lr; set now, so a saved state has the same keys
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        self.step = 0
        self.tokens_per_row = tokens_per_row
        self.flops_per_token = flops_per_token
        self.loss_units = (
            loss_units  # what the loss averages over (`target_tokens`, `per_batch`): its weighting
        )
        self._train_tokens, self._train_seconds = 0, 0.0  # the whole stage's, for its final tokens/s and MFU
        self.peak = cfg.peak_flops or peak_flops(self.device, self.dtype)
        self.best_val = math.inf
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self._tb = None
        self._interrupted: int | None = (
            None  # the signal that asked training to stop at the next step boundary
        )
        self._last_save = time.monotonic()
        self._recover()

    # -- setup --
    def _wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.world_size > 1:
            if self.cfg.parallel == "fsdp":
                shard_blocks(model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.compiled:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _fall_back_to_eager(self, error: BaseException) -> bool:
        """`compile: auto` must never cost a user their run: if torch.compile fails (no working C++ toolchain, an
        unsupported op), say so once and go on eagerly. With `compile: on` the error stands."""
        if not (self.compiled and self.cfg.compile == "auto" and is_compiler_error(error)):
            return False
        print(f"[danlu] {self.stage}: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
              "training on without it (set train.compile=off to skip the attempt)")  # fmt: skip
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.compiled = False
        self.model = self.model._orig_mod  # what torch.compile wrapped: the model, or its DDP/FSDP wrapper
        return True

    def _use_compile(self) -> bool:
        """`auto`: on GPUs; on CPUs only for runs of 500+ steps with a C++ compiler at hand. Measured on the tiny
        shape (BENCHMARKS.md): compiling costs ~30 s and makes each CPU step ~25% faster, so it pays off from a
        couple of minutes of training on, and short runs (tests, smoke) stay eager."""
        return resolve_compile(self.cfg.compile, self.device, pays=self.device.type == "cuda" or self.cfg.steps >= 500)

    def _forward_backward(self, batch: dict[str, torch.Tensor], ctx: Any, scale: float) -> tuple[Any, Any]:
        """Forward and backward of one micro-batch, its mean loss scaled by its share of the global batch."""
        with ctx:
            with self.autocast():
                loss, stats = self.loss_fn(self.model, batch)
            (loss * scale).backward()
        return loss, stats

    def _global_sum(self, values: list[float]) -> list[float]:
        """Sums over the ranks (one all-reduce); the values themselves on a single process."""
        if self.dist.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _skip_step(self, nonfinite: int, what: str) -> None:
        """Drops this step's gradients and says so; too many non-finite steps in a row stop training."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.log({"event": "nonfinite", "what": what})
        if self.dist.main:
            print(f"[danlu] {self.stage}: step {self.step}: {what}; step skipped, weights unchanged")
        if nonfinite >= self.cfg.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"{self.stage}: the loss or its gradient was not finite for {nonfinite} steps in a row (last at "
                f"step {self.step}: {what}); training stopped, the last good checkpoint in {self.out} is untouched. "
                "Lower the learning rate or check the data."
            )

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # -- checkpoints --
    def save(self, final: bool = False) -> None:
        """Writes model + trainer state to a fresh folder and swaps it in for the previous checkpoint."""
        if self.dist.world_size > 1:
            dist.barrier()
        model_state = self.raw_model.state_dict() if not self._sharded() else self._full_state()
        opt_states = {f"optimizer_{i}": self._optimizer_state(o) for i, o in enumerate(self.optimizers)}
        if not self.dist.main:
            self._recover()  # meets the barrier rank 0 reaches after writing
            return
        meta = {"step": self.step, "final": final, "metrics": self.last_metrics()}
        with atomic_path(self.out) as tmp:
            tmp.mkdir(parents=True)
            self.hooks.save_model(model_state, tmp, meta)
            state_dir = tmp / "trainer_state"
            state_dir.mkdir()
            if _saved_dtype(tmp) != "float32":  # the model folder was rounded (bf16/fp16): keep exact weights
                from safetensors.torch import save_file

                save_file(
                    {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if not k.startswith("rope_")
                     and not (k.endswith("lm_head.weight") and _is_tied(self.raw_model))},
                    str(state_dir / MASTER_WEIGHTS),
                )  # fmt: skip
            torch.save(
                {
                    **opt_states,
                    "rng_torch": torch.get_rng_state(),
                    "rng_numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                },
                state_dir / "optimizer.pt",
            )
            state = {
                "step": self.step,
                "data": self.data.state_dict(),
                "best_val": self.best_val,
                "bad_evals": self.bad_evals,
                "python_rng": list(random.getstate()[1]),
                "numpy_rng_pos": int(np.random.get_state()[2]),
                "config": dataclasses.asdict(self.cfg),
                "stage": self.stage,
                "finished": final,
                # the step time and tokens so far: a resumed run's final tokens/s and MFU are then the stage's
                "train_seconds": self._train_seconds,
                "train_tokens": self._train_tokens,
            }
            if (self.out / "metrics.jsonl").exists():
                shutil.copy2(self.out / "metrics.jsonl", tmp / "metrics.jsonl")
            if (
                self._tb
            ):  # the TensorBoard log moves with the folder: closed here, reopened there at the next log
                self._tb.close()
                self._tb = None
            if (self.out / "tensorboard").is_dir():
                shutil.copytree(self.out / "tensorboard", tmp / "tensorboard")
            (state_dir / "state.json").write_text(json.dumps(state) + "\n")  # last: marks the folder complete
        self._last_save = time.monotonic()
        self._recover()  # removes temp folders that interrupted saves left beside the checkpoint

    def _sharded(self) -> bool:
        """FSDP2 under torchrun: parameters and optimizer states are DTensor shards, one per rank."""
        return self.cfg.parallel == "fsdp" and self.dist.world_size > 1

    def _optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state to save: its own state_dict, or under FSDP the full (unsharded) state gathered
        from every rank, keyed by parameter name (every rank must call this: it is a collective)."""
        if not self._sharded():
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.raw_model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def resume(self) -> None:
        """Restores weights, optimizer, data position, RNG and step from `out`; errors name what is wrong."""
        self._recover()
        state_path = self.out / "trainer_state" / "state.json"
        if not state_path.exists():
            raise DanluError(
                f"--resume: {self.out} has no trainer_state/state.json (no checkpoint of this stage)"
            )
        try:
            state = json.loads(state_path.read_text())
            blob = torch.load(
                self.out / "trainer_state" / "optimizer.pt", weights_only=True, map_location=self.device
            )
        except Exception as e:  # a truncated or foreign file
            raise DanluError(f"--resume: {self.out}/trainer_state is unreadable or partial ({e})") from None
        if state.get("stage") != self.stage:
            raise DanluError(
                f"--resume: {self.out} is a checkpoint of stage {state.get('stage')!r}, not {self.stage!r}"
            )
        from danlu.io import load_state_dict_file, load_weights

        master = self.out / "trainer_state" / MASTER_WEIGHTS
        adapter = self.raw_model.__dict__.get(
            "danlu_adapter"
        )  # a peft adapter trains: its folder holds only it
        if adapter is not None:
            adapter.restore(self.out)
            missing, unexpected = [], []
        else:
            weights = (
                load_state_dict_file(master) if master.exists() else load_weights(self.out, torch.float32)
            )
            if self._sharded():  # full tensors in, each rank keeps its shard of every DTensor parameter
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                missing, unexpected = set_model_state_dict(
                    self.raw_model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
                )
            else:
                missing, unexpected = self.raw_model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise DanluError(
                f"--resume: {self.out} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for i, opt in enumerate(self.optimizers):
            if f"optimizer_{i}" not in blob:
                raise DanluError(f"--resume: {self.out} was saved with another optimizer setting")
            if self._sharded():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.raw_model, opt, blob[f"optimizer_{i}"],
                                         options=StateDictOptions(full_state_dict=True))  # fmt: skip
            else:
                opt.load_state_dict(blob[f"optimizer_{i}"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(blob["rng_torch"].cpu())
        np.random.set_state(
            ("MT19937", blob["rng_numpy"].cpu().numpy().astype(np.uint32), state["numpy_rng_pos"], 0, 0.0)
        )
        random.setstate((3, tuple(state["python_rng"]), None))
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.bad_evals = int(state["bad_evals"])
        # (a checkpoint saved before these were kept has none: the figures then cover this launch's steps)
        self._train_seconds = float(state.get("train_seconds", 0.0))
        self._train_tokens = int(state.get("train_tokens", 0))
        # the stage's records so far, on every rank: what a stage reads from its history at the end (its first
        # evaluation, its first rewards) is then the stage's, not the resumed launch's
        self.history = self._records_until(self.step)
        if self.dist.main:
            print(f"[danlu] resumed {self.stage} from step {self.step} in {self.out}")
            if (self.out / "metrics.jsonl").exists():  # the steps after it are redone and logged again
                write_jsonl_atomic(self.out / "metrics.jsonl", self.history)

    def _recover(self) -> None:
        """Puts the newest complete checkpoint in `out` (finishing a save killed between its renames, or taking a
        complete save left in a temp folder) and removes the leftovers; runs before anything reads or writes `out`,
        so a rerun never starts over a checkpoint it could not see and then deletes it."""
        if self.dist.main:
            recover_swapped(self.out, rank=checkpoint_step)
        if self.dist.world_size > 1:
            dist.barrier()

    def _records_until(self, step: int) -> list[dict[str, Any]]:
        """metrics.jsonl's records up to `step` (a resumed run redoes the steps after it and logs them again)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                kept.append(rec)
        return kept

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Ctrl-C and SIGTERM (a scheduler's stop) ask the loop to save and stop at the next step boundary, so the
        checkpoint is never of a half-done step; a second signal stops at once. Main thread only (Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted is not None:
                raise KeyboardInterrupt
            self._interrupted = signum
            if self.dist.main:
                print(f"\n[danlu] {self.stage}: {signal.Signals(signum).name} received: saving at the end of this "
                      "step, then stopping (again to stop at once)", flush=True)  # fmt: skip

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    def _boundary(self) -> None:
        """At a step boundary: saves when due (every `save_every` steps, every `save_minutes`), and on a stop signal
        saves and raises KeyboardInterrupt. Under torchrun every rank takes the same decision."""
        cfg = self.cfg
        due = bool(cfg.save_every and self.step % cfg.save_every == 0) or bool(
            cfg.save_minutes and time.monotonic() - self._last_save >= cfg.save_minutes * 60
        )
        stop = self._interrupted is not None
        if self.dist.world_size > 1:
            flags = torch.tensor([float(due), float(stop)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            due, stop = bool(flags[0]), bool(flags[1])
        if stop:
            if self.step > 0:
                self.save()
            if self.dist.main:
                print(f"[danlu] {self.stage}: stopped at step {self.step}; checkpoint saved in {self.out} (a rerun "
                      "continues from it)", flush=True)  # fmt: skip
            raise KeyboardInterrupt
        if due and self.step < cfg.steps:
            self.save()

    # -- metrics --
    def log(self, record: dict[str, Any]) -> None:
        record = {"stage": self.stage, "step": self.step, "time": round(time.time(), 3), **record}
        self.history.append(record)
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, self.step)

    def last_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rec in self.history:
            out.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str)) and k != "time"})
        return out

    # -- the loop --
    def evaluate(self) -> dict[str, float]:
        if not self.hooks.evaluate:
            return {}
        self.raw_model.eval()
        with torch.no_grad(), self.autocast():
            result = self.hooks.evaluate(self.raw_model)
        self.raw_model.train()
        return {
            k: all_reduce_mean(v, self.dist, self.device) if k.startswith("val_") else v
            for k, v in result.items()
        }

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.raw_model.train()
        stop_requested = False
        if self.step == 0 and self.dist.main:  # a fresh start: no lines left over from an abandoned run
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.step == 0 and self.hooks.evaluate and cfg.eval_every:
            self.log({"event": "eval", **self.evaluate()})
        bar = None
        if self.dist.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, dynamic_ncols=True, unit="step")
        nonfinite = 0
        t_last, tokens_since, steps_since = time.time(), 0, 0
        previous_handlers = self._install_signal_handlers()
        try:
            while self.step < cfg.steps and not stop_requested:
                factor = lr_factor(self.step, cfg)
                for opt in self.optimizers:
                    for group in opt.param_groups:
                        group.setdefault("base_lr", group["lr"])
                        group["lr"] = group["base_lr"] * factor
                t_step = time.time()
                # The whole step's micro-batches first: each one's mean loss is weighted by its share of the
                # global batch's units (target tokens, or one per micro-batch), so the step's gradient is the
                # global batch's mean whatever the accumulation and world size (DDP/FSDP average over ranks).
                batches = [
                    {k: v.to(self.device, non_blocking=True) for k, v in self.data.next_batch().items()}
                    for _ in range(cfg.grad_accum)
                ]
                units = [float(self.loss_units(b)) for b in batches]
                total = self._global_sum([sum(units)])[0]
                loss_sum, stats_sum, tokens = 0.0, {}, 0
                for micro, batch in enumerate(batches):
                    sync = micro == cfg.grad_accum - 1 or not hasattr(self.model, "no_sync")
                    ctx = self.model.no_sync() if not sync else _null()
                    scale = units[micro] * self.dist.world_size / total if total > 0 else 0.0
                    try:
                        loss, stats = self._forward_backward(batch, ctx, scale)
                    except Exception as e:
                        if not self._fall_back_to_eager(e):
                            raise
                        loss, stats = self._forward_backward(batch, _null(), scale)
                    loss_sum += loss.detach().float().item() * units[micro]
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                    tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
                del batches
                # The loss and the stage's stats summed over the ranks in one all-reduce (per step, which the loss
                # needs anyway): logged stats are then the mean over every rank's rows, not rank 0's alone. A loss
                # function returns the same stat names on every rank (they follow its settings, not its rows).
                sums = self._global_sum([loss_sum, *stats_sum.values()])
                loss_value = sums[0] / total if total > 0 else 0.0
                shares = cfg.grad_accum * self.dist.world_size  # micro-batches summed into each stat
                stats_mean = {k: v / shares for k, v in zip(stats_sum, sums[1:])}
                nonfinite += 1
                if not math.isfinite(loss_value):
                    self._skip_step(nonfinite, f"loss is {loss_value}")
                    continue
                params = [p for p in self.raw_model.parameters() if p.requires_grad]
                grad_norm = clip_gradients(params, cfg.grad_clip)
                bad_grad = float(not math.isfinite(grad_norm))
                if self.dist.world_size > 1:  # every rank takes the same decision
                    bad_grad = self._global_sum([bad_grad])[0]
                if bad_grad:
                    self._skip_step(nonfinite, f"gradient norm is {grad_norm} (loss {loss_value:.4g})")
                    continue
                nonfinite = 0
                grad_norm = optimizer_step(self.optimizers, params, cfg.grad_clip, grad_norm)
                self._train_seconds += time.time() - t_step
                self._train_tokens += tokens * self.dist.world_size
                self.step += 1
                tokens_since += tokens * self.dist.world_size
                steps_since += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = max(time.time() - t_last, 1e-9)
                    tps = tokens_since / dt
                    record = {
                        "loss": round(loss_value, 5),
                        "lr": self.optimizers[-1].param_groups[0]["lr"],
                        "grad_norm": round(grad_norm, 4),
                        "tokens_per_s": round(tps, 1),
                        "mfu": round(tps * self.flops_per_token / self.peak, 5)
                        if self.flops_per_token
                        else None,
                        **{k: round(v, 5) for k, v in stats_mean.items()},
                    }
                    self.log({"event": "train", **record})
                    if bar:
                        post = {
                            "loss": f"{loss_value:.4f}",
                            "lr": f"{record['lr']:.2e}",
                            "tok/s": f"{tps:,.0f}",
                        }
                        if record["mfu"] is not None:
                            post["mfu"] = f"{100 * record['mfu']:.1f}%"
                        bar.set_postfix(post, refresh=False)
                    t_last, tokens_since, steps_since = time.time(), 0, 0
                if bar:
                    bar.update(1)
                if (
                    cfg.eval_every
                    and self.hooks.evaluate
                    and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                ):
                    stop_requested = self._eval_and_check(loss_value)
                if (
                    cfg.sample_every
                    and self.hooks.sample
                    and self.dist.main
                    and self.step % cfg.sample_every == 0
                ):
                    self.raw_model.eval()
                    samples = self.hooks.sample(self.raw_model)
                    self.raw_model.train()
                    self.log({"event": "samples", "samples": samples})
                self._boundary()
        finally:
            for sig, previous in previous_handlers.items():
                signal.signal(sig, previous)
            if bar:
                bar.close()
        self._log_stage_speed()
        self.save(final=True)
        return self.last_metrics()

    def _log_stage_speed(self) -> None:
        """Logs the stage's own tokens/s and MFU: all tokens over the time spent in steps (data, forward, backward,
        optimizer; not evaluation or saving), so the final figures in danlu.json are the stage's, not those of the
        last logging interval (one quiet moment on a loaded machine is not the run). The totals travel in the
        trainer state, so after a kill and `--resume` they cover every step of the stage, the ones before the
        checkpoint included (steps a kill lost after it count once, as redone); MFU takes this launch's peak."""
        if not self._train_seconds:
            return
        tps = self._train_tokens / self._train_seconds
        mfu = round(tps * self.flops_per_token / self.peak, 5) if self.flops_per_token else None
        self.log({"event": "speed", "tokens_per_s": round(tps, 1), "mfu": mfu,
                  "train_seconds": round(self._train_seconds, 3), "train_tokens": self._train_tokens})  # fmt: skip

    def _eval_and_check(self, train_loss: float) -> bool:
        result = self.evaluate()
        self.log({"event": "eval", **result})
        val = result.get("val_loss")
        if val is None:
            return False
        if val - train_loss > self.cfg.overfit_warning_gap and self.dist.main:
            print(
                f"\n[danlu] {self.stage}: warning: validation loss {val:.3f} is {val - train_loss:.2f} above the training "
                f"loss {train_loss:.3f} at step {self.step} — the model is overfitting; consider fewer steps, more data "
                "or early_stopping_patience"
            )
        if val < self.best_val - 1e-4:
            self.best_val, self.bad_evals = val, 0
        else:
            self.bad_evals += 1
        if self.cfg.early_stopping_patience and self.bad_evals >= self.cfg.early_stopping_patience:
            if self.dist.main:
                print(
                    f"\n[danlu] {self.stage}: early stopping at step {self.step}: val loss has not improved for {self.bad_evals} evaluations"
                )
            self.log({"event": "early_stop", "best_val_loss": self.best_val})
            return True
        return False


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (model config, optimizer and state.json, written last), or None."""
    state = folder / "trainer_state" / "state.json"
    model_file = (folder / "config.json").is_file() or (
        folder / "adapter_config.json"
    ).is_file()  # or an adapter
    if not (model_file and (folder / "trainer_state" / "optimizer.pt").is_file()):
        return None
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


MASTER_WEIGHTS = "master.safetensors"  # fp32 weights for exact resume when the model folder holds bf16/fp16


def _saved_dtype(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")


def _is_tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def shard_blocks(model: nn.Module, frozen: bool = False) -> nn.Module:
    """FSDP2 over the process group: one unit per block (a block's gather overlaps the previous block's work), then
    the rest of the model. Also how a `frozen` teacher is sharded: each rank keeps 1/N of its weights and gathers one
    block at a time in the forward; its root (embeddings, head) is freed after the forward too, which FSDP skips for
    a trained model's root because the backward would gather it again at once."""
    from torch.distributed.fsdp import fully_shard

    for layer in _blocks(model):
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True if frozen else None)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder, whatever its attribute path (`model.layers` in Llama-family and danlu's
    own models, `transformer.h` in GPT-2, a PEFT wrapper's `base_model.model.…`): the first ModuleList whose
    entries are all of one class. None found: FSDP then shards the model as one unit."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            return list(module)
    return []


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def resume_wanted(out: Path, mode: str | bool, train_cfg: TrainConfig, stage: str) -> bool:
    """`resume: auto` continues an unfinished run of the same stage with the same settings; true insists on it."""
    state_path = out / "trainer_state" / "state.json"
    if mode is True or mode == "true":
        return True
    if mode in (False, "false", "off") or not state_path.exists():
        return False
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        return False
    same = _same_settings(state.get("config") or {}, train_cfg) and state.get("stage") == stage
    return same and not state.get("finished")


def _same_settings(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a checkpoint's engine settings are this run's. A setting the checkpoint predates counts as its
    default (a newer danlu still continues an older run), and under one `global_batch_size` the per-process batch
    may differ: another world size, which the data source reshards or refuses with its reason."""
    now = dataclasses.asdict(cfg)
    saved = {**{k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in saved}, **saved}
    if now["global_batch_size"] and saved.get("global_batch_size") == now["global_batch_size"]:
        saved["batch_size"] = now["batch_size"]
    return saved == now
