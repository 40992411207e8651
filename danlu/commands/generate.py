"""Streams a completion from a checkpoint: `danlu generate CHECKPOINT "prompt"` (`--chat` applies the template), or
from an ensemble: `danlu generate --ensemble A,B [--weights 0.7,0.3] "prompt"`."""

from __future__ import annotations

import argparse
import sys

from danlu import DanluError
from danlu.commands._device import add_device_argument

HELP = "stream a completion from a checkpoint (temperature, top-k, top-p, max tokens, seed, stop)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (left out with --ensemble)")
    p.add_argument("prompt", nargs="?", help="prompt text ('-' reads standard input)")
    p.add_argument("--ensemble", metavar="A,B[,C]",
                   help="generate with an ensemble of checkpoints sharing a tokenizer (averaged next-token log-probs)")  # fmt: skip
    p.add_argument("--weights", metavar="W1,W2", help="ensemble weights (default: equal)")
    p.add_argument("--best-of", metavar="REWARD_MODEL",
                   help="with --ensemble and --chat: sample --n answers from each model and print the one this reward "
                        "model scores best (members need not share a tokenizer)")  # fmt: skip
    p.add_argument("--n", type=int, default=1, help="answers per model for --best-of (default 1)")
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
    add_device_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step first: pays off for long outputs (compiling takes 10-20 s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from danlu.generate import Completion, Generator, SamplingParams
    from danlu.io import load_checkpoint

    if args.best_of:
        return _best_of(args)
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


def _best_of(args: argparse.Namespace) -> int:
    """`--ensemble A,B --best-of RM --chat PROMPT`: the reward model picks among the members' answers."""
    from danlu.ensemble import best_of_n, parse_members
    from danlu.generate import SamplingParams
    from danlu.io import load_checkpoint
    from danlu.rewards import RewardModelScorer, load_reward_model

    if not args.ensemble or not args.chat:
        raise DanluError(
            "--best-of needs --ensemble A,B (the models) and --chat (the reward model judges answers)"
        )
    if args.weights:
        raise DanluError("--weights applies to averaged ensembles, not to --best-of")
    prompt = sys.stdin.read() if args.checkpoint == "-" else args.checkpoint
    if prompt is None or args.prompt is not None:
        raise DanluError("with --ensemble, give the prompt alone (the checkpoints are in --ensemble)")
    paths, _ = parse_members(args.ensemble)
    members = [load_checkpoint(p, device=args.device, quiet=True) for p in paths]
    rm, rm_tok = load_reward_model(args.best_of, device=args.device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)  # fmt: skip
    best, candidates = best_of_n(members, RewardModelScorer(rm, rm_tok), messages, params, args.n)
    for c in candidates:
        mark = "*" if c is best else " "
        print(f"{mark} {c.score:+.3f}  {paths[c.member]}: {c.completion.text[:80]!r}", file=sys.stderr)
    print(best.completion.text)
    return 0
