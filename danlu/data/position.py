"""Where a data source stands in a run, across a resume: its position and the batch that position counts in.

Every source (token rows, SFT rows, preference pairs, rollouts, the detector's texts) saves its position beside
`batch_state`; on resume, `resumed_position`/`check_global_batch` decide whether that position still means the same
rows for this launch: the same global batch on another world size reshards exactly, another global batch is refused
with the reason and the setting that matches.
"""

from __future__ import annotations

from typing import Any

from danlu import DanluError


def batch_state(batch: int, world_size: int) -> dict[str, int]:
    """What a data source saves of its batch beside its position: the global batch (`batch` per process × the world
    size) and the world size, so that a resumed run reshards or refuses with the reason (`check_global_batch`)."""
    return {"global_batch": batch * world_size, "world_size": world_size}


def _processes(n: int) -> str:
    return f"{n} process{'' if n == 1 else 'es'}"


def check_global_batch(
    state: dict[str, Any], batch: int, world_size: int, what: str, *, unit: str = "rows", rank: int = 0,
    setting: str = "train.global_batch_size", per_process: bool = False,
) -> None:  # fmt: skip
    """Checks that a saved position (`batch_state` beside it) holds for this run, whose ranks read `batch` each.

    A position counts global batches (or rows of the one global order), and rank r reads the r-th slice of each; so
    under the same global batch another world size reshards exactly (each rank takes its new slice: said in one
    line), and another global batch is refused: it would continue elsewhere in the data. The fix names `setting`,
    a global count, or with `per_process` a per-process one (GRPO's prompts_per_step). A checkpoint saved before
    these keys continues on its own world size (a missing world size: trusted, as before)."""
    saved_world = int(state.get("world_size", world_size))
    if "global_batch" not in state:
        if saved_world != world_size:
            raise DanluError(f"--resume: the checkpoint was trained on {_processes(saved_world)}, this run has "
                             f"{world_size}; its {what} position counts global batches of that many ranks and it "
                             f"saved no global batch (an older danlu), so resume with {_processes(saved_world)} (or "
                             "start over with resume: false)")  # fmt: skip
        return
    saved, now = int(state["global_batch"]), batch * world_size
    if saved != now:
        if not per_process:
            fix = f"{setting}={saved}"
        elif saved % world_size == 0:
            fix = f"{setting}={saved // world_size} on {_processes(world_size)}"
        else:
            fix = f"{setting}={saved // saved_world} on {_processes(saved_world)}"
        head = (f"the checkpoint was trained on {_processes(saved_world)}, this run has {world_size}, and its"
                if saved_world != world_size else "the checkpoint's")  # fmt: skip
        raise DanluError(f"--resume: {head} {what} position counts global batches of {saved} {unit} "
                         f"({saved // saved_world} per process × {saved_world}); this run's hold {now} ({batch} × "
                         f"{world_size}), so it would read other {unit} than the run it continues; resume with "
                         f"{fix} (or start over with resume: false)")  # fmt: skip
    if saved_world != world_size and rank == 0:
        print(f"[danlu] --resume: {what} position resharded from {saved_world} to {_processes(world_size)} (the "
              f"same global batch of {saved} {unit}: {batch} per process, {saved // saved_world} before)")  # fmt: skip


def resumed_position(
    state: dict[str, Any], noun: str, count: int, world_size: int, what: str, *, batch: int, rank: int = 0,
    setting: str = "train.global_batch_size", per_process: bool = False,
) -> int:  # fmt: skip
    """The position a data source saved, after checking the resumed run has the same rows (`count` {noun}) and the
    same global batch (`check_global_batch`, with `batch` this rank's: another world size reshards)."""
    if state.get(noun) != count:
        raise DanluError(
            f"--resume: the checkpoint was trained on {state.get(noun)} {noun}, this data has {count}"
        )
    check_global_batch(state, batch, world_size, what, unit=noun, rank=rank, setting=setting,
                       per_process=per_process)  # fmt: skip
    return int(state["position"])
