"""Where `torch.compile` can work, and which errors are its own: the one policy the training engine and the
compiled decode step share, so that a missing toolchain costs speed and never a run or an answer."""

from __future__ import annotations

import shutil

import torch


def compiler_available(device: torch.device) -> bool:
    """On a GPU, or on a CPU with a C++ compiler on PATH (inductor writes C++ for CPU kernels)."""
    return device.type == "cuda" or (device.type == "cpu" and shutil.which("c++") is not None)


def is_compiler_error(error: BaseException) -> bool:
    """An error raised by dynamo or inductor (a failed C++ build, an unsupported op), not by the model's own code."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))
