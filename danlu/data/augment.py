"""`data.augment:` steps: more SFT dialogs from the ones the pipeline wrote — back-translation, paraphrase, and
multi-turn recombination.

Recipe schema (a list; each step reads the pipeline's own dialogs, never another step's output, so steps do not
compound each other's errors)::

    data:
      augment:
        - type: back_translation    # back_translation | paraphrase | recombine
          direction: zh-en-zh       # back_translation: zh-en-zh (Chinese dialogs via English) or en-zh-en
          teacher: http://127.0.0.1:8000   # an OpenAI-compatible API root or a chat checkpoint folder
          model: null               # model name at an endpoint (default: the first it lists)
          api_key_env: null         # environment variable with the endpoint's key
          turns: user               # user (the answer stays as written: UDA's choice) | all
          fraction: 1.0             # share of eligible dialogs augmented (seeded choice)
          max_rows: null            # at most this many new dialogs
          max_chars: 300            # turns longer than this are left as they are (a task's payload, a news text)
          min_rouge: 0.15           # a rewrite must share at least this much with its source (ROUGE-L) …
          max_rouge: 0.95           # … and differ from it at least this much
          max_turns: 4              # recombine: exchanges per new dialog (at least 2)
          seed: 0
          name: null                # output dialogs/augment_<name>.jsonl and the stats row (default: type[_dir])

Why a rewrite is checked before it is kept: a small translation model drops facts, switches language, or
answers the sentence instead of translating it. A turn's rewrite is kept only when it is non-empty and not cut
off, in the source's language (and the pivot in the pivot language), keeps every number of the source (facts and
arithmetic stay true, so the unchanged answer still fits), has a length within 0.5–2× the source's, and has a
ROUGE-L with its source in [min_rouge, max_rouge] (Chinese by characters, English by words). A turn that fails
keeps its source text; a dialog is written when at least one turn changed. Turn i of an output row is always the
rewrite of turn i of its source (`meta.source_id`), with the same role.

Recombination's compatibility rule: only a thread's *opening* exchange (its first user turn and the assistant
turn that answers it, after an optional system prompt) is moved, because an opening exchange refers to nothing
said before it; exchanges are combined only when they share language and system prompt and come from distinct
threads, with 2..max_turns exchanges per new dialog and no combination written twice. Roles therefore alternate
user/assistant by construction.

Outputs: `dialogs/augment_<name>.jsonl` (OpenAI `messages` + `id`, `lang`, `source`, `meta`), written
atomically; counts go to stats.json's `augment` and stats.md's "Augmentation" table.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from danlu import DanluError
from danlu.data.langid import detect_language
from danlu.files import write_jsonl_atomic
from danlu.synth.rouge import rouge_l, rouge_tokens
from danlu.synth.teacher import Sampling, Teacher

# the phrasings danlu's own chat models learned from the world corpus (danlu/world/dialogs.py TRANSLATE)
TRANSLATE_PROMPTS = {"en": "Translate into English: {x}", "zh": "把这句话翻译成中文：{x}"}
PARAPHRASE_PROMPTS = {
    "en": "Rewrite this sentence in other words, keeping its meaning: {x}",
    "zh": "请换一种说法改写下面这句话，意思不变：{x}",
}
DIRECTIONS = {"zh-en-zh": ("zh", "en"), "en-zh-en": ("en", "zh")}
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass
class AugmentStep:
    type: Literal["back_translation", "paraphrase", "recombine"]
    name: str | None = None
    teacher: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    direction: Literal["zh-en-zh", "en-zh-en"] = "zh-en-zh"
    turns: Literal["user", "all"] = "user"
    fraction: float = 1.0
    max_rows: int | None = None
    max_chars: int = 300
    min_rouge: float = 0.15
    max_rouge: float = 0.95
    max_turns: int = 4
    seed: int = 0
    batch_size: int = 16
    max_tokens: int = 128
    temperature: float = 0.0
    concurrency: int = 4
    timeout: float = 120.0
    retries: int = 4
    device: str = "cpu"
    prompts: dict[str, str] = field(default_factory=dict)  # target language → template with {x}

    def label(self) -> str:
        if self.name:
            return self.name
        return (
            f"back_translation_{self.direction.replace('-', '_')}"
            if self.type == "back_translation"
            else self.type
        )


def validate_steps(steps: list[AugmentStep]) -> None:
    """Clear errors for a recipe's augment list before any work starts."""
    seen: set[str] = set()
    for i, s in enumerate(steps):
        where = f"data.augment[{i}]"
        if s.type in ("back_translation", "paraphrase") and not s.teacher:
            raise DanluError(
                f"{where}: a {s.type} step needs `teacher:` (an API URL or a chat checkpoint folder)"
            )
        if not 0 < s.fraction <= 1:
            raise DanluError(f"{where}.fraction: must be in (0, 1], got {s.fraction}")
        if s.max_rows is not None and s.max_rows < 1:
            raise DanluError(f"{where}.max_rows: must be at least 1, got {s.max_rows}")
        if s.type == "recombine" and s.max_turns < 2:
            raise DanluError(f"{where}.max_turns: a recombined dialog needs at least 2 exchanges")
        if not 0 <= s.min_rouge <= s.max_rouge <= 1:
            raise DanluError(f"{where}: need 0 <= min_rouge <= max_rouge <= 1")
        for lang, tpl in s.prompts.items():
            if "{x}" not in tpl:
                raise DanluError(f"{where}.prompts.{lang}: the template must contain {{x}} (the text)")
        if s.label() in seen:
            raise DanluError(f"{where}: two steps named {s.label()!r}; give one a `name:`")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.label()):
            raise DanluError(f"{where}.name: {s.label()!r} must be letters, digits, _ . -")
        seen.add(s.label())


