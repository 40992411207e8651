"""Fine-tuning the detector on the one engine: class-balanced batches, cross-entropy over {human, machine}, held-out
AUROC and TPR@1%FPR before and after, and an HF sequence-classification folder as the result.

The data policies (fields, duplicates, balance, truncation) are in danlu.detect.texts; this module wires them to
danlu.engine.Trainer, which brings precision, resume, atomic saves, metrics.jsonl and the progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from danlu import DanluError
from danlu.detect.metrics import HUMAN, MACHINE, auroc, report
from danlu.detect.texts import BalancedBatches, Text, clean_classes, encode_truncated, split

TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 100, "batch_size": 16, "lr": 2e-4, "warmup_steps": 10, "log_every": 10, "weight_decay": 0.0,
}  # fmt: skip


@dataclass
class DetectConfig:
    max_tokens: int = (
        256  # texts keep their first max_tokens tokens (and never more than the backbone's context)
    )
    eval_share: float = 0.1  # of each class, held out for the before/after numbers
    max_ratio: float = 10.0  # refuse when one class is more than this many times smaller than the other
    text_field: str = "text"
    seed: int = 0
    resume: bool | str = False  # true, false or auto (continue an unfinished run with the same settings)
    train: dict[str, Any] = field(default_factory=dict)  # engine settings (steps, batch_size, lr, device, …)


def engine_config(
    cfg: DetectConfig, recipe: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> Any:
    """The detector's TrainConfig by the one precedence rule of every stage (`stages.common.train_config`):
    `cfg.train` > the recipe's `train:` and top-level seed/device/dtype/compile > `defaults` (the pipeline stage's)
    > the detector's own (`TRAIN_DEFAULTS`, seed `cfg.seed`) > the engine's. Evaluates before and after at least."""
    from danlu.stages.common import train_config

    defaults = {**TRAIN_DEFAULTS, "seed": cfg.seed, **(defaults or {})}
    tcfg = train_config(recipe or {}, cfg.train, "detect", defaults)
    if not tcfg.eval_every or tcfg.eval_every > tcfg.steps:
        tcfg.eval_every = tcfg.steps  # before and after
    return tcfg


def _encode(rows: list[Text], tokenizer: Any, max_tokens: int, vocab: int, backbone: str) -> tuple[list, int]:
    """Ids of the texts (cut to max_tokens) and how many were cut; an id beyond the embedding is an error."""
    ids, cut = encode_truncated(tokenizer, [r.text for r in rows], max_tokens)
    top = max((max(r) for r in ids), default=0)
    if top >= vocab:
        raise DanluError(f"{backbone}: its tokenizer gives token id {top}, but the model's embedding has {vocab} rows: "
                         "the tokenizer does not belong to this backbone (use the tokenizer it was trained with)")  # fmt: skip
    return ids, cut


@torch.no_grad()
def heldout_scores(model: Any, rows: list[list[int]], pad_id: int, batch: int = 16) -> list[float]:
    from danlu.detect.texts import pad_right

    device = model.score.weight.device
    out: list[float] = []
    for s in range(0, len(rows), batch):
        logits = model(pad_right(rows[s : s + batch], pad_id).to(device))
        out.extend(F.softmax(logits, -1)[:, MACHINE].tolist())
    return out


def train_detector(
    human: list[Text], machine: list[Text], backbone: str | Path, out: str | Path, cfg: DetectConfig,
    extra_meta: dict[str, Any] | None = None, tcfg: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Trains and saves a detector in `out`; returns the held-out report (overall, per language, short texts).
    `tcfg`: the engine settings when the caller built them (`engine_config` with its recipe), else from `cfg`.
    Under torchrun each rank reads its own rows of every global batch; every rank scores all held-out rows (the
    same numbers: AUROC does not split over ranks, and FSDP needs every rank in each forward), rank 0 writes."""
    from danlu.detect.classifier import SequenceClassifier, save_classifier
    from danlu.engine import Hooks, Trainer, init_distributed, resume_wanted, set_seed
    from danlu.files import write_json_atomic
    from danlu.io import load_checkpoint, update_meta_metrics

    out = Path(out)
    tcfg = tcfg or engine_config(cfg)
    d = init_distributed(tcfg.device)
    set_seed(tcfg.seed)
    human, machine = clean_classes(human, machine, cfg.max_ratio)
    h_train, h_held = split(human, cfg.eval_share, cfg.seed)
    m_train, m_held = split(machine, cfg.eval_share, cfg.seed + 1)
    ckpt = load_checkpoint(backbone, quiet=True)
    tok = ckpt.tokenizer
    if tok.pad_id is None:
        raise DanluError(f"{backbone}: its tokenizer has no pad token (nor an eos to pad with)")
    max_tokens = min(cfg.max_tokens, int(ckpt.config.max_position_embeddings))
    vocab = int(ckpt.config.vocab_size)
    (train_h, cut_h), (train_m, cut_m) = (
        _encode(r, tok, max_tokens, vocab, str(backbone)) for r in (h_train, m_train)
    )
    held_rows = h_held + m_held
    held_ids = _encode(held_rows, tok, max_tokens, vocab, str(backbone))[0] if held_rows else []
    held_labels = [r.label for r in held_rows]
    cut = cut_h + cut_m
    model = SequenceClassifier(ckpt.model, tok.pad_id)
    source = BalancedBatches(train_h, train_m, tcfg.batch_size, tok.pad_id, tcfg.seed, rank=d.rank,
                             world_size=d.world_size)  # fmt: skip

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = m(b["input_ids"])
        loss = F.cross_entropy(logits, b["labels"])
        return loss, {"accuracy": float((logits.argmax(-1) == b["labels"]).float().mean())}

    def evaluate(m: Any) -> dict[str, float]:
        if not held_ids:
            return {}
        scores = heldout_scores(m, held_ids, tok.pad_id)
        p = torch.tensor(scores).clamp(1e-6, 1 - 1e-6)
        y = torch.tensor(held_labels, dtype=torch.float32)
        nll = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
        acc = float(((p > 0.5).float() == y).float().mean())
        return {"val_loss": float(nll), "val_accuracy": acc, "val_auroc": auroc(scores, held_labels)}

    meta = {"stage": "detect", "backbone": str(backbone), "max_tokens": max_tokens,
            "train_texts": {"human": len(h_train), "machine": len(m_train)}, **(extra_meta or {})}  # fmt: skip

    def save(state: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        save_classifier(folder, state, model.backbone, tok, max_tokens, {**meta, **step_meta})

    trainer = Trainer(
        tcfg, model, source, loss_fn, out, Hooks(save_model=save, evaluate=evaluate), stage="detect"
    )
    if resume_wanted(out, cfg.resume, tcfg, "detect"):
        trainer.resume()
    if d.main:
        print(f"[danlu] detect: {len(h_train)} human + {len(m_train)} machine texts for training (batches half "
              f"each), {len(h_held)} + {len(m_held)} held out; texts keep their first {max_tokens} tokens ({cut} "
              f"training texts cut); {tcfg.steps} steps × {tcfg.batch_size * tcfg.grad_accum * d.world_size} texts")  # fmt: skip
    metrics = trainer.fit()
    result: dict[str, Any] = {"steps": trainer.step, "train_loss": metrics.get("loss"),
                              "train_accuracy": metrics.get("accuracy"), "max_tokens": max_tokens}  # fmt: skip
    evals = [h for h in trainer.history if h.get("event") == "eval" and "val_auroc" in h]
    if evals:
        result["heldout_auroc_before"] = round(evals[0]["val_auroc"], 4)
    if held_ids:
        trainer.raw_model.eval()
        scores = heldout_scores(trainer.raw_model, held_ids, tok.pad_id)
        result["heldout"] = report(
            scores, held_labels, [r.text for r in held_rows], [len(i) for i in held_ids]
        )
        if d.main:
            write_json_atomic(out / "heldout_eval.json", result["heldout"])
            update_meta_metrics(out, {"heldout_auroc": result["heldout"]["all"]["auroc"],
                                      "heldout_tpr_at_1fpr": result["heldout"]["all"]["tpr_at_1fpr"]})  # fmt: skip
    return result


def labelled(human: list[Text], machine: list[Text]) -> tuple[list[str], list[int]]:
    return [r.text for r in human + machine], [HUMAN] * len(human) + [MACHINE] * len(machine)
