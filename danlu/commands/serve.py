"""Serve chat models: an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), a web chat
page at /, built-in date and calculator tools, and a feedback store (ratings, corrections) that
`danlu feedback export` turns into SFT and preference data.

Examples:
  danlu serve runs/tiny                 (a run folder: its best checkpoint on the dev split, said which and why)
  danlu serve runs/tiny/sft/model
  danlu serve --model chat=runs/tiny/dpo/model --model base=runs/tiny/sft/model --fallback chat=base
  danlu serve --ensemble duo=runs/zh/sft/model,runs/en/sft/model --weights 0.6,0.4
  danlu serve runs/tiny/sft/model --adapter zh=runs/lora-zh --adapter en=runs/lora-en
"""

from __future__ import annotations

import argparse

from danlu.commands._device import add_device_argument

HELP = "serve models over an OpenAI-compatible API with a web chat page and a feedback store"
DEFAULT_RUN = "runs/tiny"  # where `danlu run` puts the default recipe's run


def resolve_run_folders(paths: list[str], default: bool) -> list[str]:
    """Run folders among the positionals become their best checkpoint (danlu.eval.best, chosen on the dev split by a
    stated criterion), said with the reason; with nothing to serve, the default run's best checkpoint if it exists."""
    from pathlib import Path

    from danlu.eval.best import best_checkpoint

    if default and not paths and (Path(DEFAULT_RUN) / "summary.json").is_file():
        paths = [DEFAULT_RUN]
    out = []
    for p in paths:
        folder = Path(p)
        best = None
        if (folder / "summary.json").is_file() and not (folder / "config.json").is_file():
            best = best_checkpoint(folder)
        if best is None:
            out.append(p)
            continue
        path, choice = best
        print(f"[danlu] {p} is a run folder: serving its best checkpoint, {path} ({choice['criterion']}; "
              f"{choice['reason']})")  # fmt: skip
        out.append(str(path))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("checkpoint", nargs="*", help="checkpoint folder(s), served under the folder's name, or a run "
                   f"folder: its best checkpoint (default: {DEFAULT_RUN} when it exists)")  # fmt: skip
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="serve CHECKPOINT as NAME (repeatable); the first model is the page's default")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve the adapter folder PATH (LoRA-family, peft's format) as NAME on the first model, "
                   "which is loaded once for all of them; a request's `model` picks one (repeatable)")  # fmt: skip
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=A,B[,C]",
                   help="serve an ensemble of checkpoints sharing a tokenizer as NAME: their next-token log-probs "
                   "averaged (repeatable)")  # fmt: skip
    p.add_argument("--weights", action="append", default=[], metavar="[NAME=]W1,W2",
                   help="an ensemble's weights (default: equal); NAME= is needed with several ensembles")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health "
                   "(default: $DANLU_API_KEY if set)")  # fmt: skip
    p.add_argument("--admin-key", help="enables /v1/admin/corrections: with `Authorization: Bearer ADMIN_KEY` an "
                   "admin approves a user's correction for every user's memory (default: $DANLU_ADMIN_KEY if set; "
                   "without it corrections stay with the user who made them)")  # fmt: skip
    p.add_argument("--fallback", action="append", default=[], metavar="MODEL=BASE",
                   help="answer with BASE when MODEL's mean token log-probability is below --min-logprob")  # fmt: skip
    p.add_argument("--min-logprob", type=float, default=-2.0,
                   help="confidence threshold for --fallback (mean log-probability per token; default -2.0)")  # fmt: skip
    p.add_argument("--feedback-db", default="danlu-feedback.sqlite3",
                   help="SQLite file for conversations, ratings and corrections (default ./danlu-feedback.sqlite3)")  # fmt: skip
    p.add_argument("--no-feedback", action="store_true", help="keep no feedback and no correction memory")
    p.add_argument("--memory-threshold", type=float, default=0.8,
                   help="how closely a question must match a corrected one to get the correction in context "
                   "(0-1, default 0.8); 1.01 turns the memory off")  # fmt: skip
    p.add_argument("--no-date", action="store_true", help="do not tell the model today's date and time")
    p.add_argument(
        "--no-tools", action="store_true", help="do not execute the model's get_date/calculator calls"
    )
    p.add_argument(
        "--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default: context)"
    )
    p.add_argument("--max-active", type=int, default=64, help="streams a model decodes at once, in one batch "
                   "(default 64); more wait in its queue")  # fmt: skip
    p.add_argument("--max-queued", type=int, default=256, help="streams that may wait beyond --max-active "
                   "(default 256); past that a request gets HTTP 429 with a Retry-After header")  # fmt: skip
    add_device_argument(p)
    p.add_argument(
        "--engine",
        default="process",
        choices=["process", "thread"],
        help="where each checkpoint's model decodes: process (an engine process of its own, so that "
        "the HTTP server and the decoding do not share Python's GIL: 1.6x the tokens/s at 16 clients "
        "on a 2-core CPU) or thread (a thread of the server's process; adapters and ensembles always do)",
    )
    p.add_argument("--threads", type=int, help="CPU threads of an engine process (default: every core but one, "
                   "left to the HTTP server; OMP_NUM_THREADS, when set, decides)")  # fmt: skip
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile each model's decode step at start-up: several times faster tokens after "
                   "10-20 s of compiling (auto: where a C++ compiler or a GPU is present)")  # fmt: skip
    p.add_argument("--detector", metavar="DIR", help="an AI-text detector folder (`danlu detect train`): enables "
                   "POST /v1/detect")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import os

    from danlu import DanluError
    from danlu.compiler import resolve_compile
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.engine import Admission
    from danlu.serve.engine_process import engine_threads, freeze_heap
    from danlu.serve.feedback import FeedbackStore
    from danlu.serve.memory import CorrectionMemory
    from danlu.serve.routing import (
        load_served_ensemble,
        load_served_model,
        parse_ensembles,
        parse_fallbacks,
        parse_model_specs,
    )
    from danlu.serve.server import serve_forever

    args.checkpoint = resolve_run_folders(args.checkpoint, default=not (args.model or args.ensemble))
    specs = []
    if (
        args.checkpoint or args.model or not args.ensemble
    ):  # nothing at all to serve: parse_model_specs says so
        specs = parse_model_specs(args.checkpoint, args.model)
    from danlu.serve.adapters import load_base_with_adapters, parse_adapter_specs

    adapters = parse_adapter_specs(args.adapter, [n for n, _ in specs])
    if adapters and not specs:
        raise DanluError("--adapter needs a base model to attach to: danlu serve BASE --adapter NAME=PATH")
    ensembles = parse_ensembles(args.ensemble, args.weights, [n for n, _ in specs] + [n for n, _ in adapters])
    served_names = [n for n, _ in specs] + [n for n, _ in adapters] + [e[0] for e in ensembles]
    fallbacks = parse_fallbacks(args.fallback, served_names)
    if not 0 < args.port < 65536:
        raise DanluError(f"--port {args.port}: not a TCP port")
    if args.max_active < 1 or args.max_queued < 0:
        raise DanluError(f"--max-active {args.max_active} / --max-queued {args.max_queued}: at least 1 / 0")
    engine_threads(args.threads, args.device)  # refuses --threads 0 here, before any engine starts
    models = []
    for i, (name, path) in enumerate(specs):
        print(f"[danlu] loading {name} from {path}")
        if i == 0 and adapters:  # the base, loaded once, with every adapter attached to it
            models.extend(
                load_base_with_adapters(name, path, adapters, device=args.device, max_active=args.max_active)
            )
            continue
        m = load_served_model(name, path, device=args.device, max_active=args.max_active,
                              compile=resolve_compile(args.compile, args.device), engine=args.engine,
                              threads=args.threads)  # fmt: skip
        models.append(m)
    for name, paths, weights in ensembles:
        print(f"[danlu] loading ensemble {name} of {', '.join(paths)}")
        models.append(
            load_served_ensemble(name, paths, weights, device=args.device, max_active=args.max_active)
        )
    for m in models:  # the adapters' shared lanes reach their worker through `SharedLane`
        worker = getattr(m.worker, "_worker", m.worker)
        if isinstance(worker, Admission):
            worker.max_queued = args.max_queued
    for m in models:
        if m.name in fallbacks:
            m.fallback, m.min_logprob = fallbacks[m.name], args.min_logprob
    feedback = None if args.no_feedback else FeedbackStore(args.feedback_db)
    memory = (
        None if args.no_feedback or args.memory_threshold > 1 else CorrectionMemory(args.memory_threshold)
    )
    options = ServeOptions(
        api_key=args.api_key or os.environ.get("DANLU_API_KEY") or None, feedback=feedback, memory=memory,
        date_prompt=not args.no_date, builtin_tools=not args.no_tools, max_tokens_limit=args.max_tokens_limit,
        admin_key=args.admin_key or os.environ.get("DANLU_ADMIN_KEY") or None,
    )  # fmt: skip
    if args.detector:
        from danlu.detect.classifier import Detector

        options.detector = Detector.load(args.detector, args.device)
    app = create_app(models, options)
    freeze_heap()  # what is loaded stays: no full collection walks it again mid-request
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        print(
            f"[danlu] warning: listening on {args.host} without --api-key: anyone who can reach it can use it"
        )
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"[danlu] chat page {where}/  ·  API {where}/v1  ·  models: {', '.join(m.name for m in models)}")
    if feedback is not None:
        print(f"[danlu] feedback → {feedback.path}")
    try:
        serve_forever(app, args.host, args.port, log_level=args.log_level)
    finally:
        for m in models:
            m.worker.close()
    return 0
