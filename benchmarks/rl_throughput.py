"""RL rollout speed: our batched KV-cache generation vs a plain loop of transformers `generate` on the same
weights, and GRPO steps per minute. Usage: python benchmarks/rl_throughput.py CHECKPOINT [--prompts 32]."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--grpo-steps", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from danlu.generate import Generator, SamplingParams
    from danlu.io import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    tok = ck.tokenizer
    questions = [f"What is {a} plus {a * 7 % 50}?" for a in range(args.prompts)]
    prompts = [
        tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions
    ]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=1.0, seed=0, stop_token_ids=[])
    gen = Generator(ck.model, tok)
    gen.generate(prompts[:2], params)  # warm-up
    t = time.perf_counter()
    ours = sum(len(c.token_ids) for c in gen.generate(prompts, params))
    ours_s = time.perf_counter() - t
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32).eval()
    t, theirs = time.perf_counter(), 0
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                              do_sample=True, pad_token_id=tok.pad_id)  # fmt: skip
            theirs += out.shape[1] - len(p)
    theirs_s = time.perf_counter() - t
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"config: {ck.config.num_params() / 1e6:.2f}M params, {args.prompts} prompts × {args.max_new_tokens} new tokens"
    )
    print(f"danlu batched KV-cache: {ours / ours_s:,.0f} tok/s; transformers generate loop: {theirs / theirs_s:,.0f} tok/s; "
          f"ratio {(ours / ours_s) / (theirs / theirs_s):.2f}×")  # fmt: skip
    from danlu.stages.grpo import GRPOConfig, train_grpo

    rl = Path(tempfile.mkdtemp()) / "rl.jsonl"
    import json

    rl.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}], "answer": "1"}) + "\n"
            for q in questions
        )
    )
    cfg = GRPOConfig(
        resume="false",
        max_new_tokens=args.max_new_tokens,
        train={"steps": args.grpo_steps, "progress": False},
    )
    t = time.perf_counter()
    train_grpo(Path(args.checkpoint), rl, rl.parent / "out", recipe={}, cfg=cfg)
    print(
        f"GRPO (4 prompts × 8 samples, {args.max_new_tokens} tokens): {args.grpo_steps / ((time.perf_counter() - t) / 60):.1f} steps/min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
