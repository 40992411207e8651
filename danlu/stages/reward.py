"""Reward model: the SFT backbone plus a scalar head, trained with the Bradley–Terry loss on preference pairs.

Data: each micro-batch holds B pairs as 2B right-padded rows (chosen rows first); the loss is
-log σ(r_chosen - r_rejected - margin). The result is an HF folder that transformers loads as
`LlamaForSequenceClassification` (num_labels 1), and the stage reports held-out pairwise accuracy before and after.

With a `peft:` section (LoRA family) the backbone stays frozen under the adapter and the score head trains in full
as peft's `modules_to_save` (a fresh head has nothing to adapt from, and it is one row of weights): the output is an
adapter folder that peft loads onto `LlamaForSequenceClassification` (task SEQ_CLS, `score.weight` saved beside the
LoRA tensors), and that PPO/GRPO take as `reward:` like a full reward model (danlu.rewards.load_reward_model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import from_dict
from danlu.data.preference import PairBatches, encode_pairs
from danlu.pipeline import StageContext


@dataclass
class RewardConfig:
    model: str | None = None  # checkpoint to start from; in a pipeline: the sft stage's output
    data: str | None = None  # preference pairs (file or folder); in a pipeline: world/preference.jsonl
    eval_data: str | None = None  # held-out pairs; in a pipeline: world/eval/preference.jsonl
    max_pairs: int = 0  # 0 = all
    eval_pairs: int = 200
    use_margin: bool = True  # subtract a record's `margin` inside the sigmoid when it has one
    center_coef: float = 0.01  # keeps rewards centred at zero (TRL's center_rewards_coefficient)
    resume: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(
        default_factory=dict
    )  # an adapter instead of all weights (danlu.adapters.PeftSpec)


TRAIN_DEFAULTS = {
    "steps": 150,
    "batch_size": 8,
    "lr": 3e-4,
    "warmup_steps": 10,
    "eval_every": 0,
    "log_every": 10,
}


def pairwise_accuracy(model: Any, batches: PairBatches, batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose chosen answer scores above the rejected one, and the mean score margin."""
    correct, total, margin = 0, 0, 0.0
    device = model.score.weight.device
    for b in batches.sequential(batch_size):
        scores = model(b["input_ids"].to(device), b["lengths"].to(device))
        c, r = scores.chunk(2)
        correct += int((c > r).sum())
        margin += float((c - r).sum())
        total += c.numel()
    return {"val_accuracy": correct / max(1, total), "val_margin": margin / max(1, total)}


