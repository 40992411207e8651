"""Evaluates a checkpoint: `danlu eval CHECKPOINT --task world mmlu --data DIR [--shots 5] [--out results.json]`."""

from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint: bpb, multiple choice (C-Eval/CMMLU/MMLU), GSM8K, the world held-out sets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model folder (the output of a training stage)")
    p.add_argument(
        "--task", nargs="+", default=["world"], help="task names (default: world); --list-tasks shows them"
    )
    p.add_argument(
        "--data", help="file or folder the task reads (text/shards for bpb, CSV for mc, JSONL for gsm8k)"
    )
    p.add_argument(
        "--world", help="world tasks: a world or run folder (default: the checkpoint's run, else seed 0)"
    )
    p.add_argument("--dev", help="few-shot examples: dev split for multiple choice, train JSONL for gsm8k")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0)")
    p.add_argument(
        "--limit", type=int, default=0, help="questions per file or set (default: all; world: 200)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256, help="generation length for gsm8k")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")


def run(args: argparse.Namespace) -> int:
    import time

    from danlu import DanluError
    from danlu.eval.tasks import EvalOptions, format_table, get_task, registry, run_tasks, table_rows

    if args.list_tasks:
        for t in registry().values():
            print(f"{t.name:<24} {t.description}")
        return 0
    for name in args.task:
        get_task(name)  # unknown names fail before the model loads
    if args.shots < 0 or args.limit < 0 or args.batch_size < 1:
        raise DanluError("--shots and --limit must be >= 0 and --batch-size >= 1")
    from pathlib import Path

    from danlu.engine import resolve_device
    from danlu.files import write_json_atomic
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    opts = EvalOptions(data=args.data, world=args.world, dev=args.dev, shots=args.shots, limit=args.limit,
                       batch_size=args.batch_size, max_tokens=args.max_tokens)  # fmt: skip
    t0 = time.time()
    results = run_tasks(ckpt, args.task, opts)
    print(format_table(table_rows(results)))
    print(f"\n{args.checkpoint}: {len(results)} result(s) in {time.time() - t0:.1f}s")
    if args.out:
        write_json_atomic(
            Path(args.out), {"checkpoint": str(args.checkpoint), "tasks": args.task, "results": results}
        )
        print(f"wrote {args.out}")
    return 0
