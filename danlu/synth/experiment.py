"""Does teacher-made data help a student? The experiment behind `danlu run synth` and benchmarks/synth_experiment.py.

A teacher (a chat checkpoint served by `danlu serve` on a free loopback port, or any OpenAI-compatible URL) writes
Self-Instruct rows from seed tasks (user turns of the hand-written set) and, optionally, its answers to other
prompts of the world corpus (sequence-level distillation). Students start from the same base checkpoint and are
fine-tuned with the same steps, seed and settings on: the hand-written dialogs only, and the hand-written dialogs
plus each synthetic set. All are scored on the same held-out chat rows, and each difference to the hand-only
student is paired item by item, with its 95% interval.

Why a held-out *split*: the settings of this experiment (row counts, steps) may be chosen on the `dev` rows; the
numbers to publish are then read on `test` rows never looked at before. World eval rows carry a `split` field;
rows without one are divided by a hash of their prompt (even: dev, odd: test), said in the results.

Resumable: the synthetic sets are `danlu synth` outputs (their journal resumes them, and no teacher is started when
they are complete), a student whose marker says it was trained on the same files with the same settings is not
trained again, and scores are kept per weights and rows.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import read_records, write_json_atomic, write_jsonl_atomic, write_text_atomic
from danlu.sft_process import sft_in_child
from danlu.synth.students import cached_score, eval_rows, first_user

# Held-out chat sets scored by greedy generation (danlu/eval/world.py defines them and their generation length).
EVAL_SETS = ("facts_chat", "arithmetic_chat", "translation", "summary")
SPLITS = ("dev", "test", "all")


@dataclass
class SynthExperimentConfig:
    teacher: str | None = None  # chat checkpoint or http(s) URL; default: the run's `sft` model
    student: str | None = None  # base checkpoint of every student; default: the run's `pretrain` model
    hand: int = 1000  # hand-written dialogs (a seeded sample of world/sft.jsonl)
    seeds: int = 32  # seed tasks: single-line user turns of the hand-written set
    n: int = 200  # Self-Instruct rows to keep (0: none)
    answers: int = 0  # the teacher's answers to this many other world prompts (0: none)
    gold: bool = (
        False  # also a student on the same prompts with the world's own answers (distillation's ceiling)
    )
    per_request: int = 4  # new instructions asked per Self-Instruct request
    examples: int = 4  # example tasks shown per request
    instruction_tokens: int = 96
    instruction_temperature: float = 1.0  # Self-Instruct samples its instructions at 1.0
    max_tokens: int = 96  # token limit of the teacher's answers
    temperature: float = 0.7
    min_words: int = 3
    lang: list[str] | None = None  # languages kept (zh, en); None: any
    concurrency: int = 4
    timeout: float = 120.0
    api_key_env: str | None = None
    model: str | None = None  # model name at an endpoint (default: the first it lists)
    synth_timeout: float = 1800.0  # seconds for each `danlu serve` start and each generation
    steps: int = 150  # SFT steps of every student
    sft: dict[str, Any] = field(
        default_factory=dict
    )  # overrides of the students' sft section (lr, batch_size, …)
    eval_sets: list[str] = field(default_factory=lambda: list(EVAL_SETS))
    split: str = "dev"  # held-out rows scored: dev, test or all
    eval_limit: int = 0  # rows per set after the split (0: all)
    seed: int | None = None  # default: the recipe's seed


# ───────────────────────── data ─────────────────────────


def _usable(row: dict[str, Any]) -> bool:
    """A dialog without tool calls (a served teacher runs without tools, and its text would stand in for them)."""
    msgs = row.get("messages") or []
    return bool(msgs) and not any(m.get("role") == "tool" or m.get("tool_calls") for m in msgs)


def _first_exchange(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages up to and including the first assistant turn (a system prompt kept)."""
    msgs = row["messages"]
    k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs) - 1)
    return [{"role": m["role"], "content": m["content"]} for m in msgs[: k + 1]]