# ───────────────────────── dialogs in ─────────────────────────


def dialog_lang(messages: list[dict[str, Any]]) -> str:
    """The language of a dialog: that of its user turns together (the side an augmentation rewrites)."""
    text = " ".join(m["content"] for m in messages if m["role"] == "user")
    return detect_language(text)[0] if text.strip() else "unknown"


def read_dialogs(folder: Path) -> list[dict[str, Any]]:
    """The pipeline's dialogs (`<rank>.jsonl`, not earlier augment_ files), in a fixed order."""
    import json

    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        if f.name.startswith("augment_"):
            continue
        with open(f, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def _chosen(rows: list[dict[str, Any]], step: AugmentStep) -> list[dict[str, Any]]:
    rng = random.Random(f"augment:{step.label()}:{step.seed}")
    picked = [r for r in rows if rng.random() < step.fraction] if step.fraction < 1 else list(rows)
    return picked


# ───────────────────────── rewrite checks ─────────────────────────


def numbers(text: str) -> Counter[str]:
    return Counter(n.replace(",", "") for n in _NUMBER.findall(text))


def check_rewrite(source: str, new: str, finish: str, lang: str, step: AugmentStep) -> str | None:
    """Why a rewrite of `source` (language `lang`) is not kept, or None when it is (see the module doc)."""
    t = new.strip()
    if not t:
        return "empty"
    if finish in ("length", "too_long"):
        return "cut_off"
    if "<|im_" in t:
        return "template_tokens"
    if detect_language(t)[0] != lang:
        return "language"
    if numbers(t) != numbers(source):
        return "numbers"
    a, b = rouge_tokens(source), rouge_tokens(t)
    if not b or not 0.5 <= len(b) / max(1, len(a)) <= 2.0:
        return "length_ratio"
    score = rouge_l(a, b)
    if score > step.max_rouge or t == source.strip():
        return "unchanged"
    if score < step.min_rouge:
        return "unrelated"
    return None


# ───────────────────────── rewriting through a teacher ─────────────────────────


@dataclass
class StepStats:
    step: str
    type: str
    dialogs_in: int = 0  # dialogs the pipeline wrote
    eligible: int = 0  # of them, in the step's language (and chosen by `fraction`)
    dialogs_out: int = 0
    turns_tried: int = 0  # turns sent to the teacher (recombine: opening exchanges that may move)
    turns_changed: int = 0  # turns rewritten and kept (recombine: exchanges placed in new dialogs)
    requests: int = 0  # teacher requests (a back-translation: two per turn whose pivot passed)
    rejected: Counter[str] = field(default_factory=Counter)
    teacher: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("step", "type", "dialogs_in", "eligible", "dialogs_out", "turns_tried",
                                           "turns_changed", "requests", "teacher")}  # fmt: skip
        d["rejected"] = dict(self.rejected.most_common())
        return d


def _ask(
    teacher: Teacher, texts: list[str], template: str, step: AugmentStep, stats: StepStats
) -> list[tuple[str, str]]:
    """The teacher's replies to `template` filled with each text, in order, as (text, finish_reason)."""
    out: list[tuple[str, str]] = []
    sampling = Sampling(max_tokens=step.max_tokens, temperature=step.temperature, seed=step.seed)
    for b in range(0, len(texts), step.batch_size):
        chunk = texts[b : b + step.batch_size]
        replies = teacher.chat([[{"role": "user", "content": template.format(x=t)}] for t in chunk], sampling)
        if len(replies) != len(chunk):
            raise DanluError(f"teacher {teacher.name} answered {len(replies)} of {len(chunk)} requests")
        stats.requests += len(chunk)
        out += [(r.text.strip(), r.finish_reason) for r in replies]
    return out


