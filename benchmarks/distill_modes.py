"""The distillation options side by side: the same pruned student, the same steps and rows, from the same teacher.

python benchmarks/distill_modes.py --teacher /tmp/compress_teacher \
    --data /tmp/compress_run/world/pretrain.jsonl --eval-data /tmp/compress_run/world/pretrain_val.jsonl

Modes (compress.distill): logits (forward KL on the live teacher's full logits, T = 1), topk (the same loss on the
teacher's cached top-k log-probs + a tail bucket; the cache is built once, timed apart), sequence (cross-entropy on
continuations the teacher samples, Kim & Rush), on_policy (TRL's GKD: with probability λ the student samples the
continuations, generalized JSD(β) on them, else the data rows). Each distils a fresh copy of one pruned student
(the teacher pruned to `--ratio` by compress's importance, as `danlu compress` does) for `--steps` steps of
`--batch` rows, reading the same rows in the same order. Reported per mode: held-out KL(teacher‖student) per token
(16 rows of the held-out texts), held-out bits-per-byte (`danlu.eval.bpb`, with its 95% interval), seconds per
step (the engine's time in steps: data, generation, forward, backward, optimizer) and its ratio to logits mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine  # noqa: E402

from danlu.compress.distill import DistillConfig, PackedRows, distill, heldout_kl  # noqa: E402
from danlu.compress.importance import measure_importance  # noqa: E402
from danlu.compress.prune import prune, shape_for_ratio  # noqa: E402
from danlu.engine import TrainConfig, set_seed  # noqa: E402
from danlu.eval.bpb import evaluate_bpb, text_batches  # noqa: E402
from danlu.files import read_records  # noqa: E402
from danlu.io import load_checkpoint  # noqa: E402


def modes(args: argparse.Namespace) -> dict[str, dict]:
    gen = {"prompt_tokens": args.prompt_tokens, "gen_temperature": 1.0}
    return {
        "logits": {},
        f"topk {args.topk}": {"topk": args.topk},
        "sequence": {"mode": "sequence", **gen},
        f"on_policy λ={args.lmbda} β={args.beta}": {
            "mode": "on_policy",
            "lmbda": args.lmbda,
            "beta": args.beta,
            **gen,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher checkpoint folder")
    ap.add_argument("--data", required=True, help="distillation texts (.jsonl with a text field)")
    ap.add_argument("--eval-data", required=True, help="held-out texts (.jsonl with a text field)")
    ap.add_argument("--texts", type=int, default=1500, help="distillation texts read from --data")
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--lmbda", type=float, default=0.5)
    ap.add_argument(
        "--beta", type=float, default=0.0, help="on_policy's β (0: forward KL, logits mode's loss)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only the modes whose names start with these words")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.teacher, quiet=True)
    teacher, tok = ckpt.model.eval(), ckpt.tokenizer
    texts = [str(r["text"]) for _, r in zip(range(args.texts), read_records(Path(args.data)))]
    held_texts = [str(r["text"]) for r in read_records(Path(args.eval_data))]
    seq_len = min(args.seq_len, teacher.config.max_position_embeddings)
    set_seed(0)
    calibration = list(text_batches(tok, texts, seq_len, 16, 64 * seq_len))
    shape = shape_for_ratio(teacher.config, args.ratio, 64)
    student, _ = prune(teacher, measure_importance(teacher, calibration), shape)
    held = list(text_batches(tok, held_texts, seq_len, 16, 16 * seq_len))
    rows = PackedRows.from_texts(tok, texts, seq_len, args.batch, 0)
    print(f"machine: {machine()}")
    print(f"teacher {args.teacher}: {sum(p.numel() for p in teacher.parameters()):,} parameters; student (ratio "
          f"{args.ratio}): {sum(p.numel() for p in student.parameters()):,}; {len(rows.x)} rows of {seq_len} tokens; "
          f"{args.steps} steps × {args.batch} rows, lr {args.lr}; held-out KL (fp32 teacher) on "
          f"{sum(len(b['input_ids']) for b in held)} rows, bpb on up to {args.eval_tokens:,} tokens of "
          f"{args.eval_data}\n")  # fmt: skip

    def bpb(model: torch.nn.Module) -> dict:
        return evaluate_bpb(model.float().eval(), tok, args.eval_data, seq_len=seq_len, max_tokens=args.eval_tokens)  # fmt: skip

    base = bpb(copy.deepcopy(student))
    kl0 = heldout_kl(student.eval(), teacher, held)
    print("| mode | held-out KL | bpb (95% interval) | s/step | × logits | teacher cache |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| pruned, not distilled | {kl0:.4f} | {base['bpb']:.4f} ({base['ci95'][0]:.4f}–{base['ci95'][1]:.4f}) "
          "| – | – | – |", flush=True)  # fmt: skip
    results, first = {}, None
    with tempfile.TemporaryDirectory(prefix="danlu-distill-modes-") as tmp:
        for name, extra in modes(args).items():
            if args.only and not any(name.startswith(w) for w in args.only):
                continue
            cfg = DistillConfig(seq_len=seq_len, **extra)
            tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, device="cpu", compile="off",
                               warmup_steps=max(1, args.steps // 10), eval_every=0, save_minutes=0, progress=False,
                               log_every=args.steps, threads=args.threads)  # fmt: skip
            out = Path(tmp) / name.split()[0]
            t0 = time.perf_counter()
            data = PackedRows.from_texts(tok, texts, seq_len, args.batch, 0)  # the same rows, the same order
            # a copy: distill casts its teacher to the training dtype (bf16 where the CPU has it) for good
            res = distill(copy.deepcopy(student), copy.deepcopy(teacher), data, out, tcfg=tcfg, cfg=cfg, tokenizer=tok,
                          meta={"stage": "benchmark"})  # fmt: skip
            wall = time.perf_counter() - t0
            speed = next(r for r in read_records(out / "metrics.jsonl") if r.get("event") == "speed")
            step_s = speed["train_seconds"] / res["steps"]
            first = first or step_s
            distilled = load_checkpoint(out, quiet=True).model.float().eval()
            kl = heldout_kl(distilled, teacher, held)
            b = bpb(distilled)
            cache = f"{res['teacher_cache_s']:.1f} s" if "teacher_cache_s" in res else "–"
            results[name] = {"heldout_kl": kl, "bpb": b["bpb"], "bpb_ci95": b["ci95"], "s_per_step": step_s,
                             "wall_s": wall, **{k: v for k, v in res.items() if k not in ("heldout_kl_before",
                                                                                          "heldout_kl_after")}}  # fmt: skip
            print(f"| {name} | {kl:.4f} | {b['bpb']:.4f} ({b['ci95'][0]:.4f}–{b['ci95'][1]:.4f}) | {step_s:.3f} | "
                  f"{step_s / first:.2f} | {cache} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pruned": {"heldout_kl": kl0, **base},
                                               "modes": results}, indent=2, ensure_ascii=False))  # fmt: skip


if __name__ == "__main__":
    main()
