"""Open weights, side by side: loading a ~0.5B Qwen2 folder (time, peak memory) and decoding it, danlu vs
transformers; and the tiny chat model's decode in llama.cpp (q8_0 GGUF) vs danlu's compiled decode.

python benchmarks/open_weights.py                       # Qwen2.5-0.5B's shape, random bf16 weights
python benchmarks/open_weights.py --layers 4            # a quick, smaller run
python benchmarks/open_weights.py --chat runs/tiny/sft  # llama.cpp vs danlu on a trained chat model

Loading runs in fresh processes (peak RSS is per process), alternating danlu and transformers round by round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timed_side_by_side  # noqa: E402

LOADERS = {
    "danlu": "from danlu.io import load_checkpoint; m = load_checkpoint(p, quiet=True).model",
    "transformers": "from transformers import AutoModelForCausalLM as A; "
    "m = A.from_pretrained(p, dtype=torch.float32)",
}


def make_qwen2(folder: Path, layers: int) -> int:
    """A random Qwen2.5-0.5B-shaped model (bf16 on disk, as published) with a small danlu tokenizer beside it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from danlu.tokenizer import Tokenizer

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    Tokenizer.train(
        ["中国最高的山是珠穆朗玛峰。The capital of Japan is Tokyo. 12 + 34 = 46."] * 50, 400
    ).save(folder)
    return sum(p.numel() for p in model.parameters())


def load_once(folder: Path, who: str) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of loading the folder in a fresh process."""
    code = (
        "import resource, sys, time, torch; p = sys.argv[1]; t = time.perf_counter(); "
        + LOADERS[who]
        + "; print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True
    )
    seconds, gib = out.stdout.split()[-2:]
    return float(seconds), float(gib)


def bench_load(folder: Path, rounds: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in LOADERS}
    for _ in range(rounds):
        for who in LOADERS:
            results[who].append(load_once(folder, who))
    med = {k: (statistics.median(s for s, _ in v), max(g for _, g in v)) for k, v in results.items()}
    for who, (s, g) in med.items():
        print(f"load {who:<13} {s:6.2f} s   peak RSS {g:5.2f} GiB   (median of {rounds}, fresh process each)")
    print(f"ratio: load time {med['transformers'][0] / med['danlu'][0]:.2f}x, "
          f"peak memory {med['transformers'][1] / med['danlu'][1]:.2f}x (transformers / danlu)")  # fmt: skip


class _WholeVocab:
    """The checkpoint's tokenizer, but sampling over every embedding row, as transformers' generate does (the
    benchmark's tokenizer is small; the random model's favourite rows lie beyond it)."""

    def __init__(self, tokenizer, rows: int) -> None:  # noqa: ANN001
        self._tok, self.vocab_size = tokenizer, rows

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._tok, name)

    def stream_decoder(self, skip_special_tokens: bool = True):  # noqa: ANN201
        return type("D", (), {"step": staticmethod(lambda t: ""), "flush": staticmethod(lambda: "")})()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return ""


def bench_decode(folder: Path, new: int, rounds: int) -> None:
    from transformers import AutoModelForCausalLM

    from danlu.generate import Generator, SamplingParams
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(folder, quiet=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = list(range(1000, 1032))
    params = SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=[])
    whole_vocab = _WholeVocab(ckpt.tokenizer, ckpt.config.vocab_size)  # random weights: any row may win
    eager = Generator(ckpt.model, whole_vocab)
    compiled = Generator(ckpt.model, whole_vocab, compile=True)
    out = {}

    def run(name: str, gen: Generator) -> None:
        out[name] = gen.generate([prompt], params)[0].token_ids

    def run_hf() -> None:
        with torch.inference_mode():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)  # fmt: skip
        out["hf"] = ids[0, len(prompt) :].tolist()

    seconds = timed_side_by_side(
        {"compiled": lambda: run("compiled", compiled), "eager": lambda: run("eager", eager), "hf": run_hf},
        1,
        rounds,
    )
    for name, label in (
        ("compiled", "danlu compiled"),
        ("eager", "danlu eager"),
        ("hf", "transformers generate"),
    ):
        print(f"decode {label:<22} {new / seconds[name]:7.1f} tokens/s")
    print(f"ratio: {seconds['hf'] / seconds['compiled']:.2f}x compiled, {seconds['hf'] / seconds['eager']:.2f}x eager"
          f"   identical greedy tokens: {out['compiled'] == out['eager'] == out['hf']}")  # fmt: skip


def bench_llama_cpp(chat: Path, new: int, rounds: int) -> None:
    from llama_cpp import Llama

    from danlu.export import export_gguf
    from danlu.generate import Generator, SamplingParams
    from danlu.io import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "chat-q8_0.gguf"
        export_gguf(chat, gguf, "q8_0")
        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
        ckpt = load_checkpoint(chat, quiet=True)
        prompt = ckpt.tokenizer.render_chat([{"role": "user", "content": "中国最高的山是什么？"}],
                                            add_generation_prompt=True)[0]  # fmt: skip
        gen = Generator(ckpt.model, ckpt.tokenizer, compile=True)
        new = min(new, ckpt.model.config.max_position_embeddings - len(prompt) - 1)  # both sides decode this many
        params = SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=[])

        def run_llama() -> None:
            llm.reset()
            for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
                if n >= new:
                    break

        seconds = timed_side_by_side({"danlu": lambda: gen.generate([prompt], params), "llama.cpp": run_llama}, 1,
                                     rounds)  # fmt: skip
        print(f"tiny chat model {chat}: {ckpt.model.config.num_params() / 1e6:.1f}M params, prompt {len(prompt)}, "
              f"new {new}")  # fmt: skip
        print(f"decode danlu compiled (fp32)  {new / seconds['danlu']:8.0f} tokens/s")
        print(f"decode llama.cpp q8_0         {new / seconds['llama.cpp']:8.0f} tokens/s")
        print(f"ratio: {seconds['llama.cpp'] / seconds['danlu']:.2f}x (llama.cpp time / danlu time)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="Qwen2.5-0.5B has 24")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="decoded tokens")
    ap.add_argument("--chat", type=Path, help="a danlu chat checkpoint for the llama.cpp comparison")
    ap.add_argument("--skip", nargs="*", default=[], choices=["load", "decode", "llama.cpp"])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2"
        t = time.perf_counter()
        n = make_qwen2(folder, args.layers)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
        print(f"model: random Qwen2 ({args.layers} layers), {n / 1e6:.0f}M parameters, bf16 files {size:.2f} GiB "
              f"(made in {time.perf_counter() - t:.0f} s); loaded as float32")  # fmt: skip
        print("config:", json.dumps({k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                     if k in ("hidden_size", "num_hidden_layers", "vocab_size")}))  # fmt: skip
        if "load" not in args.skip:
            bench_load(folder, args.rounds)
        if "decode" not in args.skip:
            bench_decode(folder, args.new, args.rounds)
    if args.chat and "llama.cpp" not in args.skip:
        bench_llama_cpp(args.chat, 128, args.rounds)


if __name__ == "__main__":
    main()
