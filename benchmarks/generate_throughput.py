"""Batch-1 decode tokens/s with danlu's KV-cache generator vs transformers' `generate` on the same weights.

python benchmarks/generate_throughput.py                 # tiny default shape, 128 new tokens
python benchmarks/generate_throughput.py --depth 12 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hf_twin, machine, timed_side_by_side  # noqa: E402

from danlu.generate import Generator, SamplingParams  # noqa: E402
from danlu.model import ModelConfig, Transformer  # noqa: E402


class _NoStopTokenizer:
    """Generation without a tokenizer: stop ids empty, no padding rows to mask, no text decoding needed."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.stop_ids, self.pad_id = vocab, set(), 0

    def stream_decoder(self, skip_special_tokens: bool = True):  # noqa: ANN201
        return type("D", (), {"step": staticmethod(lambda t: ""), "flush": staticmethod(lambda: "")})()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="generated tokens")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = ModelConfig(
        vocab_size=args.vocab, depth=args.depth, max_position_embeddings=args.prompt + args.new + 8
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).eval()
    hf = LlamaForCausalLM(hf_twin(cfg)).to(device).eval()
    hf.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("rope_")}, strict=False
    )
    prompt = torch.randint(0, args.vocab, (1, args.prompt), device=device)

    eager = Generator(ours, _NoStopTokenizer(args.vocab))
    compiled = Generator(ours, _NoStopTokenizer(args.vocab), compile=True)
    params = SamplingParams(max_tokens=args.new, temperature=0.0, stop_token_ids=[])
    ids = prompt[0].tolist()
    out = {}

    def run_ours() -> None:
        out["ours"] = compiled.generate([ids], params)[0].token_ids

    def run_eager() -> None:
        out["eager"] = eager.generate([ids], params)[0].token_ids

    def run_hf() -> None:
        with torch.inference_mode():
            out["hf"] = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                    pad_token_id=0)[0, args.prompt :].tolist()  # fmt: skip

    # The first call compiles the decode step (10-20 s on a CPU); the warm-up round absorbs it, as a server's first
    # request would.
    seconds = timed_side_by_side({"ours": run_ours, "eager": run_eager, "hf": run_hf}, 1, args.rounds, sync)
    t_ours, t_eager, t_hf = seconds["ours"], seconds["eager"], seconds["hf"]
    same = out["ours"] == out["hf"] == out["eager"]
    print(f"machine: {machine()}")
    print(f"config: depth {args.depth} (hidden {cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M params), vocab "
          f"{args.vocab}, prompt {args.prompt}, new {args.new}, batch 1, greedy, fp32, device {device}")  # fmt: skip
    print(f"danlu Generator(compile=True):  {args.new / t_ours:>8,.0f} tokens/s")
    print(f"danlu Generator (eager):        {args.new / t_eager:>8,.0f} tokens/s")
    print(f"transformers generate:          {args.new / t_hf:>8,.0f} tokens/s")
    print(
        f"ratio: {t_hf / t_ours:.2f}x compiled, {t_hf / t_eager:.2f}x eager   identical greedy tokens: {same}"
    )


if __name__ == "__main__":
    main()