def prepare_data(world: Path, out: Path, cfg: SynthExperimentConfig, seed: int) -> dict[str, Any]:
    """hand.jsonl, seeds.txt, and (with `answers`) prompts.jsonl / gold.jsonl from disjoint parts of world/sft."""
    path = world / "sft.jsonl"
    if not path.is_file():
        raise DanluError(f"synth: {path} is missing; the experiment samples its hand-written dialogs from it")
    rows = [r for r in read_records(path) if isinstance(r, dict) and _usable(r)]
    if len(rows) < cfg.hand + cfg.answers:
        raise DanluError(f"synth: {path} has {len(rows)} dialogs without tool calls; hand ({cfg.hand}) + answers "
                         f"({cfg.answers}) need more")  # fmt: skip
    rng = random.Random(seed)
    rng.shuffle(rows)
    hand, rest = rows[: cfg.hand], rows[cfg.hand :]
    hand_msgs = [{"messages": r["messages"]} for r in hand]
    write_jsonl_atomic(out / "hand.jsonl", hand_msgs)
    short = sorted({t for t in map(first_user, hand) if t and len(t) <= 80 and "\n" not in t})
    seeds = rng.sample(short, min(cfg.seeds, len(short)))
    if cfg.n and not seeds:
        raise DanluError("synth: no single-line user turns in the hand-written set to use as seed tasks")
    write_text_atomic(out / "seeds.txt", "".join(s + "\n" for s in seeds))
    files: dict[str, Any] = {"hand": out / "hand.jsonl", "seeds": out / "seeds.txt", "n_seeds": len(seeds)}
    if cfg.answers:
        chosen, seen = [], {first_user(r) for r in hand}
        for r in rest:  # each prompt once, none that the hand-written set already asks
            q = first_user(r)
            if q and q not in seen:
                seen.add(q)
                chosen.append(_first_exchange(r))
            if len(chosen) == cfg.answers:
                break
        write_jsonl_atomic(out / "prompts.jsonl", [{"messages": m[:-1]} for m in chosen])
        files["prompts"] = out / "prompts.jsonl"
        if cfg.gold:
            write_jsonl_atomic(out / "gold.jsonl", [{"messages": m} for m in chosen])
            files["gold"] = out / "gold.jsonl"
    return files


# ───────────────────────── the teacher ─────────────────────────


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(checkpoint: Path, log: Path, timeout: float = 300.0) -> Iterator[str]:
    """`danlu serve CHECKPOINT` on a free loopback port for the duration of the block; yields its URL."""
    if not (checkpoint / "config.json").is_file():
        raise DanluError(f"synth.teacher {checkpoint}: not a checkpoint folder (no config.json)")
    port = _free_port()
    cmd = [sys.executable, "-m", "danlu", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
           "--no-feedback", "--no-date", "--no-tools", "--log-level", "warning"]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise DanluError(f"synth: danlu serve {checkpoint} exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DanluError(
                    f"synth: danlu serve {checkpoint} did not answer /health in {timeout:.0f} s; see {log}"
                )
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def synth_jobs(files: dict[str, Any], out: Path, cfg: SynthExperimentConfig, seed: int) -> dict[str, Any]:
    """{name: (store, left to do)} of the Self-Instruct and distillation outputs, opened (and resumed) before any
    teacher is started: a rerun whose outputs are complete starts none."""
    from danlu.synth.prompts import read_prompts
    from danlu.synth.store import SynthStore

    jobs: dict[str, Any] = {}
    if cfg.n:
        seeds = [m[-1]["content"] for _, m in read_prompts(files["seeds"])]
        settings = {"kind": "instruct", "seeds": seeds, "n": cfg.n, "per_request": cfg.per_request,
                    "examples": cfg.examples, "max_tokens": cfg.max_tokens, "instruction_tokens": cfg.instruction_tokens,
                    "instruction_temperature": cfg.instruction_temperature,
                    "temperature": cfg.temperature, "min_words": cfg.min_words, "lang": cfg.lang, "seed": seed}  # fmt: skip
        store = SynthStore(out / "instruct.jsonl", settings)
        jobs["instruct"] = (store, seeds, store.kept < cfg.n)
    if cfg.answers:
        prompts = read_prompts(files["prompts"])
        settings = {"kind": "answer", "prompts": len(prompts), "max_tokens": cfg.max_tokens,
                    "temperature": cfg.temperature, "seed": seed}  # fmt: skip
        store = SynthStore(out / "answers.jsonl", settings)
        jobs["answers"] = (store, prompts, len(store.done) < len(prompts))
    return jobs


def generate(url: str, jobs: dict[str, Any], cfg: SynthExperimentConfig, seed: int) -> None:
    """Runs what is left of the Self-Instruct rows and the distillation answers through the OpenAI API."""
    from danlu.synth.answer import run_answer
    from danlu.synth.filters import Filters
    from danlu.synth.instruct import InstructConfig, run_instruct
    from danlu.synth.teacher import Sampling, open_teacher

    teacher = open_teacher(url, model=cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                           timeout=cfg.timeout)  # fmt: skip
    filters = Filters(min_words=cfg.min_words, languages=frozenset(cfg.lang) if cfg.lang else None)
    answer = Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=seed)
    if "instruct" in jobs:
        store, seeds, _ = jobs["instruct"]
        icfg = InstructConfig(
            n=cfg.n, per_request=cfg.per_request, examples=min(cfg.examples, len(seeds)),
            jobs_per_round=cfg.concurrency, seed=seed, answer_sampling=answer,
            instruction_sampling=Sampling(
                max_tokens=cfg.instruction_tokens, temperature=cfg.instruction_temperature, seed=seed
            ),
        )  # fmt: skip
        run_instruct(teacher, seeds, store, filters, icfg)
    if "answers" in jobs:
        store, prompts, _ = jobs["answers"]
        run_answer(teacher, prompts, store, filters, answer, jobs_per_round=2 * cfg.concurrency)


