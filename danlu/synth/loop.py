"""The part every generator shares: a round's candidates get the teacher's answers, are filtered, become rows, and
are committed job by job in order.

Why rounds: a round is what a teacher does at once (concurrent requests to an endpoint, one batch on a local
model), its prompts depend only on what earlier rounds kept, and committing in job order keeps the output a clean
prefix of the jobs, which is what makes a resumed run neither lose nor repeat work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from danlu import DanluError
from danlu.synth.filters import ANSWER_FILTERS, Filters, Verdict, passed_before
from danlu.synth.store import SynthStore
from danlu.synth.teacher import Reply, Sampling, Teacher


@dataclass
class Candidate:
    """One would-be row: the conversation up to its user turn, and what the filters said so far."""

    job: int
    kind: str  # self-instruct | answer | magpie
    prompt: Any  # what the teacher was asked to get the user turn (for `answer`: the user turn itself)
    messages: list[dict[str, Any]]
    passed: list[str] = field(default_factory=list)
    failed: Verdict = None
    source: str | None = None  # file:line of a prompt or seed
    answer: Reply | None = None

    def row(self, teacher: str) -> dict[str, Any]:
        messages = list(self.messages)
        if self.answer is not None and self.answer.text.strip():
            messages.append({"role": "assistant", "content": self.answer.text.strip()})
        meta: dict[str, Any] = {"teacher": teacher, "kind": self.kind, "prompt": self.prompt,
                                "filters": self.passed}  # fmt: skip
        if self.source:
            meta["source"] = self.source
        if self.failed:
            meta["failed"], meta["why"] = self.failed
            if "rouge_l" in self.passed:  # it entered the near-duplicate index: a resumed run must know it
                meta["instruction"] = next(
                    m["content"] for m in reversed(self.messages) if m["role"] == "user"
                )
        return {"messages": messages, "meta": meta}


MAX_IDLE_ROUNDS = 10  # rounds in a row that keep nothing before a run gives up


def raise_idle(store: SynthStore, rounds: int) -> None:
    """Stops a run whose teacher's output fails the filters round after round (the rows kept stay, resumable)."""
    counts = ", ".join(f"{k} {v}" for k, v in store.rejected.most_common())
    raise DanluError(f"no row kept in the last {rounds} rounds ({store.kept} kept in all; rejected: {counts}); "
                     f"see {store.log} for why, or loosen the filters")  # fmt: skip


def check_not_all_empty(replies: list[Reply], teacher: Teacher, first_round: bool) -> None:
    """A teacher that answers nothing at all is misconfigured (wrong model, a base model, a broken template):
    said at once, before anything is written, instead of a run that rejects every row."""
    if first_round and replies and all(not r.text.strip() for r in replies):
        reasons = sorted({r.finish_reason for r in replies})
        if reasons == ["too_long"]:
            raise DanluError(f"teacher {teacher.name}: all {len(replies)} prompts of the first round exceed its context; "
                             "show fewer or shorter examples, or use a teacher with a longer context")  # fmt: skip
        raise DanluError(f"teacher {teacher.name} returned empty text for all {len(replies)} requests of the first "
                         f"round (finish: {', '.join(reasons)}); is it a chat model, and is the model name "
                         "right?")  # fmt: skip


def answer_candidates(
    teacher: Teacher, cands: list[Candidate], filters: Filters, sampling: Sampling, first_round: bool
) -> None:
    """The teacher answers every candidate that passed so far (one round); the answer filters are applied."""
    todo = [c for c in cands if c.failed is None]
    if not todo:
        return
    replies = teacher.chat([c.messages for c in todo], sampling)
    check_not_all_empty(replies, teacher, first_round)
    for c, r in zip(todo, replies):
        c.answer = r
        c.failed = filters.answer(r.text, r.finish_reason)
        c.passed += passed_before(c.failed, ANSWER_FILTERS)


def commit_jobs(
    store: SynthStore, jobs: list[int], cands: list[Candidate], teacher: str, n: int, **info: Any
) -> None:
    """Commits each job of a round in order; rows past `n` kept rows are journaled as `surplus`."""
    by_job: dict[int, list[Candidate]] = {j: [] for j in jobs}
    for c in cands:
        by_job[c.job].append(c)
    for j in jobs:
        kept, rejected = [], []
        for c in by_job[j]:
            if c.failed is None and store.kept + len(kept) >= n:
                c.failed = ("surplus", f"{n} rows were already kept")
            (rejected if c.failed else kept).append(c.row(teacher))
        store.commit(j, kept, rejected, **info)


def close_round(
    teacher: Teacher, store: SynthStore, jobs: list[int], cands: list[Candidate], filters: Filters,
    sampling: Sampling, n: int, *, first_round: bool, idle: int, **info: Any,
) -> int:  # fmt: skip
    """The end of every generator's round: the teacher answers what passed, the jobs are committed in order, and a
    run that keeps nothing for MAX_IDLE_ROUNDS rounds stops. Returns the new count of idle rounds."""
    answer_candidates(teacher, cands, filters, sampling, first_round)
    before = store.kept
    commit_jobs(store, jobs, cands, teacher.name, n, **info)
    idle = 0 if store.kept > before else idle + 1
    if idle >= MAX_IDLE_ROUNDS:
        raise_idle(store, idle)
    return idle
