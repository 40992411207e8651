"""Self-Instruct (Wang et al. 2022; Stanford Alpaca): from a few seed tasks, the teacher writes new instructions and
then answers them.

Each job shows the teacher `examples` tasks (seed tasks, plus up to two it wrote earlier, as Self-Instruct mixes
them) and asks for `per_request` new ones as a numbered list, in the language most of the examples are in. Every
new instruction goes through the filters (filters.py), ROUGE-L last, against the seeds and every instruction kept
so far; the survivors are answered in the same round. A job's examples come from a generator seeded with the run
seed and the job number, so a resumed run asks what the uninterrupted one would have asked.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from danlu import DanluError
from danlu.data.langid import detect_language
from danlu.synth.filters import Filters, passed_before
from danlu.synth.loop import (
    Candidate,
    check_not_all_empty,
    close_round,
)
from danlu.synth.rouge import RougeIndex
from danlu.synth.store import SynthStore
from danlu.synth.teacher import Sampling, Teacher

_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.、)．:：]|[-*•])\s*(.+?)\s*$")

PROMPT_EN = ("You are asked to come up with {k} new, diverse task instructions for an AI assistant. "
             "Here are some example tasks:\n{examples}\n\nWrite {k} new tasks that differ from the examples and "
             "from each other, each answerable in text alone. Reply with a numbered list only (1. …), one task "
             "per line.")  # fmt: skip
PROMPT_ZH = ("请为 AI 助手想出 {k} 个新的、多样的任务指令。以下是一些示例任务:\n{examples}\n\n"
             "请写出 {k} 个与示例不同、彼此也不同、只用文字就能完成的新任务。只回复一个编号列表(1. …),每行一个任务。")  # fmt: skip


@dataclass
class InstructConfig:
    n: int
    per_request: int = 8
    examples: int = 8
    machine_examples: int = 2
    jobs_per_round: int = 4
    seed: int = 0
    system: str | None = None
    instruction_sampling: Sampling | None = None
    answer_sampling: Sampling | None = None


def build_prompt(seeds: list[str], generated: list[str], job: int, cfg: InstructConfig) -> str:
    rng = random.Random(f"{cfg.seed}:{job}")
    from_machine = rng.sample(generated, min(cfg.machine_examples, len(generated)))
    from_seeds = rng.sample(seeds, min(cfg.examples - len(from_machine), len(seeds)))
    chosen = from_seeds + from_machine
    rng.shuffle(chosen)
    zh = sum(detect_language(t)[0] == "zh" for t in chosen)
    template = PROMPT_ZH if zh * 2 > len(chosen) else PROMPT_EN
    examples = "\n".join(f"{i}. {' '.join(t.split())}" for i, t in enumerate(chosen, 1))
    return template.format(k=cfg.per_request, examples=examples)


def parse_list(text: str, limit: int) -> list[str]:
    """The items of a numbered (or bulleted) list, at most `limit`; [] when the text is no list."""
    items = [m.group(1) for line in text.splitlines() if (m := _ITEM.match(line))]
    return [t for t in items if t][:limit]


def run_instruct(
    teacher: Teacher, seeds: list[str], store: SynthStore, filters: Filters, cfg: InstructConfig,
    progress: bool = True,
) -> None:  # fmt: skip
    if not seeds:
        raise DanluError("no seed tasks")
    index = RougeIndex(seeds)
    generated: list[str] = []
    for row in store.rows():
        generated.append(row["messages"][-2]["content"])
    for entry in store.journal:  # instructions that passed but whose answer failed stay in the index
        generated += [r["meta"]["instruction"] for r in entry["rejected"] if r["meta"].get("instruction")]
    for t in generated:
        index.add(t)
    isamp = cfg.instruction_sampling or Sampling(max_tokens=512, temperature=1.0, top_p=1.0)
    asamp = cfg.answer_sampling or Sampling(max_tokens=512, temperature=0.7)
    job = max(store.done, default=-1) + 1
    first, idle = True, 0
    while store.kept < cfg.n:
        jobs = list(range(job, job + cfg.jobs_per_round))
        prompts = [build_prompt(seeds, generated, j, cfg) for j in jobs]
        base = Sampling(**{**isamp.__dict__, "seed": None if isamp.seed is None else isamp.seed + job})
        replies = teacher.chat([[{"role": "user", "content": p}] for p in prompts], base)
        check_not_all_empty(replies, teacher, first)
        cands: list[Candidate] = []
        for j, p, r in zip(jobs, prompts, replies):
            items = parse_list(r.text, cfg.per_request)
            if not items:
                why = "empty text" if not r.text.strip() else f"no numbered list in {r.text[:80]!r}"
                cands.append(Candidate(j, "self-instruct", p, [{"role": "user", "content": r.text}],
                                       failed=("malformed", why)))  # fmt: skip
                continue
            for k, item in enumerate(items):
                # the last item of an answer cut at the token limit may be cut too
                finish = r.finish_reason if k == len(items) - 1 else "stop"
                msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
                    {"role": "user", "content": item}
                ]
                c = Candidate(j, "self-instruct", p, msgs)
                c.failed = filters.instruction(item, finish, index)
                c.passed = passed_before(c.failed)
                if c.failed is None:
                    index.add(item)
                    generated.append(item)
                cands.append(c)
        answered = Sampling(**{**asamp.__dict__, "seed": None if asamp.seed is None else asamp.seed + job})
        idle = close_round(teacher, store, jobs, cands, filters, answered, cfg.n, first_round=first, idle=idle,
                           requests=len(jobs))  # fmt: skip
        job += cfg.jobs_per_round
        first = False
        if progress:
            print(f"[danlu] synth instruct: {store.kept}/{cfg.n} kept after {job} requests "
                  f"({sum(store.rejected.values())} rejected)", flush=True)  # fmt: skip