# ───────────────────────── the whole experiment ─────────────────────────


def check_config(cfg: SynthExperimentConfig) -> None:
    from danlu.eval.world import WORLD_SETS

    for name, value in (("hand", cfg.hand), ("steps", cfg.steps)):
        if value < 1:
            raise DanluError(f"synth.{name} {value}: must be at least 1")
    for name, value in (("n", cfg.n), ("answers", cfg.answers), ("eval_limit", cfg.eval_limit)):
        if value < 0:
            raise DanluError(f"synth.{name} {value}: must be 0 or more")
    if not cfg.n and not cfg.answers:
        raise DanluError("synth: n and answers are both 0: no synthetic data to compare with")
    if cfg.gold and not cfg.answers:
        raise DanluError("synth.gold needs synth.answers > 0 (the gold student uses the same prompts)")
    if cfg.split not in SPLITS:
        raise DanluError(f"synth.split {cfg.split!r}: one of {', '.join(SPLITS)}")
    bad = [s for s in cfg.eval_sets if s not in EVAL_SETS]
    if bad or not cfg.eval_sets:
        known = [s for s in bad if s in WORLD_SETS]
        why = f" ({', '.join(known)} not scored by generation here)" if known else ""
        raise DanluError(f"synth.eval_sets {cfg.eval_sets}: choose from {', '.join(EVAL_SETS)}{why}")


def run_experiment(
    world: Path, teacher: str, student: Path, out: Path, cfg: SynthExperimentConfig, recipe: dict[str, Any]
) -> dict[str, Any]:
    """Generates, trains the students, scores them; writes OUT/results.json and results.md, returns the results."""
    from danlu.config import deep_merge
    from danlu.synth.stats import dialog_stats, paired_difference, run_yield
    from danlu.synth.teacher import is_url

    check_config(cfg)
    seed = int(cfg.seed if cfg.seed is not None else recipe.get("seed", 0))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    t0 = time.time()
    files = prepare_data(world, out, cfg, seed)
    # rows are read before anything is trained: a missing or empty set stops the run at once
    split_how: set[str] = set()
    rows_by_set = {}
    for name in cfg.eval_sets:
        rows_by_set[name], how = eval_rows(world / "eval", name, cfg.split, cfg.eval_limit)
        split_how.add(how)
        if not rows_by_set[name]:
            raise DanluError(f"synth: the held-out set {name} has no {cfg.split} rows in {world / 'eval'}")

    t = time.time()
    jobs = synth_jobs(files, out, cfg, seed)
    if any(left for _, _, left in jobs.values()):  # a rerun with complete outputs needs no teacher
        if is_url(teacher):
            generate(teacher, jobs, cfg, seed)
        else:
            with served(Path(teacher), out / "serve.log", cfg.synth_timeout) as url:
                generate(url, jobs, cfg, seed)
    made = {name: job[0].out for name, job in jobs.items()}
    gen_seconds = round(time.time() - t, 1)

    section = deep_merge(recipe.get("sft") or {}, cfg.sft)
    section = deep_merge(section, {"train": {"steps": cfg.steps, "eval_every": 0, "sample_every": 0},
                                   "eval_limit": 0, "replay": 0.0})  # fmt: skip
    section.pop("data", None)
    section.pop("enabled", None)
    recipe_file = out / "student_recipe.json"
    student_recipe = {k: v for k, v in recipe.items() if k != "synth"} | {"seed": seed, "sft": section}
    if not recipe_file.is_file() or json.loads(recipe_file.read_text()) != json.loads(
        json.dumps(student_recipe)
    ):
        write_json_atomic(recipe_file, student_recipe)
    students: dict[str, list[Path]] = {"hand": [files["hand"]]}
    distillation_first = sorted(made, key=lambda k: k != "answers")  # the cheaper question to settle first
    for name in distillation_first:
        students[f"hand+{name}"] = [files["hand"], made[name]]
    if "gold" in files:
        students["hand+gold"] = [files["hand"], files["gold"]]

    scores: dict[str, Any] = {}
    train_seconds: dict[str, float] = {}
    for name, data in students.items():
        if any(not p.is_file() or not p.stat().st_size for p in data):
            continue  # a generator that kept nothing: no student
        folder = out / "students" / name.replace("+", "_")
        t = time.time()
        sft_in_child(student, data, folder, recipe_file, log, cfg.synth_timeout, "synth")
        train_seconds[name] = round(time.time() - t, 1)
        scores[name] = cached_score(folder, folder / "scores.json", rows_by_set)

    if not is_url(teacher):  # the teacher on the same rows: what distilling it could reach at most
        scores["teacher"] = cached_score(Path(teacher), out / "teacher_scores.json", rows_by_set)
    sets = {k: [first_user(r) for r in v] for k, v in rows_by_set.items()}
    compared: dict[str, Any] = {}
    for name in scores:
        if name in ("hand", "teacher"):
            continue
        per = {s: paired_difference(scores["hand"][s]["items"], scores[name][s]["items"]) for s in sets}
        all_a = [x for s in sets for x in scores["hand"][s]["items"]]
        all_b = [x for s in sets for x in scores[name][s]["items"]]
        compared[name] = {**per, "all": paired_difference(all_a, all_b)}
    data_sets = {"hand": list(read_records(files["hand"]))}
    data_sets |= {k: list(read_records(p)) for k, p in made.items() if p.is_file() and p.stat().st_size}
    result: dict[str, Any] = {
        "config": asdict(cfg)
        | {
            "teacher": teacher,
            "student": str(student),
            "seed": seed,
            "train_seed": (cfg.sft.get("train") or {}).get("seed", seed),
        },
        "split": {"name": cfg.split, "made_by": sorted(split_how)},
        "eval_rows": {k: len(v) for k, v in rows_by_set.items()},
        "yield": {k: run_yield(p) for k, p in made.items()},
        "data": {k: dialog_stats(v) for k, v in data_sets.items()},
        "accuracy": {s: {k: v["accuracy"] for k, v in sc.items()} for s, sc in scores.items()},
        "delta": compared,
        "seconds": {
            "generate": gen_seconds,
            "train_and_score": train_seconds,
            "total": round(time.time() - t0, 1),
        },
        "examples": {s: {k: v["examples"] for k, v in sc.items()} for s, sc in scores.items()},
        "items": {s: {k: v["items"] for k, v in sc.items()} for s, sc in scores.items()},
    }
    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "results.md", results_markdown(result))
    return result