def _targets(rows: list[dict[str, Any]], step: AugmentStep) -> list[tuple[int, int, str]]:
    """(row, turn, text) of every turn a rewrite step rewrites."""
    roles = ("user",) if step.turns == "user" else ("user", "assistant")
    return [
        (i, j, m["content"])
        for i, r in enumerate(rows)
        for j, m in enumerate(r["messages"])
        if m["role"] in roles and m["content"].strip() and len(m["content"]) <= step.max_chars
    ]


def rewrite_dialogs(
    rows: list[dict[str, Any]], step: AugmentStep, teacher: Teacher, stats: StepStats
) -> list[dict[str, Any]]:
    """Back-translates or paraphrases the chosen turns of `rows` (all in one language); aligned new rows."""
    if step.type == "back_translation":
        src, pivot = DIRECTIONS[step.direction]
    else:
        src = pivot = rows[0]["_lang"] if rows else "en"
    targets = _targets(rows, step)
    stats.turns_tried += len(targets)
    texts = [t for _, _, t in targets]
    if step.type == "back_translation":
        there_tpl = step.prompts.get(pivot) or TRANSLATE_PROMPTS[pivot]
        back_tpl = step.prompts.get(src) or TRANSLATE_PROMPTS[src]
        there = _ask(teacher, texts, there_tpl, step, stats)
        ok_there = [k for k, (t, fin) in enumerate(there) if check_pivot(texts[k], t, fin, pivot) is None]
        for k, (t, fin) in enumerate(there):
            why = check_pivot(texts[k], t, fin, pivot)
            if why:
                stats.rejected[f"pivot_{why}"] += 1
        back = _ask(teacher, [there[k][0] for k in ok_there], back_tpl, step, stats)
        results: dict[int, tuple[str, str, str | None]] = {
            k: (back[n][0], back[n][1], there[k][0]) for n, k in enumerate(ok_there)
        }
    else:
        tpl = step.prompts.get(src) or PARAPHRASE_PROMPTS.get(src, PARAPHRASE_PROMPTS["en"])
        results = {k: (t, fin, None) for k, (t, fin) in enumerate(_ask(teacher, texts, tpl, step, stats))}
    new_msgs: dict[int, list[dict[str, Any]]] = {}
    pivots: dict[int, dict[int, str]] = {}
    for k, (i, j, text) in enumerate(targets):
        if k not in results:
            continue
        new, fin, piv = results[k]
        why = check_rewrite(text, new, fin, src, step)
        if why:
            stats.rejected[why] += 1
            continue
        msgs = new_msgs.setdefault(i, [dict(m) for m in rows[i]["messages"]])
        msgs[j]["content"] = new
        stats.turns_changed += 1
        if piv is not None:
            pivots.setdefault(i, {})[j] = piv
    out = []
    for i in sorted(new_msgs):
        r = rows[i]
        meta: dict[str, Any] = {"augment": step.type, "step": step.label(), "teacher": teacher.name,
                                "source_id": r.get("id"),
                                "changed_turns": sorted(j for j, m in enumerate(new_msgs[i])
                                                        if m["content"] != r["messages"][j]["content"])}  # fmt: skip
        if step.type == "back_translation":
            meta["direction"] = step.direction
            meta["pivot"] = {str(j): t for j, t in sorted(pivots.get(i, {}).items())}
        out.append({"messages": new_msgs[i], "id": f"{r.get('id')}#{step.label()}", "lang": src,
                    "source": f"augment:{step.label()}", "meta": meta})  # fmt: skip
    return out


def check_pivot(source: str, pivot_text: str, finish: str, pivot: str) -> str | None:
    """The first leg of a back-translation: non-empty, complete, in the pivot language, numbers kept."""
    t = pivot_text.strip()
    if not t:
        return "empty"
    if finish in ("length", "too_long"):
        return "cut_off"
    if detect_language(t)[0] != pivot:
        return "language"
    if numbers(t) != numbers(source):
        return "numbers"
    return None


# ───────────────────────── recombination ─────────────────────────


