"""Does RL keep what SFT taught? GRPO variants from one run's DPO model, several seeds, held-out dev-split skills.

    python benchmarks/rl_keeps_skills.py --run runs/tiny --out /tmp/rl_skills --seeds 0 1 2

For each variant and seed: the tiny recipe's GRPO section (with the variant's overrides) trains from RUN/dpo on the
world's rl.jsonl, then the one world evaluator scores facts, tools, translation and arithmetic on the dev split
(never test: this is where RL settings are chosen). The parent is scored once. Prints mean ± std over seeds and the
parent's figure, with each set's row count; writes OUT/results.json and OUT/results.md.

Variants: `arith` = RL on by-hand arithmetic only, tool calls not executed (the recipe before issue 24);
`tools` = arithmetic + prompts that need get_date / the calculator, calls executed in the rollouts;
`tools_kl` = `tools` + a KL penalty (β = 0.04) to the starting model.
`--dpo` / `--ppo` measure the other RL stages the same way: the recipe's DPO from RUN/sft, or its PPO (tool calls
executed, RUN/reward as the reward) from RUN/dpo.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "arith": {"kinds": ["arithmetic"], "tools": False},
    "tools": {"kinds": ["arithmetic", "calculator", "date"], "tools": True},
    "tools_kl": {"kinds": ["arithmetic", "calculator", "date"], "tools": True, "beta": 0.04},
}
SETS = ["facts_chat", "tools", "translation", "arithmetic_chat"]


def figures(folder: Path, world: Path, limit: int) -> dict[str, dict[str, Any]]:
    """{quantity: {value, n, ci95}} on the dev split, from danlu's one world evaluator at the precision the eval stage
    uses (bf16 autocast on CPUs with bf16 instructions), so these figures are the run's (tools: the right call, and
    the answer after executing it; arithmetic: unseen sums and the times table apart)."""
    import torch

    from danlu.engine import resolve_dtype
    from danlu.eval.world import evaluate_world
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(folder)
    dtype = resolve_dtype("auto", torch.device("cpu"))
    out = evaluate_world(ckpt.model, ckpt.tokenizer, SETS, data=world, split="dev", limit=limit, dtype=dtype)
    return {name: {"value": float(fig["value"]), "n": int(fig["n"]), "ci95": fig.get("ci95")}
            for name, fig in out.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a tiny-recipe run folder with dpo/ (the parent)")
    ap.add_argument("--world", type=Path, help="world folder with rl.jsonl and eval/ (default RUN/world)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["arith", "tools"], choices=sorted(VARIANTS))
    ap.add_argument("--steps", type=int, default=0, help="GRPO steps (0 = the tiny recipe's)")
    ap.add_argument("--limit", type=int, default=200, help="dev rows per held-out set")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 on a loaded machine)")
    ap.add_argument(
        "--score",
        nargs="*",
        default=[],
        metavar="VARIANT/seedK=PATH",
        help="also score checkpoints trained elsewhere (a run's own grpo/ as arith/seed0) or earlier",
    )
    ap.add_argument("--dpo", action="store_true",
                    help="the DPO stage instead: the tiny recipe's DPO from RUN/sft per seed, against RUN/sft")  # fmt: skip
    ap.add_argument("--ppo", action="store_true",
                    help="the PPO stage instead: the tiny recipe's PPO (tools on, RUN/reward as reward) from RUN/dpo")  # fmt: skip
    args = ap.parse_args()

    import torch

    from danlu.config import from_dict, load_recipe
    from danlu.stages.grpo import GRPOConfig, train_grpo

    if args.threads:
        torch.set_num_threads(args.threads)
    world = args.world or args.run / "world"
    parent = args.run / ("sft" if args.dpo else "dpo")
    recipe = load_recipe("tiny")
    if args.dpo or args.ppo:
        args.variants = ["dpo" if args.dpo else "ppo"]
    section = {k: v for k, v in recipe["grpo"].items() if k not in ("kinds", "tools")}
    if args.steps:
        section["train"] = {**section.get("train", {}), "steps": args.steps}
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {}
    if "parent" not in results:
        results["parent"] = figures(parent, world, args.limit)
        results_file.write_text(json.dumps(results, indent=1))
    for spec in args.score:
        key, _, path = spec.partition("=")
        if key not in results:
            results[key] = figures(Path(path), world, args.limit)
            results_file.write_text(json.dumps(results, indent=1))
    for seed in args.seeds:  # seed-major: a comparison of all variants is complete after each seed
        for variant in args.variants:
            key = f"{variant}/seed{seed}"
            if key in results:
                continue
            out = args.out / variant / f"seed{seed}"
            train = {**recipe.get("train", {}), "seed": seed, "progress": False}
            if args.threads:
                train["threads"] = args.threads
            if args.dpo:
                from danlu.stages.dpo import DPOConfig, train_dpo

                cfg = from_dict(DPOConfig, {**recipe["dpo"], "resume": "false"}, "dpo")
                stage = train_dpo(parent, world / "preference.jsonl", out, recipe={"seed": seed, "train": train},
                                  cfg=cfg, eval_data=world / "eval" / "preference.jsonl")  # fmt: skip
            elif args.ppo:
                from danlu.stages.ppo import PPOConfig, train_ppo

                ppo = {k: v for k, v in recipe["ppo"].items() if k != "enabled"}
                cfg = from_dict(PPOConfig, {**ppo, "resume": "false"}, "ppo")
                stage = train_ppo(parent, world / "rl.jsonl", out, recipe={"seed": seed, "train": train}, cfg=cfg,
                                  reward=str(args.run / "reward"), eval_data=world / "eval" / "rl.jsonl")  # fmt: skip
            else:
                cfg = from_dict(GRPOConfig, {**section, **VARIANTS[variant], "resume": "false"}, "grpo")
                stage = train_grpo(parent, world / "rl.jsonl", out, recipe={"seed": seed, "train": train}, cfg=cfg,
                                   eval_data=world / "eval" / "arithmetic.jsonl")  # fmt: skip
            results[key] = {"grpo": {k: v for k, v in stage.items() if isinstance(v, (int, float))},
                            **figures(out, world, args.limit)}  # fmt: skip
            results_file.write_text(json.dumps(results, indent=1))
            print(f"[rl_keeps_skills] {key}: " + ", ".join(f"{q} {results[key][q]['value']:.3f}"
                                                             for q in results["parent"]), flush=True)  # fmt: skip
    variants = list(dict.fromkeys(k.split("/")[0] for k in results if "/" in k))
    lines = ["| quantity (dev rows) | parent | " + " | ".join(variants) + " |",
             "|---|---:|" + "---:|" * len(variants)]  # fmt: skip
    for name in results["parent"]:
        row = [f"{name} ({results['parent'][name]['n']})", f"{results['parent'][name]['value']:.3f}"]
        for variant in variants:
            vals = [v[name]["value"] for k, v in results.items() if k.startswith(f"{variant}/") and name in v]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.append(f"{statistics.mean(vals):.3f} ± {sd:.3f} (n={len(vals)})" if vals else "–")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
