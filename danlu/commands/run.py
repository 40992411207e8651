"""Runs a recipe's stages in order: `danlu run` (the tiny default), `danlu run smoke --out DIR`, or any YAML."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "run a pipeline recipe end to end (default: tiny, on the built-in world corpus)"


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


def run(args: argparse.Namespace) -> int:
    from danlu import DanluError
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
        for name in active_stages(recipe):
            done = out / name / "stage.json"
            state = "done" if done.exists() else "pending"
            print(f"{name:<10} {state}")
        return 0
    if args.only:
        unknown = [s for s in args.only if s not in active_stages(recipe)]
        if unknown:
            raise DanluError(
                f"--only: {', '.join(unknown)} not in this recipe's stages: {', '.join(active_stages(recipe))}"
            )
    summary = run_pipeline(recipe, out, from_stage=args.from_stage, only=args.only)
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    print(f"\n[danlu] run finished: {out}")
    for stage, metrics in summary.get("stages", {}).items():
        shown = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        }
        print(f"  {stage:<10} " + json.dumps(shown, ensure_ascii=False)[:300])
    model = next(
        (out / s for s in ("grpo", "ppo", "dpo", "sft", "pretrain") if (out / s / "config.json").exists()),
        None,
    )
    if model is not None:
        chat = (out / "sft" / "config.json").exists() and model.name != "pretrain"
        if chat:
            print(f"\nTry it:  danlu chat {model}\n         danlu serve {model}")
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
