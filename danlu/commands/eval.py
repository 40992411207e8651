"""Evaluates a checkpoint: `danlu eval CHECKPOINT --task world mmlu --data DIR [--shots 5] [--out results.json]`."""

from __future__ import annotations

import argparse

from danlu.commands._device import add_device_argument

HELP = "evaluate a checkpoint: bpb, multiple choice (C-Eval/CMMLU/MMLU), GSM8K, the world held-out sets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="model folder (the output of a training stage)")
    p.add_argument("--ensemble", metavar="A,B[,C]",
                   help="evaluate an ensemble of checkpoints sharing a tokenizer instead of one checkpoint")  # fmt: skip
    p.add_argument("--weights", metavar="W1,W2", help="ensemble weights (default: equal)")
    p.add_argument(
        "--task", nargs="+", default=["world"], help="task names (default: world); --list-tasks shows them"
    )
    p.add_argument(
        "--data", help="file or folder the task reads (text/shards for bpb, CSV for mc, JSONL for gsm8k)"
    )
    p.add_argument(
        "--world", help="world tasks: a world or run folder (default: the checkpoint's run, else seed 0)"
    )
    p.add_argument("--split", default="dev", choices=["dev", "test"],
                   help="world tasks: held-out rows to score, dev (tune on it; default) or test (report it)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="precision to run the model at (default auto: bf16 where the device has it, as training)")  # fmt: skip
    p.add_argument("--dev", help="few-shot examples: dev split for multiple choice, train JSONL for gsm8k")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0)")
    p.add_argument(
        "--limit", type=int, default=0, help="questions per file or set (default: all of the split)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256, help="generation length for gsm8k")
    add_device_argument(p, default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="decode the world sets' answers with torch.compile (auto: sets of 100 rows or more, where a "
                   "C++ compiler or a GPU is present)")  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--examples", type=int, default=3, help="examples kept per task in the results (default 3)"
    )
    p.add_argument("--encoding", help="text encoding of --data/--dev files (default: detected)")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")


def run(args: argparse.Namespace) -> int:
    import time

    from danlu import DanluError
    from danlu.eval.tasks import (
        EvalOptions,
        format_table,
        get_task,
        letter_lines,
        registry,
        run_tasks,
        table_rows,
    )

    if args.list_tasks:
        for t in registry().values():
            print(f"{t.name:<24} {t.description}")
        return 0
    for name in args.task:
        get_task(name)  # unknown names fail before the model loads
    if args.shots < 0 or args.limit < 0 or args.batch_size < 1 or args.examples < 0:
        raise DanluError("--shots, --limit and --examples must be >= 0 and --batch-size >= 1")
    from pathlib import Path

    from danlu.engine import resolve_device, resolve_dtype
    from danlu.eval.store import FigureStore
    from danlu.files import write_json_atomic
    from danlu.io import load_checkpoint

    device = resolve_device(args.device)
    if args.ensemble:
        from danlu.ensemble import load_ensemble, parse_members

        if args.checkpoint:
            raise DanluError("give either a CHECKPOINT or --ensemble A,B, not both")
        ckpt = load_ensemble(*parse_members(args.ensemble, args.weights), device=device)
        args.checkpoint = f"ensemble({args.ensemble})"
    elif not args.checkpoint:
        raise DanluError("expected a CHECKPOINT (or --ensemble A,B)")
    else:
        ckpt = load_checkpoint(args.checkpoint, device=device)
    folder = Path(str(ckpt.path)) if getattr(ckpt, "path", None) else None
    # a checkpoint of a run: its figures already computed on the same rows at the same precision are read back
    store = FigureStore(folder, readonly=True) if folder is not None and folder.is_dir() else None
    opts = EvalOptions(data=args.data, world=args.world, dev=args.dev, shots=args.shots, limit=args.limit,
                       batch_size=args.batch_size, max_tokens=args.max_tokens, examples=args.examples,
                       encoding=args.encoding, split=args.split, dtype=resolve_dtype(args.dtype, device),
                       store=store, compile=args.compile)  # fmt: skip
    t0 = time.time()
    results = run_tasks(ckpt, args.task, opts)
    print(format_table(table_rows(results)))
    for line in letter_lines(results):
        print(line)
    print(f"\n{args.checkpoint}: {len(results)} result(s) in {time.time() - t0:.1f}s")
    if args.out:
        write_json_atomic(
            Path(args.out),
            {"checkpoint": str(args.checkpoint), "tasks": args.task, "split": args.split, "results": results},
        )
        print(f"wrote {args.out}")
    return 0
