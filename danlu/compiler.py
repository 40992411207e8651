"""Where `torch.compile` can work, and which errors are its own: the one policy the training engine and the
compiled decode step share, so that a missing toolchain costs speed and never a run or an answer."""

from __future__ import annotations

import shutil

import torch

from danlu import DanluError


def resolve_compile(mode: str, device: torch.device | str, pays: bool = True) -> bool:
    """A `compile` setting (auto, on or off) as a decision: `auto` compiles where a compiler can work
    (`compiler_available`) and the caller says the compilation `pays` for itself (a run long enough to earn its
    10–30 s back); on and off decide alone."""
    if mode not in ("auto", "on", "off"):
        raise DanluError(f"compile must be auto, on or off, not {mode!r}")
    return mode == "on" or (mode == "auto" and pays and compiler_available(torch.device(device)))


def compiler_available(device: torch.device) -> bool:
    """On a GPU, or on a CPU with a C++ compiler on PATH (inductor writes C++ for CPU kernels)."""
    return device.type == "cuda" or (device.type == "cpu" and shutil.which("c++") is not None)


def is_compiler_error(error: BaseException) -> bool:
    """An error raised by dynamo or inductor (a failed C++ build, an unsupported op), not by the model's own code."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


# generations of one call (a held-out set, a probe of RL prompts) that earn a compile of the batch graph
DECODE_ROWS_THAT_PAY = 100


def compile_decoding(mode: str, model: torch.nn.Module, rows: int) -> bool:
    """Whether one call's batched decoding of `rows` generations (danlu.generate.Generator) runs compiled: on and
    off decide alone; auto where a compiler works, for DECODE_ROWS_THAT_PAY rows or more, and not for parameters
    sharded by FSDP (the batch graph reads whole weights). The batch graph compiles once per process (10–20 s cold
    on 2 cores, seconds from inductor's on-disk cache): the default run's evaluation of 4 checkpoints × 12 held-out
    sets took 22 s compiled against 59 s eagerly, with the same 44 figures (BENCHMARKS.md, twelfth session)."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    sharded = type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor"
    return resolve_compile(mode, param.device, pays=rows >= DECODE_ROWS_THAT_PAY and not sharded)
