"""Magpie (Xu et al. 2024): an aligned chat model, given only its template's text up to a user turn's content,
writes a user turn itself; then it answers that turn. No seed tasks, no prompt engineering.

The prefix is the chat template rendered around a sentinel user message and cut at the sentinel, so whatever the
template puts first (a default system prompt, a bos token, a date line) is there as the model saw it in training.
A local teacher continues it token by token; an endpoint gets it as a raw /v1/completions prompt, its template
taken from `--template FOLDER` (the tokenizer the server uses), or ChatML when none is given. The user turns go
through the instruction filters, ROUGE-L included, so a model that keeps asking the same question yields one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from danlu.synth.filters import Filters, passed_before
from danlu.synth.loop import (
    Candidate,
    check_not_all_empty,
    close_round,
)
from danlu.synth.rouge import RougeIndex
from danlu.synth.store import SynthStore
from danlu.synth.teacher import CHATML_USER_PREFIX, Sampling, Teacher, template_prefix


@dataclass
class MagpieConfig:
    n: int
    jobs_per_round: int = 8
    system: str | None = None
    user_sampling: Sampling | None = None
    answer_sampling: Sampling | None = None


def resolve_prefix(teacher: Teacher, template: str | None, system: str | None) -> str:
    """The teacher's own template (local), the one in `template` (a tokenizer folder), or ChatML's."""
    if template:
        from danlu.tokenizer import Tokenizer

        return template_prefix(Tokenizer.load(template), system)
    own = teacher.chat_template_prefix(system)
    if own is not None:
        return own
    if system:
        return f"<|im_start|>system\n{system}<|im_end|>\n" + CHATML_USER_PREFIX
    return CHATML_USER_PREFIX


def run_magpie(
    teacher: Teacher,
    prefix: str,
    store: SynthStore,
    filters: Filters,
    cfg: MagpieConfig,
    progress: bool = True,
) -> None:
    index = RougeIndex(row["messages"][-2]["content"] for row in store.rows())
    for entry in store.journal:
        for r in entry["rejected"]:
            if r["meta"].get("instruction"):
                index.add(r["meta"]["instruction"])
    usamp = cfg.user_sampling or Sampling(max_tokens=128, temperature=1.0, top_p=1.0)
    asamp = cfg.answer_sampling or Sampling(max_tokens=512, temperature=0.7)
    job = max(store.done, default=-1) + 1
    first, idle = True, 0
    while store.kept < cfg.n:
        jobs = list(range(job, job + cfg.jobs_per_round))
        seeded = Sampling(**{**usamp.__dict__, "seed": None if usamp.seed is None else usamp.seed + job})
        replies = teacher.complete([prefix] * len(jobs), seeded)
        check_not_all_empty(replies, teacher, first)
        cands = []
        for j, r in zip(jobs, replies):
            text = r.text.strip()
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
                {"role": "user", "content": text}
            ]
            c = Candidate(j, "magpie", prefix, msgs)
            c.failed = filters.instruction(text, r.finish_reason, index)
            c.passed = passed_before(c.failed)
            if c.failed is None:
                index.add(text)
            cands.append(c)
        answered = Sampling(**{**asamp.__dict__, "seed": None if asamp.seed is None else asamp.seed + job})
        idle = close_round(teacher, store, jobs, cands, filters, answered, cfg.n, first_round=first, idle=idle,
                           requests=len(jobs))  # fmt: skip
        job += cfg.jobs_per_round
        first = False
        if progress:
            print(f"[danlu] synth magpie: {store.kept}/{cfg.n} kept after {job} requests", flush=True)
