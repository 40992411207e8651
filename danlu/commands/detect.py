"""`danlu detect`: tell model-written from human-written text.

  danlu detect train --human FILES --machine FILES --from BACKBONE --out DIR [key=value …]
  danlu detect train --human FILES --generate-with CKPT|URL --prompts FILE --out DIR
  danlu detect score DIR TEXT|FILE …                      P(machine) per text, one JSON line each
  danlu detect score --zero-shot binoculars --model CKPT [--model2 CKPT] TEXT|FILE …
  danlu detect eval DIR|--zero-shot … --human FILES --machine FILES   AUROC, TPR@1%FPR, per language, short texts

key=value settings of train: max_tokens, eval_share, max_ratio, text_field, seed, and engine settings
(steps, batch_size, lr, device, …). Texts longer than max_tokens keep their first max_tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from danlu.commands._device import add_device_argument

HELP = "AI-text detector: train a classifier, score texts (also zero-shot), evaluate AUROC / TPR@1%%FPR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="fine-tune a backbone + two-label head on human and machine texts")
    t.add_argument("--human", nargs="+", required=True, help="human-written texts: files or folders")
    t.add_argument("--machine", nargs="*", default=[], help="machine-written texts: files or folders")
    t.add_argument("--from", dest="backbone", help="backbone checkpoint (danlu or HF causal LM; default: the "
                   "--generate-with checkpoint)")  # fmt: skip
    t.add_argument("--out", required=True, help="detector folder to write")
    t.add_argument(
        "--generate-with", help="checkpoint folder or OpenAI-compatible URL that writes machine text"
    )
    t.add_argument(
        "--prompts", help="prompts for --generate-with (prompt/instruction/question/messages records)"
    )
    t.add_argument("--max-prompts", type=int, default=0, help="use at most this many prompts (0: all)")
    t.add_argument("--api-model", help="model name for a --generate-with URL")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. steps=200 max_tokens=128")
    for name, what in (("score", "print P(machine) (or a zero-shot score) per text"),
                       ("eval", "AUROC and TPR@1%%FPR on labelled human and machine texts")):  # fmt: skip
        s = sub.add_parser(name, help=what)
        s.add_argument("--zero-shot", choices=["fast-detectgpt", "binoculars"], help="no trained detector: score "
                       "with one or two language models")  # fmt: skip
        s.add_argument("--model", help="--zero-shot: the scoring / observer checkpoint")
        s.add_argument(
            "--model2", help="--zero-shot: the reference / performer checkpoint (default: --model)"
        )
        s.add_argument(
            "--max-tokens", type=int, default=256, help="--zero-shot: texts keep their first N tokens"
        )
        s.add_argument("--text-field", default="text", help="field of the records that holds the text")
        add_device_argument(s)
        if name == "score":
            s.add_argument(
                "inputs", nargs="+", help="DIR (without --zero-shot), then texts or files of texts"
            )
        else:
            s.add_argument("detector", nargs="?", help="detector folder (without --zero-shot)")
            s.add_argument("--human", nargs="+", required=True, help="human-written texts: files or folders")
            s.add_argument(
                "--machine", nargs="+", required=True, help="machine-written texts: files or folders"
            )
            s.add_argument("--out", help="write the report here as JSON")


def _train(args: argparse.Namespace) -> int:
    from danlu import DanluError
    from danlu.commands._training import main_rank
    from danlu.config import apply_overrides, from_dict
    from danlu.detect.metrics import HUMAN, MACHINE
    from danlu.detect.texts import read_texts
    from danlu.detect.train import DetectConfig, train_detector
    from danlu.files import write_jsonl_atomic

    parsed = apply_overrides({}, [o.removeprefix("detect.") for o in args.overrides])
    own = set(DetectConfig.__dataclass_fields__) - {"train"}
    section: dict[str, Any] = {k: v for k, v in parsed.items() if k in own}
    section["train"] = {**{k: v for k, v in parsed.items() if k not in own and k != "train"},
                        **(parsed.get("train") or {})}  # fmt: skip
    section["resume"] = args.resume
    cfg = from_dict(DetectConfig, section, "detect")
    human = read_texts(args.human, HUMAN, cfg.text_field)
    machine = read_texts(args.machine, MACHINE, cfg.text_field) if args.machine else []
    backbone = args.backbone
    meta: dict[str, Any] = {"human": args.human, "machine": args.machine}
    if args.generate_with:
        from danlu.detect.generate import generate_machine_texts, read_prompts
        from danlu.detect.train import engine_config
        from danlu.engine import broadcast_from_main, init_distributed
        from danlu.synth.teacher import is_url, open_teacher

        if not args.prompts:
            raise DanluError("--generate-with needs --prompts FILE (what the model answers)")
        d = init_distributed(engine_config(cfg).device)
        made = []
        if d.main:  # under torchrun rank 0 alone samples (an endpoint is asked once), every rank trains on it
            teacher = open_teacher(args.generate_with, model=args.api_model)
            made, rows = generate_machine_texts(
                teacher, read_prompts(args.prompts, args.max_prompts), seed=cfg.seed
            )
            write_jsonl_atomic(Path(args.out).parent / f"{Path(args.out).name}.generated.jsonl", rows)
            print(f"[danlu] detect: {len(made)} machine texts from {teacher.name} "
                  f"(written to {args.out}.generated.jsonl)")  # fmt: skip
        machine += broadcast_from_main(made, d)
        meta["generated_with"] = args.generate_with
        backbone = backbone or (None if is_url(args.generate_with) else args.generate_with)
    elif args.prompts:
        raise DanluError("--prompts is for --generate-with")
    if not backbone:
        raise DanluError("detect train: give --from BACKBONE (a checkpoint folder or HF model to fine-tune)")
    result = train_detector(human, machine, backbone, args.out, cfg, meta)
    if not main_rank():  # under torchrun the report is rank 0's
        return 0
    print(json.dumps({k: v for k, v in result.items()}, ensure_ascii=False, indent=1))
    print(f"wrote {args.out}")
    return 0


def _scorer(args: argparse.Namespace, detector: str | None) -> tuple[Any, str]:
    """(object with .scores(texts) and .truncated, what its number means)."""
    from danlu import DanluError

    if args.zero_shot:
        from danlu.detect.zeroshot import open_zero_shot

        if not args.model:
            raise DanluError(f"--zero-shot {args.zero_shot} needs --model CKPT")
        return open_zero_shot(args.zero_shot, args.model, args.model2, args.max_tokens, args.device), "score"
    if not detector:
        raise DanluError("give a detector folder, or --zero-shot METHOD --model CKPT")
    from danlu.detect.classifier import Detector

    return Detector.load(detector, args.device), "p_machine"


def _inputs(items: list[str], text_field: str) -> list[str]:
    """An existing file (or folder) gives its records' texts; anything else is a text itself."""
    from danlu.detect.texts import read_texts

    out: list[str] = []
    for item in items:
        if len(item) < 4096 and Path(item).exists():
            out.extend(r.text for r in read_texts([item], 0, text_field))
        else:
            out.append(item)
    return out


