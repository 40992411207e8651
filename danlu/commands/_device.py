"""The `--device` option every model-loading command shares: checked when the command line is read, so a device
this torch cannot reach (a typo, `cuda` on a CPU build, `cuda:3` on a one-GPU machine) stops in one line naming it,
before any model is loaded, not in a model's first `.to()`."""

from __future__ import annotations

import argparse


def reachable_device(name: str) -> str:
    """`name` as `danlu.engine.resolve_device` resolves it (`auto` becomes this machine's device)."""
    from danlu import DanluError
    from danlu.engine import resolve_device

    try:
        return str(resolve_device(name))
    except DanluError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_argument(p: argparse.ArgumentParser, default: str = "cpu", what: str = "") -> None:
    p.add_argument("--device", default=default, type=reachable_device,
                   help=f"{what}cpu, cuda, cuda:N, mps or auto (default: {default})")  # fmt: skip
