"""Generate the built-in world corpus: a bilingual (中文 + English) world of true facts, written as encyclopedia
articles, news, Q&A pages and forum threads, plus SFT dialogs, preference pairs, RL prompts and held-out evals.
The same seed and scale always give byte-identical files."""

from __future__ import annotations

import argparse

HELP = "generate the built-in bilingual world corpus (pretraining text, dialogs, held-out evals)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies the number of documents and dialogs (1.0 ≈ 8 MB of text; 0.05 for a smoke run)",
    )


def run(args: argparse.Namespace) -> int:
    from danlu.world import build_world, format_stats

    stats = build_world(args.out, seed=args.seed, scale=args.scale)
    print(format_stats(stats, args.out))
    return 0
