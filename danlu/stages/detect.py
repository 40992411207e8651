"""Pipeline stage `detect`: an AI-text detector for the run's own chat model, and how far it can be trusted.

The run's SFT model (or `detect.model`) answers the world's SFT prompts at several sampling settings; the world's
own answers to the same prompts are the human text. The prompts are split before anything is generated: the
classifier (the same model as backbone + a two-label head, trained on the one engine) sees the answers to one part,
and is judged on the answers to the other part only, so no prompt is shared between training and evaluation.

It is judged three ways, the fine-tuned classifier beside the zero-shot Fast-DetectGPT (white-box: the model scores
and samples) and Binoculars (observer: the run's pretrain model when there is one, performer: the model):
(a) in distribution: the held-out prompts, same generator and sampling settings as in training;
(b) generators never seen in training: the same model at other temperatures, and every other finished chat model
    of the run (dpo, ppo, grpo, …, sampled at the first training setting), on the held-out prompts;
(c) real text from `../shared/data` (KdConv dialogue turns, classical poetry, chatterbot answers, tinyshakespeare
    passages as human text against the LLaMA-Factory alpaca demo outputs, which a GPT model wrote), skipped with the
    reason in the metrics where the folder is absent.
Why all three: detectors are known to be near perfect on the text they were trained on and to fail on other
generators, other sampling settings and other domains (issue 22); the stage reports that gap rather than one number.

Every figure is AUROC and TPR at 1% FPR with its row counts: `DIR/detect/results.json` has the full breakdown
(per language, short texts, 95% bootstrap intervals), `results.md` the table, and the stage metrics the `all` rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.detect.metrics import evaluate_scorers, results_markdown
from danlu.pipeline import StageContext

CHAT_STAGES = ("grpo", "ppo", "dpo", "sft")  # the chat models a run can hold, last stage first
SHARED_DATA = (
    Path(__file__).resolve().parents[3] / "shared" / "data"
)  # beside the project (development and CI)


@dataclass
class DetectStageConfig:
    model: str = "sft"  # the stage whose model writes the machine text and is the classifier's backbone
    unseen_models: list[str] | None = (
        None  # other chat stages as unseen generators; default: every finished one
    )
    prompts: int = 600  # world SFT prompts used (single-turn, no tool calls), before the split
    heldout_share: float = 0.2  # of the prompts, never seen by the classifier: (a) and (b) are scored on them
    settings: list[list[float]] = field(
        default_factory=lambda: [[0.7, 0.9], [1.0, 1.0]]
    )  # (temperature, top_p)
    unseen_settings: list[list[float]] = field(default_factory=lambda: [[0.3, 1.0], [1.3, 1.0]])
    max_new_tokens: int = 64  # length of the machine answers
    max_tokens: int = 128  # texts keep their first max_tokens tokens (classifier and zero-shot alike)
    zero_shot: bool = True  # Fast-DetectGPT and Binoculars beside the classifier
    real: int = 50  # human texts per real source (machine: 2× this per language); 0: no real-text set
    real_data: str | None = None  # default: ../shared/data beside the project
    eval_share: float = 0.1  # of the training texts, the classifier's own validation (before/after AUROC)
    batch_size: int = 32  # generation batch
    train: dict[str, Any] = field(default_factory=dict)  # engine settings of the classifier (steps, lr, …)


TRAIN_DEFAULTS: dict[str, Any] = {"steps": 150, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10}


def world_pairs(world: Path, limit: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, human answer) of the world's single-turn SFT dialogs without tool calls, answers of 2+ characters,
    each prompt once (a repeated prompt would put the same question on both sides of the split)."""
    path = world / "sft.jsonl"
    if not path.is_file():
        raise DanluError(f"detect: {path} is missing; the stage needs the world corpus' SFT dialogs")
    rows: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line).get("messages") or []
        if [m.get("role") for m in msgs] != ["user", "assistant"] or msgs[1].get("tool_calls"):
            continue
        answer = str(msgs[1].get("content") or "").strip()
        if len(answer) >= 2:
            rows.setdefault(str(msgs[0]["content"]), answer)
    pairs = sorted(rows.items())
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def read_real(root: Path, per_source: int, seed: int) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(human texts by source, machine texts, notes on sources that were missing) from ../shared/data."""
    rng = random.Random(seed)
    notes: list[str] = []
    human: dict[str, list[str]] = {}

    def take(name: str, rows: list[str]) -> None:
        if rows:
            rng.shuffle(rows)
            human[name] = rows[:per_source]
        else:
            notes.append(f"{name}: not found under {root}")

    kd: list[str] = []
    for f in sorted((root / "kdconv").glob("*/dev.json")):
        for dialog in json.loads(f.read_text(encoding="utf-8")):
            kd += [m["message"] for m in dialog.get("messages", []) if len(m.get("message", "")) >= 8]
    take("kdconv", kd)
    poems: list[str] = []
    for f in sorted((root / "chinese_poetry").rglob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        for p in data if isinstance(data, list) else []:
            body = p.get("paragraphs") or p.get("content") if isinstance(p, dict) else None
            if isinstance(body, list) and body:
                poems.append("".join(map(str, body)))
    take("poetry", poems)
    chat: list[str] = []
    files = sorted((root / "chatterbot_zh").glob("*.yml"))
    if files:
        import yaml

        for f in files:
            for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations") or []:
                chat += [str(t) for t in conv[1:] if len(str(t)) >= 4]
    take("chatterbot", chat)
    shakes_path = root / "tinyshakespeare" / "input.txt"
    shakes = []
    if shakes_path.is_file():
        text = shakes_path.read_text(encoding="utf-8")
        shakes = [p.strip() for p in text.split("\n\n") if 120 <= len(p.strip()) <= 600]
    take("tinyshakespeare", shakes)
    machine: list[str] = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        f = root / "llamafactory_demo" / name
        if not f.is_file():
            notes.append(f"llamafactory_demo/{name}: not found under {root}")
            continue
        rows = [
            str(r["output"])
            for r in json.loads(f.read_text(encoding="utf-8"))
            if len(str(r.get("output", "")).strip()) >= 8
        ]
        rng.shuffle(rows)
        machine += rows[: 2 * per_source]
    return human, machine, notes


def _settings(value: list[list[float]], name: str) -> tuple[tuple[float, float], ...]:
    out = []
    for s in value:
        if not isinstance(s, (list, tuple)) or len(s) != 2 or not all(isinstance(v, (int, float)) for v in s):
            raise DanluError(f"detect.{name}: each setting is [temperature, top_p], got {s!r}")
        t, p = float(s[0]), float(s[1])
        if t < 0 or not 0 < p <= 1:
            raise DanluError(f"detect.{name}: temperature must be ≥ 0 and top_p in (0, 1], got {s!r}")
        out.append((t, p))
    if not out:
        raise DanluError(f"detect.{name}: give at least one [temperature, top_p] setting")
    return tuple(out)


def _answers(teacher: Any, prompts: list[str], settings: tuple[tuple[float, float], ...], max_new: int,
             seed: int) -> list[str]:  # fmt: skip
    from danlu.detect.generate import generate_machine_texts

    texts, _ = generate_machine_texts(teacher, prompts, settings=settings, max_tokens=max_new, seed=seed)
    return [t.text for t in texts]


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`set/detector/auroc` and `…/tpr_at_1fpr` of the `all` slice, with each set's row counts: what the run report
    shows (headline first: the in-distribution classifier)."""
    out: dict[str, Any] = {}
    for setname, by_scorer in results.items():
        for scorer, rep in by_scorer.items():
            m = rep["all"]
            out[f"{setname}/{scorer}/auroc"] = m["auroc"]
            out[f"{setname}/{scorer}/tpr_at_1fpr"] = m["tpr_at_1fpr"]
        first = next(iter(by_scorer.values()))["all"]
        out[f"{setname}/n_human"], out[f"{setname}/n_machine"] = first["n_human"], first["n_machine"]
    return out


