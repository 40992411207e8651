"""Merging experiment (issue 21): two SFT specialists of one pretrained model, every merge method, the ensemble, and
SFT on the union as the upper bound, each scored on every skill's held-out set.

Why this shape: a merge is only worth having if it keeps what each parent learned. So the two parents learn
disjoint skills from disjoint SFT rows of the world corpus, and every candidate is judged on both skills' held-out
sets (phrasings and question/fact pairings never seen in training; danlu.eval.world). The union SFT is what a merge
tries to get without retraining; the pretrained model is the floor. Goal (the issue's): the best merge keeps
≥ 90% of each specialist's accuracy on that specialist's own skill.

Splits (`--split`):
  kind  specialist A = knowledge & language (fact, fact_context, fact_multi, translation, summary, chitchat, plan),
        skill set facts_chat (translation is left out: ~0 at this scale, and slow to score); specialist B =
        arithmetic & tools (arithmetic, calculator, date_tool, date_system), skill sets arithmetic_chat + tools.
  lang  A = Chinese dialogs, B = English dialogs; each skill is every chat set restricted to that language.

Merges: every mergekit method with the pretrained model as base (slerp: specialist A as base, t = 0.5; linear
0.5/0.5; task arithmetic, TIES, DARE with weight 1 each, density --density); `--variants` adds linear 0.25/0.75,
TIES and DARE-TIES at density 0.9 and the ensemble as a mixture; `--lora R` also trains both specialists as
rank-R LoRA adapters and merges those with peft's combinations (danlu.merge.lora). The three full SFTs run side
by side, one thread each; scores are cached in OUT/evals/, so a rerun only evaluates what is new.

Usage:
  danlu run merge --out /tmp/merge_base          # world, tokenizer, pretrain (smoke scale, 150 pretraining steps)
  python benchmarks/merge_experiment.py --run /tmp/merge_base --out /tmp/merge_exp --recipe merge --steps 150 \
      --limit 64 --variants --lora 16
Writes OUT/results.json and OUT/results.md (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

LORA_METHODS = ("cat", "svd", "linear", "ties", "dare_linear")  # peft's combinations, weights (1, 1)
KNOWLEDGE = {"fact", "fact_context", "fact_multi", "translation", "summary", "chitchat", "plan"}
TOOLS_MATH = {"arithmetic", "calculator", "date_tool", "date_system"}
SPLITS: dict[str, dict[str, Any]] = {
    "kind": {
        "A": ("knowledge", lambda r: r.get("kind") in KNOWLEDGE, ["facts_chat"]),
        "B": ("tools_math", lambda r: r.get("kind") in TOOLS_MATH, ["arithmetic_chat", "tools"]),
    },
    "lang": {
        "A": ("zh", lambda r: r.get("lang") == "zh", ["facts_chat", "arithmetic_chat", "tools"]),
        "B": ("en", lambda r: r.get("lang") == "en", ["facts_chat", "arithmetic_chat", "tools"]),
    },
}


def merge_configs(base: str, a: str, b: str, density: float) -> dict[str, dict[str, Any]]:
    """mergekit-schema configs of every method for parents a, b over the pretrained base (slerp: a is its base)."""
    two = lambda extra: [{"model": a, "parameters": extra}, {"model": b, "parameters": extra}]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": two({"weight": 0.5})},
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": 0.5},
        },  # fmt: skip
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": two({"weight": 1.0}),
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": two({"weight": 1.0, "density": density}),
            "parameters": {"normalize": False},
        },  # fmt: skip
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": two({"weight": 1.0, "density": density}),
            "parameters": {"normalize": False},
        },  # fmt: skip
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": two({"weight": 1.0, "density": density}),
        },  # fmt: skip
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": a}, {"model": b}],
        },
    }


def _share(x: float) -> str:
    """A kept share as a percentage; n/a where the specialist scored 0 (nothing to keep)."""
    return "n/a" if x != x else f"{x:.0%}"


def variant_configs(base: str, a: str, b: str) -> dict[str, dict[str, Any]]:
    """Settings beside the defaults: does a merge keep more of one parent when tilted toward it or pruned less?"""
    dense = {"weight": 1.0, "density": 0.9}
    return {
        "linear_0.25_0.75": {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 0.25}}, {"model": b, "parameters": {"weight": 0.75}}],
        },
        "ties_d0.9": {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False},
                      "models": [{"model": a, "parameters": dense}, {"model": b, "parameters": dense}]},
        "dare_ties_d0.9": {"merge_method": "dare_ties", "base_model": base, "parameters": {"normalize": False},
                           "models": [{"model": a, "parameters": dense}, {"model": b, "parameters": dense}]},
    }  # fmt: skip


def split_rows(sft: Path, out: Path, split: str) -> dict[str, Path]:
    """Writes A.jsonl, B.jsonl and union.jsonl (A ∪ B, in the corpus' order) from the world's sft.jsonl."""
    rows = [json.loads(line) for line in sft.read_text(encoding="utf-8").splitlines() if line.strip()]
    spec = SPLITS[split]
    files: dict[str, Path] = {}
    chosen: dict[str, list[dict[str, Any]]] = {"A": [], "B": [], "union": []}
    for r in rows:
        in_a, in_b = spec["A"][1](r), spec["B"][1](r)
        if in_a:
            chosen["A"].append(r)
        if in_b:
            chosen["B"].append(r)
        if in_a or in_b:
            chosen["union"].append(r)
    out.mkdir(parents=True, exist_ok=True)
    for key, rs in chosen.items():
        files[key] = out / f"{key}.jsonl"
        files[key].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
        print(f"[merge-exp] {key}: {len(rs)} dialogs", file=sys.stderr)
    return files


def sft_command(
    parent: Path, data: Path, out: Path, steps: int, recipe: str, extra: list[str], tokens: Path | None
) -> list[str]:
    """`danlu sft` as a subprocess command (the real CLI, so the experiment measures what users run), with the
    run's pretraining shards for replay where it has them (the recipe's share)."""
    replay = ["--tokens", str(tokens)] if tokens is not None else []
    return [sys.executable, "-m", "danlu", "sft", "--from", str(parent), "--data", str(data), "--out", str(out),
            *replay, "--recipe", recipe, f"sft.train.steps={steps}", "sft.eval_limit=0", "sft.bpb_rows=0",
            "sft.samples=[]", "sft.train.sample_every=0", f"sft.train.eval_every={steps}", *extra]  # fmt: skip


def run_all(jobs: dict[str, list[str]], parallel: bool, logs: Path) -> dict[str, float]:
    """Runs the SFT commands, all at once (one thread each: three small models on a busy 2-core machine finish
    sooner side by side than one after another) or in turn; returns each one's seconds."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"} if parallel else None
    started: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    times: dict[str, float] = {}
    for key, cmd in jobs.items():
        log = (logs / f"{key}.log").open("wb")
        started[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        if not parallel:
            _wait(key, *started[key], times, logs)
    for key, (proc, t0) in started.items():
        if key not in times:
            _wait(key, proc, t0, times, logs)
    return times


def _wait(key: str, proc: subprocess.Popen[bytes], t0: float, times: dict[str, float], logs: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"[merge-exp] SFT {key} failed; see {logs / f'{key}.log'}")
    times[f"sft_{key}"] = time.time() - t0
    print(f"[merge-exp] SFT {key}: {times[f'sft_{key}']:.0f}s", file=sys.stderr)


def score(ckpt: Any, world_eval: Path, sets: list[str], limit: int, split: str) -> dict[str, float]:
    """Each held-out quantity of the sets on the dev split (per language for the lang split: quantity@zh, @en),
    from the one world evaluator (a figure's `parts` hold its per-language counts)."""
    from danlu.eval.world import evaluate_world

    res = evaluate_world(
        ckpt.model, ckpt.tokenizer, sets, data=world_eval, split="dev", limit=limit, batch_size=limit
    )
    if split == "kind":
        return {q: fig["value"] for q, fig in res.items()}
    return {f"{q}@{lang}": fig["parts"][f"lang={lang}"]["value"]
            for q, fig in res.items() for lang in ("zh", "en") if f"lang={lang}" in fig.get("parts", {})}  # fmt: skip


def evaluate_one(
    name: str,
    path: str,
    members: list[str],
    world_eval: str,
    sets: list[str],
    limit: int,
    split: str,
    cache: str,
) -> dict[str, float]:
    """One model's scores (a worker process: one thread, so several evaluate side by side); cached as JSON so a
    rerun only evaluates what is missing."""
    import torch

    from danlu.ensemble import load_ensemble
    from danlu.io import load_checkpoint

    done = Path(cache)
    if done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    mode = "prob" if path == "ensemble_prob" else "logprob"
    ckpt = load_ensemble(members, mode=mode) if members else load_checkpoint(path, quiet=True)
    res = score(ckpt, Path(world_eval), sets, limit, split)
    done.write_text(json.dumps(res) + "\n")
    print(f"[merge-exp] {name}: {res} ({time.time() - t0:.0f}s)", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder with world/ and a pretrained pretrain/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=sorted(SPLITS), default="kind")
    ap.add_argument(
        "--steps", type=int, default=60, help="SFT steps per specialist (the union gets twice as many)"
    )
    ap.add_argument("--limit", type=int, default=96, help="rows per held-out set")
    ap.add_argument("--density", type=float, default=0.5, help="TIES/DARE density")
    ap.add_argument("--recipe", default="smoke", help="recipe whose sft/train sections the SFT runs use")
    ap.add_argument("--workers", type=int, default=4, help="models evaluated side by side (one thread each)")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also: linear weighted 0.25/0.75, TIES and DARE-TIES at density 0.9, the ensemble as a mixture",
    )
    ap.add_argument("--lora", type=int, default=0, help="also train the specialists as LoRA adapters of this rank "
                    "and merge those with peft's combinations (cat, svd, linear, ties, dare_linear)")  # fmt: skip
    ap.add_argument("--lora-lr", type=float, default=0.003, help="the LoRA specialists' learning rate")
    ap.add_argument("--serial", action="store_true", help="run the three SFTs one after another")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for the SFT runs")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import machine

    from danlu.merge import merge, merge_adapters
    from danlu.merge.lora import NEEDS_DENSITY

    torch.manual_seed(0)
    run, out = Path(args.run), Path(args.out)
    base = run / "pretrain" if (run / "pretrain" / "config.json").is_file() else run / "pretrain" / "model"
    world = run / "world"
    spec = SPLITS[args.split]
    files = split_rows(world / "sft.jsonl", out / "data", args.split)
    names = {"A": f"specialist_{spec['A'][0]}", "B": f"specialist_{spec['B'][0]}"}
    tokens = run / "tokens" if (run / "tokens").is_dir() else None
    jobs = {key: sft_command(base, files[key], out / f"sft_{key}", steps, args.recipe, args.overrides, tokens)
            for key, steps in (("A", args.steps), ("B", args.steps), ("union", 2 * args.steps))
            if not (out / f"sft_{key}" / "config.json").is_file()}  # fmt: skip
    if (
        args.lora
    ):  # the same two specialists as LoRA adapters (only the adapter trains; LoRA wants a larger lr)
        lora = ["sft.peft.method=lora", f"sft.peft.r={args.lora}", f"sft.train.lr={args.lora_lr}"]
        jobs.update({f"lora_{key}": sft_command(base, files[key], out / f"lora_{key}", args.steps, args.recipe,
                                                [*args.overrides, *lora], tokens)
                     for key in ("A", "B") if not (out / f"lora_{key}" / "adapter_config.json").is_file()})  # fmt: skip
    times = run_all(jobs, not args.serial, out / "data")
    a, b = str(out / "sft_A"), str(out / "sft_B")
    models: dict[str, Any] = {"pretrained": base, names["A"]: Path(a), names["B"]: Path(b)}
    configs = merge_configs(str(base), a, b, args.density)
    if args.variants:
        configs.update(variant_configs(str(base), a, b))
    for method, cfg in configs.items():
        t0 = time.time()
        merge(cfg, out / f"merge_{method}", force=True, quiet=True)
        times[f"merge_{method}"] = time.time() - t0
        models[f"merge_{method}"] = out / f"merge_{method}"
    models["ensemble"] = "ensemble"
    if args.variants:
        models["ensemble (mixture)"] = "ensemble_prob"
    models["sft_union (upper bound)"] = out / "sft_union"
    if args.lora:
        la, lb = out / "lora_A", out / "lora_B"
        models[f"lora_{names['A']}"], models[f"lora_{names['B']}"] = la, lb
        for method in LORA_METHODS:
            t0 = time.time()
            density = args.density if method in NEEDS_DENSITY else None
            merge_adapters([la, lb], out / f"lora_merge_{method}", method=method, weights=[1.0, 1.0],
                           density=density, force=True)  # fmt: skip
            times[f"lora_merge_{method}"] = time.time() - t0
            models[f"lora_merge_{method}"] = out / f"lora_merge_{method}"

    sets = sorted({s for k in ("A", "B") for s in spec[k][2]})
    (out / "evals").mkdir(exist_ok=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(evaluate_one, name, str(path), [a, b] if str(path).startswith("ensemble") else [],
                                     str(world / "eval"), sets, args.limit, args.split,
                                     str(out / "evals" / f"{re.sub(r'[^A-Za-z0-9_.]+', '_', name).strip('_')}.json"))
                   for name, path in models.items()}  # fmt: skip
        results = {name: f.result() for name, f in futures.items()}
    times["eval_all"] = time.time() - t0

    from danlu.eval.world import QUANTITIES  # quantity → its held-out set

    def skill(res: dict[str, float], k: str) -> float:
        cols = [
            c
            for c in res
            if QUANTITIES.get(c.split("@")[0]) in spec[k][2]
            and (args.split == "kind" or c.endswith(spec[k][0]))
        ]
        return sum(res[c] for c in cols) / len(cols)

    cols = list(next(iter(results.values())))
    skill_a, skill_b = f"skill {spec['A'][0]}", f"skill {spec['B'][0]}"
    ref_a, ref_b = skill(results[names["A"]], "A"), skill(results[names["B"]], "B")
    lines = [f"| model | {' | '.join(cols)} | {skill_a} | {skill_b} | kept A | kept B |",
             "|" + "---|" * (len(cols) + 5)]  # fmt: skip
    kept: dict[str, tuple[float, float]] = {}
    for name, res in results.items():
        sa, sb = skill(res, "A"), skill(res, "B")
        ka, kb = sa / ref_a if ref_a else float("nan"), sb / ref_b if ref_b else float("nan")
        kept[name] = (ka, kb)
        lines.append(f"| {name} | {' | '.join(f'{res[c]:.3f}' for c in cols)} | {sa:.3f} | {sb:.3f} | "
                     f"{_share(ka)} | {_share(kb)} |")  # fmt: skip
    merges = {n: v for n, v in kept.items() if n.startswith("merge_")}
    defined = [i for i, ref in enumerate((ref_a, ref_b)) if ref > 0]  # a specialist at 0 sets no bar to keep
    best = max(  # the worse kept share first, the mean breaks ties
        merges,
        key=lambda n: (
            min((merges[n][i] for i in defined), default=0.0),
            sum(merges[n][i] for i in defined) / max(1, len(defined)),
        ),
    )
    ok = bool(defined) and min(merges[best][i] for i in defined) >= 0.9
    verdict = (f"best merge by the worse of its two kept shares: **{best}** (keeps {_share(merges[best][0])} of "
               f"{names['A']}'s skill, {_share(merges[best][1])} of {names['B']}'s) → goal (≥ 90% of each) "
               f"{'MET' if ok else 'NOT met'}"
               + ("" if len(defined) == 2 else " (a specialist scores 0 on its own skill: no share to keep there)"))  # fmt: skip
    half = 1.96 * (0.25 / args.limit) ** 0.5
    table = "\n".join(lines)
    header = (f"{machine()}; split {args.split}; base {base}; SFT {args.steps} steps per specialist, "
              f"{2 * args.steps} on the union (recipe {args.recipe}); {args.limit} rows per held-out set; "
              f"TIES/DARE density {args.density}; kept = skill / the specialist's own skill; 95% CI of one "
              f"accuracy: ± {half:.2f} at most (binomial, {args.limit} rows)")  # fmt: skip
    text = f"{header}\n\n{table}\n\n{verdict}\n"
    print(text)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"results": results, "kept": kept, "best": best, "goal_met": ok,
                                                  "times_s": times, "args": vars(args)}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
