"""How many CPU threads a training process should use, decided once when a trainer starts.

Why not torch's default (every core): PyTorch's OpenMP kernels split each op evenly over their threads and wait
at the end for the slowest one. When another process holds a core, the thread sharing that core runs at a
fraction of its speed and every op waits for it: on a 2-core machine with other jobs running, a 2-thread training
step ran 1.7–10× slower than a 1-thread one (BENCHMARKS.md). So on a CPU the engine looks at what other processes
use right now and leaves those cores alone; `train.threads=N` overrides the choice, and the choice is printed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace


@dataclass
class ThreadChoice:
    threads: int
    cores: int
    others_busy: float  # cores' worth of CPU time other processes used during the probe (nan: unknown)
    reason: str
    new: bool = True  # False when an earlier trainer of this process made (and said) the same choice

    def message(self) -> str:
        return f"[danlu] CPU threads: {self.threads} of {self.cores} cores ({self.reason}; train.threads=N to choose)"


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def others_busy_cores(window: float = 0.15) -> float:
    """Cores' worth of CPU that other processes use now: all CPUs' busy time over a short window, minus this
    process's own (it sleeps through the window, but its other threads may not). nan where /proc is missing."""
    start, own_start = _cpu_jiffies(), time.process_time()
    wall = time.monotonic()
    time.sleep(window)
    end, own_end = _cpu_jiffies(), time.process_time()
    elapsed = time.monotonic() - wall
    if start is None or end is None or end[1] <= start[1]:
        return float("nan")
    cores = os.cpu_count() or 1
    busy_share = (end[0] - start[0]) / (end[1] - start[1])  # of all host CPUs
    return max(0.0, busy_share * cores - (own_end - own_start) / elapsed)


_CHOSEN: dict[int, ThreadChoice] = {}


def choose_threads(requested: int, local_processes: int = 1, busy: float | None = None) -> ThreadChoice:
    """`requested` > 0 wins. Otherwise each of the node's `local_processes` training processes gets an equal share
    of the usable cores, less the cores other processes keep busy (rounded), and at least one.

    The automatic choice is made once per process (later trainers reuse it): a thread count that changed between
    two stages or two runs in one process would change float reduction order and so the exact losses."""
    cores = usable_cores()
    if requested > 0:
        return ThreadChoice(requested, cores, float("nan"), "train.threads")
    if busy is None and local_processes in _CHOSEN:
        return replace(_CHOSEN[local_processes], new=False)
    choice = _automatic(cores, local_processes, others_busy_cores() if busy is None else busy)
    if busy is None:
        _CHOSEN[local_processes] = choice
    return choice


def forget_choice() -> None:
    """Lets the next trainer probe the machine again: the runner calls it between stages, so a stage that starts
    on a quieter (or busier) machine than the last one chooses for itself; within a stage the choice stays fixed."""
    _CHOSEN.clear()


def _automatic(cores: int, local_processes: int, busy: float) -> ThreadChoice:
    share = max(1, cores // max(1, local_processes))
    if busy != busy:  # nan: cannot tell
        return ThreadChoice(share, cores, busy, "machine load unknown")
    free = max(1, share - int(busy / max(1, local_processes) + 0.5))
    if free < share:
        return ThreadChoice(free, cores, busy, f"other processes keep {busy:.1f} cores busy")
    return ThreadChoice(share, cores, busy, "the machine is otherwise idle" if local_processes == 1
                        else f"{local_processes} training processes share the node")  # fmt: skip
