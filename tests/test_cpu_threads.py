"""The engine's CPU thread choice: what other processes keep busy is left to them, train.threads wins."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest


def test_requested_threads_win_and_say_so() -> None:
    from danlu.cpu_threads import choose_threads

    choice = choose_threads(3, busy=5.0)
    assert choice.threads == 3 and "train.threads" in choice.message()


@pytest.mark.parametrize(
    ("cores", "processes", "busy", "threads"),
    [(2, 1, 0.0, 2), (2, 1, 0.3, 2), (2, 1, 1.2, 1), (2, 1, 3.0, 1), (16, 1, 4.6, 11), (16, 2, 0.0, 8),
     (16, 2, 4.0, 6), (2, 2, 1.0, 1), (8, 1, math.nan, 8)],
)  # fmt: skip
def test_automatic_choice_leaves_busy_cores_alone(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, busy: float, threads: int
) -> None:
    from danlu import cpu_threads

    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    choice = cpu_threads.choose_threads(0, processes, busy=busy)
    assert choice.threads == threads
    assert ("keep" in choice.reason) == (threads < cores // processes)


def test_a_spinning_process_is_seen_as_busy() -> None:
    from danlu.cpu_threads import others_busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = others_busy_cores(window=0.3)
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.7, busy  # one core's worth (more if other jobs run too)


def test_the_automatic_choice_is_made_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from danlu import cpu_threads

    monkeypatch.setattr(cpu_threads, "_CHOSEN", {})
    readings = iter([0.0, 5.0])
    monkeypatch.setattr(cpu_threads, "others_busy_cores", lambda window=0.15: next(readings))
    first, second = cpu_threads.choose_threads(0), cpu_threads.choose_threads(0)
    assert first.new and not second.new and second.threads == first.threads


def test_the_runner_lets_each_stage_choose_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from danlu import cpu_threads

    monkeypatch.setattr(cpu_threads, "_CHOSEN", {})
    readings = iter([5.0, 0.0])
    monkeypatch.setattr(cpu_threads, "others_busy_cores", lambda window=0.15: next(readings))
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    busy = cpu_threads.choose_threads(0)
    cpu_threads.forget_choice()  # what danlu.runner does before each stage
    assert busy.threads == 1 and cpu_threads.choose_threads(0).threads == 2
