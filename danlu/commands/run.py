"""Runs a recipe's stages in order: `danlu run` (the tiny default), `danlu run smoke --out DIR`, or any YAML."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "run a pipeline recipe end to end (default: tiny, on the built-in world corpus)"
EVERY_RANK = True  # under torchrun every process runs it (danlu.cli)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe", nargs="?", default="tiny", help="built-in recipe name (tiny, smoke, …) or a YAML file"
    )
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. pretrain.train.steps=200 device=cuda"
    )
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="rerun from this stage even if unchanged"
    )
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--list", action="store_true", help="list the recipe's stages and their state, then exit")
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="run the recipe N times, with seed S..S+N-1 (S: the recipe's seed, 0 by default), into OUT/seedK, "
        "then write OUT/seeds.json and OUT/seeds.md: mean ± std over the runs per metric",
    )


def run(args: argparse.Namespace) -> int:
    from danlu import DanluError
    from danlu.commands._training import main_rank
    from danlu.config import apply_overrides, load_recipe
    from danlu.runner import active_stages, run_pipeline

    if args.only:  # `--only pretrain a.b=1`: overrides after the stage names
        args.overrides += [s for s in args.only if "=" in s]
        args.only = [s for s in args.only if "=" not in s]
    if "=" in args.recipe:  # `danlu run key=value` keeps the default recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = "tiny"
    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    if args.list:
        folders = (
            [f for _, f in seed_runs(recipe, out, args.seeds).values()] if args.seeds is not None else [out]
        )
        for folder in folders:
            if args.seeds is not None:
                print(f"{folder}:")
            for name in active_stages(recipe):
                state = "done" if (folder / name / "stage.json").exists() else "pending"
                print(f"{name:<10} {state}")
        return 0
    if args.only:
        unknown = [s for s in args.only if s not in active_stages(recipe)]
        if unknown:
            raise DanluError(
                f"--only: {', '.join(unknown)} not in this recipe's stages: {', '.join(active_stages(recipe))}"
            )
    if args.seeds is not None:
        return _run_seeds(recipe, out, args)
    summary = run_pipeline(recipe, out, from_stage=args.from_stage, only=args.only)
    if main_rank():
        _print_summary(summary, out)
    return 0


def seed_runs(recipe: dict, out: Path, n: int) -> dict[int, tuple[dict, Path]]:
    """seed → (the recipe with that seed, its run folder OUT/seedK) for `--seeds n`, from the recipe's own seed."""
    from danlu import DanluError

    if n < 1:
        raise DanluError(
            f"--seeds {n}: give the number of runs, 1 or more (2 or more for a standard deviation)"
        )
    base = recipe.get("seed", 0)
    if not isinstance(base, int) or isinstance(base, bool):
        raise DanluError(f"recipe: seed must be an integer, got {base!r}")
    return {base + k: ({**recipe, "seed": base + k}, out / f"seed{base + k}") for k in range(n)}


def _run_seeds(recipe: dict, out: Path, args: argparse.Namespace) -> int:
    """The recipe once per seed (a finished seed's unchanged stages are skipped, as in any rerun), then the
    aggregate over all of them."""
    from danlu.commands._training import main_rank
    from danlu.eval.seeds import write_seed_report
    from danlu.runner import run_pipeline

    runs = seed_runs(recipe, out, args.seeds)
    for seed, (seeded, folder) in runs.items():
        print(f"[danlu] ══ seed {seed} ({folder}) ══")
        run_pipeline(seeded, folder, from_stage=args.from_stage, only=args.only)
    if not main_rank():
        return 0
    json_path, md_path = write_seed_report(out, {seed: folder for seed, (_, folder) in runs.items()})
    print(f"\n[danlu] {len(runs)} runs finished: mean ± std per metric in {md_path} (and {json_path.name})")
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    print(f"\n[danlu] run finished: {out}")
    for stage, metrics in summary.get("stages", {}).items():
        shown = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        }
        print(f"  {stage:<10} " + json.dumps(shown, ensure_ascii=False)[:300])
    from danlu.eval.best import best_checkpoint

    best = best_checkpoint(out)  # the dev-split choice (danlu.eval.best), not simply the last stage
    if best is not None:
        model, choice = best
        print(f"\nBest checkpoint: {model.name} ({choice['reason']})\n  criterion: {choice['criterion']}")
        if model.name != "pretrain":
            print(f"\nTry it:  danlu chat {model}\n         danlu serve {out}")
        else:
            print(f'\nTry it:  danlu generate {model} "中国最高的山是"')
    exported = summary.get("stages", {}).get("export", {})
    if exported.get("gguf") and Path(exported["gguf"]).exists():
        gguf = exported["gguf"]
        print(f"llama.cpp:  llama-cli -m {gguf} -cnv      (or: llama-server -m {gguf})")
        if exported.get("modelfile"):
            print(
                f"Ollama:     ollama create danlu-{out.name} -f {exported['modelfile']} && ollama run danlu-{out.name}"
            )
    if (out / "report.html").exists():
        print(f"Report:  {out / 'report.html'}")
