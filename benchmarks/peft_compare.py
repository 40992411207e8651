"""Full SFT vs LoRA, DoRA and P-tuning from the same pretrained model, on the same data, for the same steps.

The table peft's own method comparison writes: method, trainable parameters (and their share of the model),
checkpoint bytes (the adapter file; the whole model for full SFT), peak memory (RSS of the process that trained
it), step time, held-out chat facts and translation (the world corpus' held-out sets, greedy, as the SFT stage
scores them) and forgetting: held-out pretraining bits-per-byte before and after.

Each method trains in its own process (so peak RSS is its own), with the recipe's `sft` section (default: the
`peft` recipe) and only the method, and its learning rate, changed. The base is the recipe's pretrain run in --run;
it is built first when missing (`danlu run RECIPE --out RUN --only world data tokenizer tokens pretrain`).

  python benchmarks/peft_compare.py --run runs/peft                  # the peft recipe, 60 SFT steps each
  python benchmarks/peft_compare.py --run runs/peft --steps 200 --methods full lora
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("full", "lora", "dora", "ptuning")
# Adapters move a few weights from where full fine-tuning would: they take a larger step (the usual practice, and
# what peft's comparison does: each method at its own learning rate). Override with --lr METHOD=VALUE.
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "dora": 3e-3, "ptuning": 1e-2}
BASE_STAGES = ["world", "data", "tokenizer", "tokens", "pretrain"]


def trainable_parameters(parent: Path, peft: dict[str, Any]) -> tuple[int, int]:
    """(trainable, total) parameters of the base with the method's adapter attached (all of them for full SFT)."""
    from danlu.adapters import attach, peft_spec
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(parent, quiet=True)
    unique = {id(p): p.numel() for p in ckpt.model.parameters()}  # tied embeddings count once
    total = sum(unique.values())
    if not peft:
        return total, total
    adapter = attach(ckpt, peft_spec(peft, "sft.peft"), parent, "sft.peft", quiet=True)
    return adapter.trainable_parameters(), total