def _score(args: argparse.Namespace) -> int:
    inputs = list(args.inputs)
    detector = None if args.zero_shot else inputs.pop(0)
    scorer, key = _scorer(args, detector)
    texts = _inputs(inputs, args.text_field)
    if not texts:
        from danlu import DanluError

        raise DanluError("detect score: no texts given")
    for text, value in zip(texts, scorer.scores(texts)):
        print(json.dumps({key: round(value, 6), "text": text[:80]}, ensure_ascii=False))
    if scorer.truncated:
        print(f"[danlu] detect: {scorer.truncated} text(s) longer than {scorer.max_tokens} tokens were scored on "
              "their first tokens", file=sys.stderr)  # fmt: skip
    return 0


def _eval(args: argparse.Namespace) -> int:
    from danlu.detect.metrics import HUMAN, MACHINE, report
    from danlu.detect.texts import read_texts
    from danlu.files import write_json_atomic

    scorer, _ = _scorer(args, args.detector)
    rows = read_texts(args.human, HUMAN, args.text_field) + read_texts(args.machine, MACHINE, args.text_field)
    texts = [r.text for r in rows]
    scores = scorer.scores(texts)
    counts = [len(scorer.tokenizer.backend.encode(t).ids) for t in texts]
    result = report(scores, [r.label for r in rows], texts, counts)
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "score": _score, "eval": _eval}[args.detect_command](args)


def _trains(args: argparse.Namespace) -> bool:
    return bool(args.detect_command == "train")


EVERY_RANK = _trains  # under torchrun `detect train` runs on every process, scoring on rank 0 alone (danlu.cli)