def read_config(section: dict[str, Any]) -> DetectStageConfig:
    return from_dict(DetectStageConfig, section, "detect")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.detect.classifier import Detector
    from danlu.detect.metrics import HUMAN, MACHINE
    from danlu.detect.texts import Text
    from danlu.detect.train import DetectConfig, engine_config, train_detector
    from danlu.engine import broadcast_from_main, init_distributed, resolve_device
    from danlu.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
    from danlu.io import is_checkpoint
    from danlu.synth.local import LocalTeacher

    cfg = read_config(ctx.cfg)
    settings, unseen_settings = (
        _settings(cfg.settings, "settings"),
        _settings(cfg.unseen_settings, "unseen_settings"),
    )
    if not 0 < cfg.heldout_share < 1:
        raise DanluError(f"detect.heldout_share {cfg.heldout_share}: must be between 0 and 1")
    if cfg.prompts < 10:
        raise DanluError(
            f"detect.prompts {cfg.prompts}: at least 10 (a train and a held-out part of each class)"
        )
    if cfg.model in (cfg.unseen_models or []):
        raise DanluError(
            f"detect.unseen_models: {cfg.model!r} is the training generator itself (detect.model)"
        )
    seed = int(ctx.recipe.get("seed", 0) or 0)
    model_dir = ctx.input(cfg.model)
    if not is_checkpoint(model_dir):
        raise DanluError(f"detect.model {cfg.model!r}: {model_dir} holds no model checkpoint (an adapter folder or a "
                         "non-model stage); name a stage that wrote a full model, e.g. sft")  # fmt: skip
    pairs = world_pairs(ctx.input("world"), cfg.prompts, seed)
    cut = int(round((1 - cfg.heldout_share) * len(pairs)))
    train_pairs, held_pairs = pairs[:cut], pairs[cut:]
    if len(train_pairs) < 4 or len(held_pairs) < 2:
        raise DanluError(f"detect: {len(pairs)} usable world prompts give {len(train_pairs)} for training and "
                         f"{len(held_pairs)} held out; raise detect.prompts or the world scale")  # fmt: skip
    for stage in cfg.unseen_models or []:
        if not (ctx.has(stage) and is_checkpoint(ctx.run_dir / stage)):
            raise DanluError(f"detect.unseen_models: stage {stage!r} has no finished model in {ctx.run_dir}")
    dcfg = DetectConfig(max_tokens=cfg.max_tokens, eval_share=cfg.eval_share, seed=seed, train=cfg.train)
    tcfg = engine_config(dcfg, ctx.recipe, TRAIN_DEFAULTS)  # the one rule: stages.common.train_config
    device = str(resolve_device(tcfg.device))
    # Under torchrun rank 0 alone samples and scores (one process's texts and figures); every rank trains.
    d = init_distributed(tcfg.device)
    held_prompts = [p for p, _ in held_pairs]
    held_human = [a for _, a in held_pairs]
    classifier = ctx.out / "classifier"
    machine_train: list[str] = []
    if d.main:
        ctx.out.mkdir(parents=True, exist_ok=True)
        teacher = LocalTeacher(model_dir, batch_size=cfg.batch_size, device=device)
        print(f"[danlu] detect: {cfg.model} answers {len(train_pairs)} training + {len(held_pairs)} held-out world "
              f"prompts at (T, top_p) {list(settings)}; unseen settings {list(unseen_settings)}")  # fmt: skip
        machine_train = _answers(teacher, [p for p, _ in train_pairs], settings, cfg.max_new_tokens, seed * 7 + 1)
        machine_held = _answers(teacher, held_prompts, settings, cfg.max_new_tokens, seed * 7 + 2)
        machine_unseen_t = _answers(teacher, held_prompts, unseen_settings, cfg.max_new_tokens, seed * 7 + 3)
        del teacher
        write_jsonl_atomic(ctx.out / "machine_train.jsonl", [{"text": t} for t in machine_train])
        if classifier.exists():  # a rerun regenerates its machine text, so an earlier classifier is not resumed
            import shutil

            shutil.rmtree(classifier)
    machine_train = broadcast_from_main(machine_train, d)
    trained = train_detector([Text(a, HUMAN, "world") for _, a in train_pairs],
                             [Text(t, MACHINE, cfg.model) for t in machine_train], model_dir, classifier, dcfg,
                             {"generator": cfg.model, "settings": [list(s) for s in settings]}, tcfg)  # fmt: skip
    if not d.main:
        return {}

    scorers: dict[str, Any] = {"fine-tuned": Detector.load(classifier, device)}
    notes: dict[str, str] = {}
    if cfg.zero_shot:
        from danlu.detect.zeroshot import open_zero_shot

        scorers["fast-detectgpt"] = open_zero_shot("fast-detectgpt", model_dir, None, cfg.max_tokens, device)
        observer = ctx.run_dir / "pretrain"
        if ctx.has("pretrain") and is_checkpoint(observer) and cfg.model != "pretrain":
            scorers["binoculars"] = open_zero_shot("binoculars", observer, model_dir, cfg.max_tokens, device)
        else:
            scorers["binoculars"] = open_zero_shot("binoculars", model_dir, None, cfg.max_tokens, device)
            notes["binoculars"] = f"no pretrain model: {cfg.model} is both observer and performer"

    results: dict[str, dict[str, Any]] = {}
    results["a_in_distribution"] = evaluate_scorers(scorers, held_human, machine_held)
    results["b_unseen_temperature"] = evaluate_scorers(scorers, held_human, machine_unseen_t)
    candidates = (
        cfg.unseen_models if cfg.unseen_models is not None else [s for s in CHAT_STAGES if s != cfg.model]
    )
    for stage in candidates:
        folder = ctx.run_dir / stage
        if not (ctx.has(stage) and is_checkpoint(folder)):
            continue  # the default list: stages this run did not have
        other = LocalTeacher(folder, batch_size=cfg.batch_size, device=device)
        texts = _answers(other, held_prompts, settings[:1], cfg.max_new_tokens, seed * 7 + 4)
        results[f"b_unseen_model_{stage}"] = evaluate_scorers(scorers, held_human, texts)
    if not any(k.startswith("b_unseen_model_") for k in results):
        notes["b_unseen_model"] = (f"no other finished chat model among {', '.join(candidates) or 'none'}; only "
                                   "unseen temperatures measure an unseen generator")  # fmt: skip

    root = Path(cfg.real_data) if cfg.real_data else SHARED_DATA
    if cfg.real <= 0:
        notes["c_real"] = "detect.real is 0"
    elif not root.is_dir():
        notes["c_real"] = f"{root} is absent (the real datasets are there in development and CI only)"
    else:
        human_real, machine_real, missing = read_real(root, cfg.real, seed)
        flat_human = [t for rows in human_real.values() for t in rows]
        if flat_human and machine_real:
            results["c_real"] = evaluate_scorers(scorers, flat_human, machine_real)
            if missing:
                notes["c_real"] = "; ".join(missing)
        else:
            notes["c_real"] = "; ".join(missing) or f"no usable texts under {root}"
    for key, why in notes.items():
        print(f"[danlu] detect: {key}: {why}")

    write_json_atomic(ctx.out / "results.json", {"results": results, "notes": notes,
                                                  "train": {k: v for k, v in trained.items() if k != "heldout"}})  # fmt: skip
    md = results_markdown(results)
    write_text_atomic(ctx.out / "results.md", md)
    print(md)
    metrics: dict[str, Any] = flat_metrics(results)
    metrics.update({"classifier": str(classifier), "train_human": len(train_pairs), "train_machine": len(machine_train),
                    "steps": trained.get("steps"), "train_loss": trained.get("train_loss"),
                    "heldout_auroc_before": trained.get("heldout_auroc_before")})  # fmt: skip
    metrics.update({f"{k}/skipped": v for k, v in notes.items()})
    return metrics