def step_seconds(out: Path) -> float:
    """Median seconds per optimizer step between consecutive logged train events (the load on a shared machine
    comes and goes; the median drops the intervals that caught a stall or an evaluation)."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("event") == "train"]
    per = [
        (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in zip(train, train[1:])
        if b["step"] > a["step"]
    ]
    return statistics.median(per) if per else math.nan


def figure(result: dict[str, Any], quantity: str) -> float | None:
    """A held-out quantity's value from the SFT stage's dev-split figures (danlu.eval.world), None if not scored."""
    fig = (result.get("heldout") or {}).get(quantity)
    return None if fig is None else fig["value"]


def checkpoint_bytes(out: Path, full: bool) -> int:
    """What a user keeps: the adapter file (peft's), or the whole model for full fine-tuning."""
    names = ["model.safetensors"] if full else ["adapter_model.safetensors"]
    files = [p for n in names for p in [out / n] if p.exists()] or list(out.glob("model-*.safetensors"))
    return sum(p.stat().st_size for p in files)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Trains one method in this process and returns its row."""
    from danlu.config import apply_overrides, from_dict, load_recipe
    from danlu.stages.sft import SFTConfig, sft

    method, run = args.one, Path(args.run)
    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    section = {k: v for k, v in dict(recipe.get("sft") or {}).items() if k != "enabled"}
    peft = {} if method == "full" else {**(section.get("peft") or {}), "method": method}
    if method == "ptuning":
        peft.setdefault("virtual_tokens", args.virtual_tokens)
    lr = args.lr_of[method]
    section.update(peft=peft, resume="false", eval_limit=args.eval_limit)
    section["train"] = {**(section.get("train") or {}), "steps": args.steps, "lr": lr, "eval_every": args.steps,
                        "sample_every": 0, "save_every": 0, "progress": False}  # fmt: skip
    cfg = from_dict(SFTConfig, section, "sft")
    parent = run / "pretrain"
    trainable, total = trainable_parameters(parent, peft)
    out = Path(args.out) / method
    t0 = time.perf_counter()
    res = sft(parent, [run / "world" / "sft.jsonl"], out, recipe=recipe, cfg=cfg, tokens_dir=run / "tokens",
              eval_dir=run / "world" / "eval")  # fmt: skip
    before, after = res.get("pretrain_val_bpb_before"), res.get("pretrain_val_bpb_after")
    return {
        "method": method, "lr": lr, "steps": res["steps"], "trainable": trainable, "total": total,
        "trainable_share": trainable / total, "bytes": checkpoint_bytes(out, method == "full"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": step_seconds(out), "wall_s": time.perf_counter() - t0,
        "chat_facts": figure(res, "facts_chat"), "chat_translation": figure(res, "translation"),
        "chat_arithmetic": figure(res, "arithmetic_chat_unseen"), "eval_rows": args.eval_limit,
        "bpb_before": before, "bpb_after": after,
        "forgetting": after - before if before is not None and after is not None else None,
        "val_loss_end": res.get("val_loss_end"),
    }  # fmt: skip


def ensure_base(args: argparse.Namespace) -> None:
    run = Path(args.run)
    if (run / "pretrain" / "stage.json").exists():
        return
    print(f"[peft_compare] building the base in {run} (recipe {args.recipe})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "danlu", "run", args.recipe, "--out", str(run), "--only", *BASE_STAGES,
                    *args.overrides], check=True)  # fmt: skip


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | lr | trainable params | share | checkpoint bytes | peak RSS MB | step s | held-out dialog loss | "
            "chat facts | translation | pretrain bpb before → after (Δ) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_share']:.2%} | {r['bytes']:,} | "
            f"{r['peak_rss_mb']:.0f} | {fmt(r['step_s'], '.3f')} | {fmt(r['val_loss_end'], '.3f')} | "
            f"{fmt(r['chat_facts'], '.3f')} | "
            f"{fmt(r['chat_translation'], '.3f')} | {fmt(r['bpb_before'], '.4f')} → {fmt(r['bpb_after'], '.4f')} "
            f"({fmt(r['forgetting'], '+.4f')}) |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str:
    """The issue's goal, checked on the measured numbers: LoRA ≥ 90% of full SFT's held-out chat accuracy (facts
    and translation averaged), ≤ 5% of the parameters trainable, and less forgetting."""
    by = {r["method"]: r for r in rows}
    if "full" not in by or "lora" not in by:
        return "goal: needs both full and lora rows"
    full, lora = by["full"], by["lora"]

    def chat(r: dict[str, Any]) -> float:
        vals = [v for v in (r["chat_facts"], r["chat_translation"]) if v is not None]
        return sum(vals) / len(vals) if vals else math.nan

    ratio = chat(lora) / chat(full) if chat(full) else math.nan
    less = (
        lora["forgetting"] is not None
        and full["forgetting"] is not None
        and lora["forgetting"] < full["forgetting"]
    )
    reached = ("undecided: full SFT scores 0 at this scale" if math.isnan(ratio)
               else "met" if ratio >= 0.9 else "NOT met")  # fmt: skip
    parts = [f"LoRA/full held-out chat accuracy {fmt(ratio, '.0%')} (goal ≥ 90%: {reached}); held-out dialog loss "
             f"{fmt(lora['val_loss_end'], '.3f')} vs full {fmt(full['val_loss_end'], '.3f')}",
             f"trainable {lora['trainable_share']:.2%} (goal ≤ 5%: {'met' if lora['trainable_share'] <= 0.05 else 'NOT met'})",
             f"forgetting Δbpb {fmt(lora['forgetting'], '+.4f')} vs full {fmt(full['forgetting'], '+.4f')} "
             f"(goal less: {'met' if less else 'NOT met'})"]  # fmt: skip
    return "goal: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/peft", help="run folder holding the base (world … pretrain)")
    ap.add_argument(
        "--recipe", default="peft", help="recipe whose base and sft section to use (default: peft)"
    )
    ap.add_argument(
        "--out", default=None, help="where the methods' checkpoints and the table go (RUN/peft_compare)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=60, help="SFT steps, the same for every method")
    ap.add_argument("--eval-limit", type=int, default=100, help="rows per held-out chat set")
    ap.add_argument("--virtual-tokens", type=int, default=20, help="P-tuning's virtual tokens")
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="learning rate per method")
    ap.add_argument("--render", action="store_true", help="only rewrite the table from OUT/peft_compare.json")
    ap.add_argument(
        "--one", default=None, help=argparse.SUPPRESS
    )  # internal: train one method in this process
    ap.add_argument("overrides", nargs="*", help="recipe overrides (key=value), e.g. sft.peft.r=16")
    args = ap.parse_args()
    args.out = args.out or str(Path(args.run) / "peft_compare")
    args.lr_of = dict(DEFAULT_LR)
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            ap.error(f"--lr {item!r}: expected METHOD=VALUE with METHOD one of {', '.join(METHODS)}")
        args.lr_of[name] = float(value)
    if args.one:
        print("PEFT_ROW " + json.dumps(run_one(args)))
        return
    from _common import machine

    out = Path(args.out)
    rows = json.loads((out / "peft_compare.json").read_text()) if args.render else []
    if not args.render:
        ensure_base(args)
    for method in [] if args.render else args.methods:
        cmd = [sys.executable, __file__, "--one", method, "--run", args.run, "--recipe", args.recipe, "--out",
               args.out, "--steps", str(args.steps), "--eval-limit", str(args.eval_limit), "--virtual-tokens",
               str(args.virtual_tokens), "--lr", *(f"{k}={v}" for k, v in args.lr_of.items()), "--",
               *args.overrides]  # fmt: skip
        print(f"[peft_compare] {method} …", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEFT_ROW ")]
        if proc.returncode or not found:
            sys.exit(
                f"[peft_compare] {method} failed (exit {proc.returncode}); its output:\n{proc.stdout[-2000:]}"
            )
        rows.append(json.loads(found[-1].removeprefix("PEFT_ROW ")))
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted({r["steps"] for r in rows})
    header = (f"machine: {machine()}\nbase: {Path(args.run) / 'pretrain'} (recipe {args.recipe}); "
              f"{'/'.join(map(str, steps))} SFT steps per method, held-out chat sets {rows[0]['eval_rows']} rows each; "
              "held-out dialog loss: mean loss per answer token on the SFT data's held-out dialogs")  # fmt: skip
    text = f"{header}\n\n{table(rows)}\n\n{verdict(rows)}\n"
    (out / "peft_compare.md").write_text(text, encoding="utf-8")
    (out / "peft_compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