def train_reward(
    parent: Path, data: str | Path, out: Path, *, recipe: dict[str, Any], cfg: RewardConfig,
    eval_data: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.preference import read_pairs
    from danlu.engine import Hooks, Trainer, init_distributed, per_batch, resume_wanted, set_seed
    from danlu.losses import bradley_terry_loss
    from danlu.rewards import RewardModel, save_reward_model
    from danlu.stages.common import parent_checkpoint, train_config

    tcfg = train_config(recipe, cfg.train, "reward", TRAIN_DEFAULTS)
    d = init_distributed(tcfg.device)
    set_seed(tcfg.seed)
    ckpt = parent_checkpoint(parent)
    if ckpt.backend != "native":
        raise DanluError(
            f"{parent}: a reward model needs the native (Llama-family) model; this one runs through transformers"
        )
    tok = ckpt.tokenizer
    context = ckpt.config.max_position_embeddings
    train, dropped = encode_pairs(read_pairs(data, cfg.max_pairs or None), tok, context)
    if not train:
        raise DanluError(f"{data}: no preference pair fits the model's context of {context} tokens")
    held = encode_pairs(read_pairs(eval_data, cfg.eval_pairs or None, split="dev"), tok, context)[0] if eval_data else []
    ckpt.model = RewardModel.from_policy(ckpt.model)
    adapter = attach_score_adapter(ckpt, cfg.peft, parent, tcfg.seed)
    model = ckpt.model
    del ckpt
    source = PairBatches(train, tcfg.batch_size, tok.pad_id, tcfg.seed, rank=d.rank, world_size=d.world_size)
    held_batches = PairBatches(held, tcfg.batch_size, tok.pad_id, 0) if held else None

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        scores = m(b["input_ids"], b["lengths"])
        c, r = scores.chunk(2)
        loss = bradley_terry_loss(c, r, b["margin"] if cfg.use_margin else None, cfg.center_coef)
        return loss, {"accuracy": float((c > r).float().mean()), "margin": float((c - r).detach().mean())}

    def evaluate(m: Any) -> dict[str, float]:
        return pairwise_accuracy(m, held_batches) if held_batches else {}

    meta = {"stage": "reward", "parent": str(parent), "data": str(data)}

    def save(state: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        if adapter is not None:
            adapter.save(folder, state, {**meta, **step_meta, "chat": True, "reward_model": True})
            return
        save_reward_model(folder, state, model.config, tok, {**meta, **step_meta})

    if not tcfg.eval_every:
        tcfg.eval_every = tcfg.steps  # before and after
    # The loss is a mean over each micro-batch's B pairs: every micro-batch weighs the same (per_batch).
    trainer = Trainer(tcfg, model, source, loss_fn, out, Hooks(save_model=save, evaluate=evaluate), stage="reward",
                      loss_units=per_batch)  # fmt: skip
    if resume_wanted(out, cfg.resume, tcfg, "reward"):
        trainer.resume()
    if d.main:
        print(f"[danlu] reward: {len(train)} pairs ({dropped} too long dropped), {len(held)} held out, "
              f"{tcfg.steps} steps × {tcfg.batch_size * tcfg.grad_accum * d.world_size} pairs")  # fmt: skip
    metrics = trainer.fit()
    evals = [h for h in trainer.history if h.get("event") == "eval" and "val_accuracy" in h]
    result: dict[str, Any] = {
        "steps": trainer.step,
        "train_loss": metrics.get("loss"),
        "train_accuracy": metrics.get("accuracy"),
    }
    if evals:
        result["heldout_pair_accuracy_before"] = round(evals[0]["val_accuracy"], 4)
        result["heldout_pair_accuracy"] = round(evals[-1]["val_accuracy"], 4)
        result["heldout_margin"] = round(evals[-1]["val_margin"], 4)
        result["heldout_pairs"] = len(held)
    return result


def attach_score_adapter(ckpt: Any, section: dict[str, Any] | None, parent: Path, seed: int = 0) -> Any:
    """The `reward.peft` section on the reward model in `ckpt.model`: LoRA on the backbone's linear layers (never on
    the score head, which has no trained weights to adapt), and the head itself trainable in full as peft's
    `modules_to_save`, saved with the adapter. None without a section. Soft prompts are refused: a score is read at
    the last token of a right-padded row, and the reward model's form is not a causal LM that PromptedLM wraps."""
    from danlu.adapters import peft_spec
    from danlu.adapters.spec import linear_suffixes
    from danlu.stages.common import attach_peft

    spec = peft_spec(section, "reward.peft")
    if not spec.enabled:
        return None
    if not spec.is_lora:
        raise DanluError(f"reward.peft.method: {spec.method} is a soft prompt; a reward model takes a LoRA-family "
                         "adapter (lora, dora, pissa, rslora) with its score head trained in full")  # fmt: skip
    targets = spec.target_modules
    if targets is None:
        targets = [s for s in linear_suffixes(ckpt.model) if s != SCORE]
    elif targets == SCORE or (isinstance(targets, list) and SCORE in targets):
        raise DanluError(f"reward.peft.target_modules: {SCORE!r} is the score head, which trains in full "
                         "(peft's modules_to_save); list only backbone layers")  # fmt: skip
    adapter = attach_peft(ckpt, {**section, "target_modules": targets}, "reward", parent, seed=seed)  # type: ignore[dict-item]
    train_in_full(ckpt.model, [SCORE])
    adapter.config.modules_to_save = [SCORE]
    adapter.config.task_type = "SEQ_CLS"  # peft loads it onto LlamaForSequenceClassification
    return adapter


SCORE = "score"  # the reward model's head: transformers' LlamaForSequenceClassification.score


def train_in_full(model: torch.nn.Module, names: list[str]) -> None:
    """Wraps `names` in peft's ModulesToSaveWrapper (what `modules_to_save` does): a trainable copy of the module
    beside the frozen original, saved with the adapter under the module's own key (`score.weight`)."""
    from peft.utils.other import _set_trainable

    _set_trainable(model, "default", module_names=names, inference_mode=False, strict_module_check=True)


def read_config(section: dict[str, Any]) -> RewardConfig:
    return from_dict(RewardConfig, section, "reward")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.stages.common import rl_stage_inputs

    cfg = read_config(ctx.cfg)
    parent, data, eval_data = rl_stage_inputs(ctx, cfg, "preference.jsonl", "eval/preference.jsonl")
    return train_reward(parent, data, ctx.out, recipe=ctx.recipe, cfg=cfg, eval_data=eval_data)
