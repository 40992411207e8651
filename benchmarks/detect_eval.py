"""The AI-text detector measured three ways, fine-tuned and zero-shot side by side (issue 22):

(a) in distribution: human answers of the world's SFT dialogs vs the run's SFT model answering the same prompts at
    T=0.7/top-p 0.9 and T=1.0; the detector trains on 80% of the prompts and is scored on the other 20%;
(b) unseen generators on those held-out prompts: the same SFT model at T=0.3 and T=1.3, and the run's DPO model;
(c) real text from ../shared/data: human = KdConv utterances, Chinese poetry, chatterbot answers, tinyshakespeare
    passages; machine = the LLaMA-Factory alpaca demo outputs (GPT-written), en + zh.

Scorers: the fine-tuned classifier (backbone = the run's SFT model), Fast-DetectGPT (white-box: the SFT model scores
and samples) and Binoculars (observer = the run's pretrain model, performer = its SFT model). Each figure is AUROC with
a 95% bootstrap interval, TPR at 1% FPR, and its row counts, overall, per language and for texts under 50 tokens.

  danlu run smoke --out /tmp/smoke_detect
  python benchmarks/detect_eval.py --run /tmp/smoke_detect --out /tmp/detect_bench
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def world_pairs(run: Path, limit: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, human answer) of single-turn world SFT dialogs without tool calls, answers of 2+ characters."""
    rows = []
    for line in (run / "world" / "sft.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        if [m["role"] for m in msgs] != ["user", "assistant"] or msgs[1].get("tool_calls"):
            continue
        if len(msgs[1]["content"].strip()) >= 2:
            rows.append((msgs[0]["content"], msgs[1]["content"].strip()))
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def real_human(per_source: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    kd = []
    for topic in ("film", "music", "travel"):
        for dialog in json.loads((SHARED / "kdconv" / topic / "dev.json").read_text(encoding="utf-8")):
            kd += [m["message"] for m in dialog["messages"] if len(m["message"]) >= 8]
    poems = []
    for f in sorted((SHARED / "chinese_poetry").rglob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        for p in data if isinstance(data, list) else []:
            body = p.get("paragraphs") or p.get("content")
            if isinstance(body, list) and body:
                poems.append("".join(body))
    import yaml

    chat = []
    for f in sorted((SHARED / "chatterbot_zh").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            chat += [str(t) for t in conv[1:] if len(str(t)) >= 4]
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    shakes = [p.strip() for p in text.split("\n\n") if 120 <= len(p.strip()) <= 600]
    for name, rows in (("kdconv", kd), ("poetry", poems), ("chatterbot", chat), ("tinyshakespeare", shakes)):
        rng.shuffle(rows)
        out[name] = rows[:per_source]
    return out


def real_machine(per_language: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        rows = [r["output"] for r in json.loads((SHARED / "llamafactory_demo" / name).read_text(encoding="utf-8"))
                if len(r["output"].strip()) >= 8]  # fmt: skip
        rng.shuffle(rows)
        out += rows[:per_language]
    return out


def answers(ckpt: Path, prompts: list[str], temperature: float, top_p: float, seed: int) -> list[str]:
    from danlu.detect.generate import generate_machine_texts
    from danlu.synth.local import LocalTeacher

    teacher = LocalTeacher(ckpt, batch_size=32)
    texts, _ = generate_machine_texts(
        teacher, prompts, settings=((temperature, top_p),), max_tokens=64, seed=seed
    )
    return [t.text for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, required=True, help="a `danlu run smoke|tiny` folder (world, pretrain, sft)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument(
        "--real", type=int, default=75, help="human texts per real source (machine: 2× per language)"
    )
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED}: the real datasets are absent (development and CI only)")
    from _common import machine as machine_desc

    from danlu.detect.classifier import Detector
    from danlu.detect.metrics import HUMAN, MACHINE, evaluate_scorers, results_markdown
    from danlu.detect.texts import Text
    from danlu.detect.train import DetectConfig, train_detector
    from danlu.detect.zeroshot import open_zero_shot

    t0 = time.time()
    sft, pre, dpo = args.run / "sft", args.run / "pretrain", args.run / "dpo"
    pairs = world_pairs(args.run, args.prompts, args.seed)
    cut = int(0.8 * len(pairs))
    train_pairs, held_pairs = pairs[:cut], pairs[cut:]
    half = len(train_pairs) // 2
    train_machine = answers(sft, [p for p, _ in train_pairs[:half]], 0.7, 0.9, 1) + answers(
        sft, [p for p, _ in train_pairs[half:]], 1.0, 1.0, 2
    )
    held_prompts = [p for p, _ in held_pairs]
    held_half = len(held_prompts) // 2
    held_machine = answers(sft, held_prompts[:held_half], 0.7, 0.9, 3) + answers(
        sft, held_prompts[held_half:], 1.0, 1.0, 4
    )
    human_train = [Text(a, HUMAN, "world") for _, a in train_pairs]
    det_dir = args.out / "detector"
    cfg = DetectConfig(max_tokens=128, eval_share=0.1, seed=args.seed,
                       train={"steps": args.steps, "batch_size": 16, "lr": 1e-3, "progress": False})  # fmt: skip
    train_result = train_detector(
        human_train, [Text(t, MACHINE, "sft") for t in train_machine], sft, det_dir, cfg
    )
    scorers = {
        "fine-tuned": Detector.load(det_dir),
        "fast-detectgpt": open_zero_shot("fast-detectgpt", sft, None, 128),
        "binoculars": open_zero_shot("binoculars", pre, sft, 128),
    }
    held_human = [a for _, a in held_pairs]
    results: dict[str, Any] = {"a_in_distribution": evaluate_scorers(scorers, held_human, held_machine)}
    unseen = answers(sft, held_prompts, 0.3, 1.0, 5) + answers(sft, held_prompts, 1.3, 1.0, 6)
    results["b_sft_T0.3_T1.3"] = evaluate_scorers(scorers, held_human, unseen)
    if dpo.is_dir():
        results["b_dpo_model"] = evaluate_scorers(
            scorers, held_human, answers(dpo, held_prompts, 0.7, 0.9, 7)
        )
    human_real = real_human(args.real, args.seed)
    results["c_real"] = evaluate_scorers(scorers, [t for rows in human_real.values() for t in rows],
                                 real_machine(2 * args.real, args.seed))  # fmt: skip
    summary = {
        "machine": machine_desc(),
        "run": str(args.run),
        "config": {
            "prompts": len(pairs),
            "train_prompts": len(train_pairs),
            "steps": args.steps,
            "max_tokens": 128,
            "real_per_source": args.real,
            "real_sources": {k: len(v) for k, v in human_real.items()},
        },  # fmt: skip
        "train": {k: v for k, v in train_result.items() if k != "heldout"},
        "results": results,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect_eval.json").write_text(
        json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    md = results_markdown(results)
    (args.out / "detect_eval.md").write_text(md + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, ensure_ascii=False))
    print(md)


if __name__ == "__main__":
    main()
