"""Streams a completion from a checkpoint: `danlu generate CHECKPOINT "prompt"` (`--chat` applies the template), or
from an ensemble: `danlu generate --ensemble A,B [--weights 0.7,0.3] "prompt"`."""

from __future__ import annotations

import argparse
import sys

from danlu import DanluError

HELP = "stream a completion from a checkpoint (temperature, top-k, top-p, max tokens, seed, stop)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (left out with --ensemble)")
    p.add_argument("prompt", nargs="?", help="prompt text ('-' reads standard input)")
    p.add_argument("--ensemble", metavar="A,B[,C]",
                   help="generate with an ensemble of checkpoints sharing a tokenizer (averaged next-token log-probs)")  # fmt: skip
    p.add_argument("--weights", metavar="W1,W2", help="ensemble weights (default: equal)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user turn with the chat template"
    )
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step first: pays off for long outputs (compiling takes 10-20 s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from danlu.generate import Completion, Generator, SamplingParams
    from danlu.io import load_checkpoint

    if args.ensemble:
        from danlu.ensemble import load_ensemble, parse_members

        if args.prompt is not None:
            raise DanluError("with --ensemble, give the prompt alone (the checkpoints are in --ensemble)")
        args.prompt, args.compile = args.checkpoint, False
        if args.prompt is None:
            raise DanluError("no prompt given")
        ckpt = load_ensemble(*parse_members(args.ensemble, args.weights), device=args.device)
    else:
        if args.prompt is None:
            raise DanluError("expected CHECKPOINT PROMPT (or --ensemble A,B PROMPT)")
        if args.weights:
            raise DanluError("--weights needs --ensemble")
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
    tok = ckpt.tokenizer
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tok.render_chat(messages, add_generation_prompt=True)[0]
    else:
        ids = [tok.bos_id, *tok.encode(prompt)]
        print(prompt, end="", flush=True)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop,
    )  # fmt: skip
    for item in Generator(ckpt.model, tok, compile=args.compile).stream(ids, params):
        if isinstance(item, Completion):
            print(f"\n[{len(item.token_ids)} tokens, finish: {item.finish_reason}]", file=sys.stderr)
        else:
            print(item, end="", flush=True)
    return 0