def opening_exchange(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(system prompt or None, [user, assistant]) of a thread's first exchange, or None when it has none."""
    k = 0
    system = None
    if messages and messages[0]["role"] == "system":
        system, k = messages[0]["content"], 1
    if len(messages) < k + 2 or messages[k]["role"] != "user" or messages[k + 1]["role"] != "assistant":
        return None
    if not messages[k]["content"].strip() or not messages[k + 1]["content"].strip():
        return None
    return system, [dict(messages[k]), dict(messages[k + 1])]


def recombine(rows: list[dict[str, Any]], step: AugmentStep, stats: StepStats) -> list[dict[str, Any]]:
    """New multi-turn dialogs from compatible opening exchanges of distinct threads (rule: module doc)."""
    groups: dict[tuple[str, str | None], list[tuple[int, list[dict[str, Any]]]]] = {}
    for i, r in enumerate(rows):
        ex = opening_exchange(r["messages"])
        if ex is None:
            stats.rejected["no_opening_exchange"] += 1
            continue
        groups.setdefault((r["_lang"], ex[0]), []).append((i, ex[1]))
    stats.turns_tried = sum(len(g) for g in groups.values())  # the opening exchanges that may move
    rng = random.Random(f"recombine:{step.seed}")
    target = step.max_rows if step.max_rows is not None else sum(len(g) for g in groups.values()) // 2
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    keys = sorted((k for k, g in groups.items() if len(g) >= 2), key=lambda k: (k[0], k[1] or ""))
    for g in groups.values():
        if len(g) < 2:
            stats.rejected["no_compatible_partner"] += len(g)
    if not keys:
        return out
    weights = [len(groups[k]) for k in keys]
    tries = 0
    while len(out) < target and tries < 20 * max(1, target):
        tries += 1
        (lang, system) = rng.choices(keys, weights)[0]
        g = groups[(lang, system)]
        n = rng.randint(2, min(step.max_turns, len(g)))
        picked = rng.sample(range(len(g)), n)
        combo = tuple(g[p][0] for p in picked)
        if tuple(sorted(combo)) in seen:
            continue
        seen.add(tuple(sorted(combo)))
        msgs = [{"role": "system", "content": system}] if system is not None else []
        for p in picked:
            msgs += [dict(m) for m in g[p][1]]
        ids = [rows[i].get("id") for i in combo]
        out.append({"messages": msgs, "id": f"recombine:{step.seed}:{len(out)}", "lang": lang,
                    "source": f"augment:{step.label()}",
                    "meta": {"augment": "recombine", "step": step.label(), "source_ids": ids}})  # fmt: skip
        stats.turns_changed += n
    if len(out) < target:
        stats.rejected["no_new_combination"] += target - len(out)
    return out


# ───────────────────────── the steps ─────────────────────────


def _open_teacher(step: AugmentStep) -> Teacher:
    from danlu.synth.teacher import open_teacher

    return open_teacher(
        str(step.teacher), model=step.model, api_key_env=step.api_key_env, concurrency=step.concurrency,
        timeout=step.timeout, retries=step.retries, batch_size=step.batch_size, device=step.device,
    )  # fmt: skip


def run_step(
    rows: list[dict[str, Any]],
    step: AugmentStep,
    teacher_factory: Callable[[AugmentStep], Teacher] = _open_teacher,
) -> tuple[list[dict[str, Any]], StepStats]:
    """One augment step over the pipeline's dialogs: (new rows, what it did)."""
    stats = StepStats(step=step.label(), type=step.type, dialogs_in=len(rows))
    for r in rows:
        r.setdefault("_lang", r.get("lang") or dialog_lang(r["messages"]))
    chosen = _chosen(rows, step)
    if step.type == "recombine":
        stats.eligible = len(chosen)
        new = recombine(chosen, step, stats)
    else:
        if step.type == "back_translation":
            src = DIRECTIONS[step.direction][0]
            chosen = [r for r in chosen if r["_lang"] == src]
        else:
            chosen = [r for r in chosen if r["_lang"] in ("zh", "en")]
        stats.eligible = len(chosen)
        new = []
        if chosen:
            teacher = teacher_factory(step)
            stats.teacher = teacher.name
            if step.type == "paraphrase":  # one language per call, so the checks know what to expect
                for lang in ("zh", "en"):
                    part = [r for r in chosen if r["_lang"] == lang]
                    if part:
                        new += rewrite_dialogs(part, step, teacher, stats)
            else:
                new = rewrite_dialogs(chosen, step, teacher, stats)
    if step.max_rows is not None:
        new = new[: step.max_rows]
    stats.dialogs_out = len(new)
    return new, stats


def run_augment(
    steps: list[AugmentStep], dialogs_dir: Path,
    teacher_factory: Callable[[AugmentStep], Teacher] = _open_teacher, progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Runs every step over `dialogs_dir`'s pipeline dialogs, writing `augment_<name>.jsonl` beside them."""
    validate_steps(steps)
    rows = read_dialogs(dialogs_dir)
    for f in dialogs_dir.glob("augment_*.jsonl"):  # a step removed from the recipe leaves nothing stale
        if f.stem[len("augment_") :] not in {s.label() for s in steps}:
            f.unlink()
    report = []
    for step in steps:
        new, stats = run_step([{k: v for k, v in r.items()} for r in rows], step, teacher_factory)
        for r in new:
            r.pop("_lang", None)
        write_jsonl_atomic(dialogs_dir / f"augment_{step.label()}.jsonl", new)
        report.append(stats.as_dict())
        if progress:
            print(f"[danlu] data augment {step.label()}: {stats.dialogs_out:,} new dialogs from "
                  f"{stats.eligible:,} eligible", flush=True)  # fmt: skip
    return report
