"""A terminal chat with a chat checkpoint: `danlu chat CHECKPOINT` (streaming, multi-turn, tools, /commands)."""

from __future__ import annotations

import argparse

from danlu.commands._device import add_device_argument

HELP = "chat with a checkpoint in the terminal (streaming; /reset, /system TEXT, /temp X; date and calculator tools)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="chat checkpoint folder (the output of `danlu sft` or a later stage)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--no-date", action="store_true", help="do not put today's date in the system prompt")
    p.add_argument("--no-tools", action="store_true", help="do not execute get_date / calculator tool calls")
    add_device_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step first (10-20 s): faster answers in a long chat")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from danlu.chat import ChatSession, repl
    from danlu.serve.routing import load_served_model

    model = load_served_model(
        Path(args.checkpoint).resolve().name, args.checkpoint, device=args.device, compile=args.compile
    )
    if not model.meta.get("chat", True):
        print(f"[note: {args.checkpoint} is not a chat model (stage {model.meta.get('stage')!r}); "
              "fine-tune it with `danlu sft` first for sensible answers]", file=sys.stderr)  # fmt: skip
    session = ChatSession(
        model, system=args.system, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
        date=not args.no_date, tools=not args.no_tools,
    )  # fmt: skip
    try:
        return repl(session)
    finally:
        model.worker.close()