def results_markdown(result: dict[str, Any]) -> str:
    """The table a reader wants: accuracy per student and set, the paired delta with its interval, the data."""
    sets = list(result["eval_rows"])
    split = result["split"]
    lines = ["# Synthetic data: students on hand-written vs hand-written + teacher data\n",
             f"Teacher `{result['config']['teacher']}`, students from `{result['config']['student']}`, "
             f"{result['config']['steps']} SFT steps each, data seed {result['config']['seed']}, training seed "
             f"{result['config'].get('train_seed', result['config']['seed'])}. Held-out split "
             f"`{split['name']}` (made by {', '.join(split['made_by'])}); rows: "
             + ", ".join(f"{k} {v}" for k, v in result["eval_rows"].items()) + ".\n",
             "| student | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]  # fmt: skip
    for name, acc in result["accuracy"].items():
        cells = []
        for s in sets:
            cell = f"{100 * acc[s]:.1f}%"
            d = result["delta"].get(name, {}).get(s)
            if d:
                cell += (
                    f" ({100 * d['delta']:+.1f}, 95% CI {100 * d['ci95'][0]:+.1f}…{100 * d['ci95'][1]:+.1f})"
                )
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, d in result["delta"].items():
        a = d["all"]
        lines.append(f"\n{name} vs hand over all {a['n']} rows: {100 * a['delta']:+.1f} points "
                     f"(95% CI {100 * a['ci95'][0]:+.1f} … {100 * a['ci95'][1]:+.1f}; {a['better']} rows better, "
                     f"{a['worse']} worse)")  # fmt: skip
    lines += ["\n| data | rows | kept / generated | duplicate rate (instr.) | distinct-1 / distinct-2 (instr.) "
              "| distinct-2 (answers) | language mix (instr.) |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, st in result["data"].items():
        y = result["yield"].get(name)
        ins, ans = st["instructions"], st["answers"]
        ratio = f"{y['kept']}/{y['generated']} ({100 * y['kept_ratio']:.0f}%)" if y else "hand-written"
        mix = ", ".join(f"{k} {100 * v:.0f}%" for k, v in ins["language_mix"].items())
        lines.append(f"| {name} | {ins['n']} | {ratio} | {100 * ins['duplicate_rate']:.1f}% | "
                     f"{ins['distinct_1']:.3f} / {ins['distinct_2']:.3f} | {ans['distinct_2']:.3f} | {mix} |")  # fmt: skip
    for name, y in result["yield"].items():
        if y.get("rejected"):
            lines.append(f"\n{name} rejected: " + ", ".join(f"{k} {v}" for k, v in y["rejected"].items()))
    return "\n".join(lines) + "\n"
