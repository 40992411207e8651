"""Distillation on the engine: the student learns the teacher's token distributions (Minitron's retraining step).

A stage is a data source and a loss: the data is packed rows of text (`PackedRows`, or pretraining's `TokenRows`),
the loss `danlu.losses.kd_loss` — forward KL(teacher‖student) at temperature T, or TRL's generalized JSD with β
(`beta`) — on every position the rows score, optionally mixed with the usual next-token cross-entropy (`alpha` < 1).
The teacher sits frozen beside the student in eval mode (bf16 on GPUs, fp32 on CPUs without bf16): it is not part of
the module the engine optimizes, checkpoints or wraps, so resume, DDP and FSDP see only the student.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu import DanluError
from danlu.losses import generalized_jsd, kd_loss
from danlu.model import IGNORE_INDEX


@dataclass
class DistillConfig:
    """Recipe `compress.distill:`."""

    enabled: bool = True
    temperature: float = 1.0
    beta: float = (
        0.0  # 0: forward KL (the classic KD loss); 1: reverse KL; between: generalized JSD (TRL GKD)
    )
    alpha: float = 1.0  # weight of the KD loss; 1 - alpha goes to next-token cross-entropy on the data
    seq_len: int = 128
    tokens: int = 0  # distillation token budget; 0 = train.steps as given
    teacher_dtype: str = "auto"  # auto: bf16 on GPUs and bf16 CPUs, else fp32
    train: dict[str, Any] = field(default_factory=dict)


class PackedRows:
    """Rows of (input_ids, targets) packed from texts (documents joined with BOS, as pretraining packs them), served
    in a fresh shuffled order each epoch; its position is saved with the checkpoint so a resumed run continues."""

    def __init__(self, rows: list[dict[str, torch.Tensor]], batch_size: int, seed: int = 0) -> None:
        if not rows:
            raise DanluError("distill: no training rows (the distillation texts are empty)")
        self.x = torch.cat([r["input_ids"] for r in rows])
        self.y = torch.cat([r["targets"] for r in rows])
        if len(self.x) < batch_size:
            raise DanluError(f"distill: {len(self.x)} rows of text, fewer than one batch of {batch_size}; use more "
                             "texts, a smaller train.batch_size or a shorter compress.distill.seq_len")  # fmt: skip
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    @classmethod
    def from_texts(
        cls, tokenizer: Any, texts: Iterable[str], seq_len: int, batch_size: int, seed: int = 0
    ) -> PackedRows:
        from danlu.eval.bpb import text_batches

        return cls(list(text_batches(tokenizer, texts, seq_len, 64, 0)), batch_size, seed)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch_size > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = torch.from_numpy(self._order[self.pos : self.pos + self.batch_size])
        self.pos += self.batch_size
        return {"input_ids": self.x[idx], "targets": self.y[idx]}

    def sequential(self, batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.x), batch_size):
            yield {"input_ids": self.x[i : i + batch_size], "targets": self.y[i : i + batch_size]}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rows": len(self.x)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("rows") != len(self.x) or state.get("seed") != self.seed:
            raise DanluError(f"distill: the checkpoint's data position belongs to other data ({state.get('rows')} "
                             f"rows, seed {state.get('seed')}; now {len(self.x)} rows, seed {self.seed})")  # fmt: skip
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, where: str) -> None:
    """Logit distillation compares distributions token by token, so both models must share one vocabulary."""
    a, b = teacher_tok.vocab_size, student_tok.vocab_size
    if a != b or _pieces(teacher_tok) != _pieces(student_tok):
        raise DanluError(
            f"{where}: the teacher's and the student's tokenizers differ ({a} vs {b} tokens"
            f"{'' if a != b else ', same size but different pieces'}); distillation on logits compares the two "
            "distributions token by token, so the student must use the teacher's tokenizer (prune the student "
            "from the teacher, or retrain it with the teacher's tokenizer)"
        )


def _pieces(tokenizer: Any) -> dict[str, int]:
    return tokenizer.backend.get_vocab(with_added_tokens=True)


def distill_loss(teacher: torch.nn.Module, cfg: DistillConfig) -> Any:
    """The engine's loss function: KD (or GJSD) against the frozen teacher, plus (1 - alpha)·cross-entropy."""

    def loss_fn(
        model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch["input_ids"], batch["targets"]
        mask = y != IGNORE_INDEX
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = model(x)
        if cfg.beta == 0:
            kd = kd_loss(s_logits, t_logits, mask, cfg.temperature)
        else:
            kd = cfg.temperature**2 * generalized_jsd(s_logits, t_logits, mask, cfg.beta, cfg.temperature)
        loss = cfg.alpha * kd
        stats = {"kd": float(kd.detach())}
        if cfg.alpha < 1:
            ce = torch.nn.functional.cross_entropy(
                s_logits.float().flatten(0, 1), y.reshape(-1), ignore_index=IGNORE_INDEX
            )
            loss = loss + (1 - cfg.alpha) * ce
            stats["ce"] = float(ce.detach())
        return loss, stats

    return loss_fn


@torch.no_grad()
def heldout_kl(
    student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> float:
    """Mean KL(teacher‖student) per scored token at T = 1 on held-out rows: how far the student is from the teacher."""
    total, count = 0.0, 0
    device = student.lm_head.weight.device
    for b in batches:
        x, y = b["input_ids"].to(device), b["targets"].to(device)
        mask = y != IGNORE_INDEX
        n = int(mask.sum())
        total += float(generalized_jsd(student(x), teacher(x), mask, beta=0.0)) * n
        count += n
    return total / max(1, count)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    from danlu.engine import cpu_has_bf16

    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name != "auto":
        raise DanluError(f"compress.distill.teacher_dtype={name!r}: expected auto, bf16 or fp32")
    return (
        torch.bfloat16
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        else torch.float32
    )


def distill(
    student: torch.nn.Module, teacher: torch.nn.Module, data: Any, out: Path, *, tcfg: Any, cfg: DistillConfig,
    tokenizer: Any, meta: dict[str, Any], eval_rows: PackedRows | None = None, chat: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Trains `student` toward `teacher` on `data` with the engine, saving the student to `out`; returns metrics
    (held-out KL to the teacher before and after, the last training losses)."""
    from danlu.engine import Hooks, Trainer
    from danlu.io import save_model_dir

    teacher.eval().requires_grad_(False)
    val = list(eval_rows.sequential(16)) if eval_rows is not None else []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": heldout_kl(m, teacher, val)} if val else {}

    def save(state: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        save_model_dir(folder, state, student.config, tokenizer, {**meta, **step_meta}, chat=chat)

    hooks = Hooks(save_model=save, evaluate=evaluate)
    trainer = Trainer(tcfg, student, data, distill_loss(teacher, cfg), out, hooks, stage="distill")
    teacher.to(trainer.device, teacher_dtype(cfg.teacher_dtype, trainer.device))
    before = heldout_kl(trainer.raw_model.eval(), teacher, val) if val else None
    metrics = trainer.fit()
    after = heldout_kl(trainer.raw_model.eval(), teacher, val) if val else None
    return {"steps": trainer.step, "kd_loss": metrics.get("kd", metrics.get("loss")), "heldout_kl_before": before,
            "heldout_kl_after": after, "tokens_per_s": metrics.get("tokens_per_s")}  # fmt: skip
