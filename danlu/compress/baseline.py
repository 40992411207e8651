"""The control of the compression experiment: the student's shape trained from scratch on the same tokens.

Minitron's claim is that pruning + distillation beats training the small model from random weights on the same
token budget. This trains exactly that control: a fresh model of the student's config (random init, the engine's
usual pretraining loss, next-token cross-entropy) on the same packed rows, batch size and step count as the
distillation, so both see the same number of tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.model import ModelConfig, Transformer


def train_from_scratch(
    cfg: ModelConfig,
    data: Any,
    out: Path,
    *,
    tcfg: Any,
    tokenizer: Any,
    meta: dict[str, Any],
    chat: bool = False,
    resume: bool = False,
) -> tuple[Transformer, dict[str, Any]]:
    """A model of shape `cfg` trained from random init with cross-entropy on `data` for `tcfg.steps` steps; saved to
    `out` (`resume`: continued from the unfinished checkpoint there). Returns the model (eval mode) and {steps,
    train_loss, tokens} (tokens over all processes)."""
    from danlu.engine import Hooks, Trainer, set_seed
    from danlu.io import save_model_dir

    set_seed(tcfg.seed)
    model = Transformer(cfg)

    def save(state: dict, folder: Path, step_meta: dict[str, Any]) -> None:
        save_model_dir(folder, state, cfg, tokenizer, {**meta, **step_meta}, chat=chat)

    trainer = Trainer(tcfg, model, data, lambda m, b: (m(b["input_ids"], b["targets"]), {}), out,
                      Hooks(save_model=save), stage="scratch")  # fmt: skip
    world = trainer.dist.world_size
    if hasattr(data, "shard"):  # under torchrun each rank reads its own slice, as the distillation's do
        data.shard(trainer.dist.rank, world)
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    seq_len = int(data.x.size(1)) if hasattr(data, "x") else 0
    tokens = trainer.step * tcfg.batch_size * tcfg.grad_accum * world * seq_len
    return trainer.raw_model.float().eval(), {
        "steps": trainer.step,
        "train_loss": metrics.get("loss"),
        "tokens": tokens,
    }
