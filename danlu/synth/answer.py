"""A teacher's answers to given prompts: sequence-level distillation data (Kim & Rush 2016; the Alpaca recipe's
second half, "ask a stronger model many questions and train on its answers").

Job i is prompt i of the file, so a resumed run skips exactly the prompts already committed. The instruction
filters do not apply (the prompts are the user's); the answer filters do.
"""

from __future__ import annotations

from typing import Any

from danlu.synth.filters import Filters
from danlu.synth.loop import Candidate, close_round
from danlu.synth.store import SynthStore
from danlu.synth.teacher import Sampling, Teacher


def run_answer(
    teacher: Teacher, prompts: list[tuple[str, list[dict[str, Any]]]], store: SynthStore, filters: Filters,
    sampling: Sampling, *, n: int | None = None, jobs_per_round: int = 8, progress: bool = True,
) -> None:  # fmt: skip
    total = len(prompts) if n is None else min(n, len(prompts))
    todo = [j for j in range(total) if j not in store.done]
    first, idle = True, 0
    for start in range(0, len(todo), jobs_per_round):
        jobs = todo[start : start + jobs_per_round]
        cands = [Candidate(j, "answer", prompts[j][1][-1]["content"], prompts[j][1], source=prompts[j][0])
                 for j in jobs]  # fmt: skip
        seeded = Sampling(
            **{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + jobs[0]}
        )
        idle = close_round(teacher, store, jobs, cands, filters, seeded, total, first_round=first, idle=idle)
        first = False
        if progress:
            print(f"[danlu] synth answer: {len(store.done)}/{total} prompts, {store.kept} kept", flush=True)
