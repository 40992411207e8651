"""danlu's evaluator against lm-evaluation-harness on the same checkpoints and items: C-Eval, CMMLU, MMLU (every dev
item in ../shared/data) and GSM8K (the first train rows), item by item.

python benchmarks/lm_eval_match.py --random                    # random danlu-Llama and imported-Qwen2 models
python benchmarks/lm_eval_match.py --checkpoint runs/tiny/pretrain --shots 4
python benchmarks/lm_eval_match.py --random --header harness   # the harness' own headers (Chinese subject names)

Multiple choice: danlu's prompt and the harness' (its `ceval-valid`, `cmmlu`, `mmlu` templates on local copies of the
files, few-shot from the same file with the question itself left out) are compared as text, each choice's
log-likelihood as a number and the chosen letter per item. GSM8K: the greedy completions as text, and danlu's exact
match against the harness' strict-match and flexible-extract. A random model sits at chance, so the comparison is of
the machinery, not of knowledge; the chance line is printed beside each accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def random_checkpoints(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A random danlu Llama and a random transformers Qwen2 (an imported family), both with a tokenizer trained on
    the benchmarks' own dev text (so Chinese is not all single bytes) and no embedding padding rows (danlu masks those,
    the harness does not: every log-likelihood would move by the same constant). Weights are scaled ×4 so that greedy
    text varies with the prompt."""
    import torch
    import transformers

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer
    from danlu.tokenizer import Tokenizer

    texts = [
        p.read_text(encoding="utf-8")
        for b in ("ceval", "cmmlu", "mmlu")
        for p in (DATA / b / "dev").glob("*.csv")
    ]
    with open(DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        texts += [next(f) for _ in range(2000)]
    tok = Tokenizer.train(texts, vocab_size=2048)
    tok.save(folder / "tokenizer")
    tok = Tokenizer.load(folder / "tokenizer")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=2, max_position_embeddings=4096)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    save_model_dir(folder / "llama", model.state_dict(), cfg, tok, {"stage": "random"}, chat=False)
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=tok.vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )  # fmt: skip
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05).mul_(4.0)
    hf.save_pretrained(folder / "qwen2")
    tok.save(folder / "qwen2")
    return {"random-llama": folder / "llama", "random-qwen2": folder / "qwen2"}


def main() -> int:
    from danlu.eval.lm_eval_tasks import compare_gsm8k, compare_multiple_choice
    from danlu.files import read_records

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint folder (repeatable)")
    ap.add_argument("--random", action="store_true", help="also build and compare two random models")
    ap.add_argument("--benchmarks", nargs="+", default=["ceval", "cmmlu", "mmlu", "gsm8k"])
    ap.add_argument(
        "--shots", type=int, default=1, help="few-shot examples (the dev files have 5 rows: at most 4)"
    )
    ap.add_argument("--limit", type=int, default=0, help="items per subject file (0: all)")
    ap.add_argument("--header", choices=["danlu", "harness", "both"], default="both")
    ap.add_argument("--gsm8k-items", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=48, help="GSM8K generation length")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"{DATA}: the real benchmark files are not here", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_match_"))
    ckpts = {str(c): Path(c) for c in args.checkpoint}
    if args.random:
        ckpts.update(random_checkpoints(tmp / "random"))
    headers = ["danlu", "harness"] if args.header == "both" else [args.header]
    results = []
    for label, ckpt in ckpts.items():
        for bench in args.benchmarks:
            t0 = time.time()
            if bench == "gsm8k":
                rows = []
                for row in read_records(DATA / "gsm8k" / "train.jsonl"):
                    rows.append(row)
                    if len(rows) == args.shots + args.gsm8k_items:
                        break
                res = compare_gsm8k(ckpt, rows[: args.shots], rows[args.shots :], folder=tmp / label / bench,
                                    max_tokens=args.max_tokens)  # fmt: skip
                res["benchmark"] = "gsm8k"
                print(f"{label:<14} gsm8k   items {res['items']:>3}  same completion {res['same_completion']:>3}  "
                      f"same verdict (strict/flexible) {res['same_verdict_strict']}/{res['same_verdict_flexible']}  "
                      f"danlu {res['danlu_accuracy']:.4f}  harness strict {res['harness_strict']:.4f} flexible "
                      f"{res['harness_flexible']:.4f}  ({time.time() - t0:.0f}s)")  # fmt: skip
                results.append({"checkpoint": label, **res})
                continue
            files = sorted((DATA / bench / "dev").glob("*.csv"))
            for header in headers:
                t0 = time.time()
                res = compare_multiple_choice(ckpt, bench, files, folder=tmp / label / f"{bench}_{header}",
                                              shots=args.shots, limit=args.limit, header=header)  # fmt: skip
                print(f"{label:<14} {bench:<7} header {header:<7}  items {res['items']:>3}  same prompt "
                      f"{res['same_prompt']:>3}  same choice {res['same_choice']:>3} ({res['agreement']:.2%})  "
                      f"max |Δloglik| {res['max_abs_loglik_diff']:.2e}  danlu {res['danlu_accuracy']:.4f}  "
                      f"harness {res['harness_accuracy']:.4f}  chance {res['chance']:.4f}  "
                      f"({time.time() - t0:.0f}s)")  # fmt: skip
                results.append({"checkpoint": label, **res})
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
