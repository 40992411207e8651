"""DPO: preference pairs train the policy directly, against a frozen reference (the SFT model).

Each micro-batch is B pairs as 2B rows (chosen first); the loss is DPO's sigmoid loss on summed completion
log-probabilities. The reference's log-probabilities are computed once before training and cached with the data
(the default: half the compute per step), or on the fly (`reference_mode: online`, for data too big to cache).
Held-out preference accuracy — how often the policy gives the chosen answer more probability than the rejected —
is measured before and after.

With a `peft:` section only the adapter trains, and the reference is the base under it: the same model with the
adapter switched off (peft's `disable_adapter`; for a soft prompt the wrapped base itself), so no second copy of the
weights is held. PiSSA is the exception: it moves the principal directions out of the base weights, so its base
without the adapter is not the starting model, and it gets a frozen copy as without an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import from_dict
from danlu.data.preference import PairBatches, encode_pairs
from danlu.model import IGNORE_INDEX
from danlu.pipeline import StageContext, heldout_limit
from danlu.stages.common import (
    attach_with_reference,
    before_after_line,
    cached_logps,
    sequence_logps,
    world_eval_folder,
    world_figures,
)
from danlu.stages.rollouts import answer_accuracy, make_scorer, read_prompts


@dataclass
class DPOConfig:
    model: str | None = None  # checkpoint to start from; in a pipeline: the sft stage's output
    reference: str | None = None  # reference checkpoint; default: a frozen copy of the starting model
    data: str | None = None
    eval_data: str | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + α·NLL of the chosen answer, per token. DPO alone may lower
    # both answers' likelihood; this term keeps the chosen one likely, so the other SFT skills survive.
    rpo_alpha: float = 0.0
    reference_mode: str = "cached"  # cached | online
    max_pairs: int = 0
    eval_pairs: int = 200
    # Pairs judged from the starting model's own samples (danlu/stages/judged_pairs.py): `samples` answers to each
    # of `sample_prompts` RL prompts (`prompts`, pipeline: world/rl.jsonl; `prompt_kinds` filters by `kind`),
    # scored by `judge` (a reward function name or a reward model folder). Held-out prompts (`eval_prompts`,
    # pipeline: world/eval/rl.jsonl) give judged held-out pairs and greedy answer accuracy, before and after.
    sample_prompts: int = 0  # 0 = off
    samples: int = 4
    sample_tokens: int = 72
    judge: str = "world"
    prompts: str | None = None
    prompt_kinds: list[str] = field(default_factory=list)
    eval_prompts: str | None = None
    written_pairs: bool = True  # also train on `data`; false: on the judged pairs only
    resume: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(
        default_factory=dict
    )  # an adapter instead of all weights (danlu.adapters.PeftSpec)


TRAIN_DEFAULTS = {"steps": 150, "batch_size": 8, "lr": 2e-4, "warmup_steps": 10, "eval_every": 0, "log_every": 10,
                  "weight_decay": 0.0}  # fmt: skip


def preference_eval(
    policy: Any, ref: Any, batches: Any, beta: float, autocast: Any, prefix: str = "val_"
) -> dict[str, float]:
    """{prefix}loss (DPO), {prefix}pref_accuracy (the policy gives the chosen answer the higher mean log-probability
    per token: danlu's one definition, danlu.eval.world.preference_flags), {prefix}reward_accuracy (implicit reward
    β·log π/π_ref ranks chosen higher; 0.5 by definition when policy = reference: a training diagnostic)."""
    from danlu.losses import dpo_loss

    device = policy.lm_head.weight.device
    loss = pref = rew = n = 0.0
    for b in batches.sequential(16):
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            pc, pr = sequence_logps(policy, b).float().chunk(2)
            rc, rr = sequence_logps(ref, b).float().chunk(2)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
        tc, tr = (b["targets"] != IGNORE_INDEX).sum(-1).clamp(min=1).chunk(2)
        loss += float(losses.sum())
        pref += float((pc / tc > pr / tr).sum())
        rew += float((cr > rj).sum() + 0.5 * (cr == rj).sum())
        n += pc.numel()
    n = max(n, 1)
    return {
        f"{prefix}loss": loss / n,
        f"{prefix}pref_accuracy": pref / n,
        f"{prefix}reward_accuracy": rew / n,
    }


def train_dpo(
    parent: Path, data: str | Path, out: Path, *, recipe: dict[str, Any], cfg: DPOConfig,
    eval_data: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.preference import read_pairs
    from danlu.engine import Hooks, Trainer, init_distributed, per_batch, resume_wanted, set_seed
    from danlu.losses import dpo_loss
    from danlu.stages.common import make_saver, parent_checkpoint, train_config

    if cfg.reference_mode not in ("cached", "online"):
        raise DanluError(f"dpo.reference_mode: {cfg.reference_mode!r} is not one of cached, online")
    tcfg = train_config(recipe, cfg.train, "dpo", TRAIN_DEFAULTS)
    d = init_distributed(tcfg.device)
    set_seed(tcfg.seed)
    ckpt = parent_checkpoint(parent)
    tok = ckpt.tokenizer
    context = ckpt.config.max_position_embeddings
    adapter, ref = attach_with_reference(ckpt, cfg.peft, "dpo", parent, cfg.reference, tcfg.seed)
    written = read_pairs(data, cfg.max_pairs or None) if cfg.written_pairs else []
    train, dropped = encode_pairs(written, tok, context)
    held = (
        encode_pairs(read_pairs(eval_data, cfg.eval_pairs or None, split="dev"), tok, context)[0]
        if eval_data
        else []
    )
    source = PairBatches(train, tcfg.batch_size, tok.pad_id, tcfg.seed, rank=d.rank, world_size=d.world_size)
    held_batches = PairBatches(held, tcfg.batch_size, tok.pad_id, 0) if held else None
    online = cfg.reference_mode == "online"

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pc, pr = sequence_logps(m, b).float().chunk(2)
        if online:
            with torch.no_grad():
                rc, rr = sequence_logps(ref, b).float().chunk(2)
        else:
            rc, rr = b["ref_logps"].float().chunk(2)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
        loss = losses.mean()
        extra = {}
        if cfg.rpo_alpha:
            chosen_tokens = (b["targets"] != -100).chunk(2)[0].sum(-1).clamp(min=1)
            nll = (-pc / chosen_tokens).mean()
            loss = loss + cfg.rpo_alpha * nll
            extra["nll_chosen"] = float(nll.detach())
        return loss, {
            **extra,
            "accuracy": float((cr > rj).float().mean()),
            "rewards_chosen": float(cr.mean()),
            "rewards_rejected": float(rj.mean()),
            "margin": float((cr - rj).mean()),
        }

    trainer: Any = None
    judged = JudgedSets(cfg, tok, context, tcfg.seed, tcfg.compile) if cfg.sample_prompts else None

    def evaluate(m: Any) -> dict[str, float]:
        out = preference_eval(m, ref, held_batches, cfg.beta, trainer.autocast) if held_batches else {}
        if judged is not None and judged.held_batches is not None:
            out.update(
                preference_eval(m, ref, judged.held_batches, cfg.beta, trainer.autocast, "val_judged_")
            )
        return out

    meta = {"stage": "dpo", "parent": str(parent), "data": str(data), "beta": cfg.beta}
    hooks = Hooks(
        save_model=make_saver(ckpt.config, tok, meta, chat=True, adapter=adapter), evaluate=evaluate
    )
    if not tcfg.eval_every:
        tcfg.eval_every = tcfg.steps
    # The loss is a mean over each micro-batch's B pairs: every micro-batch weighs the same (per_batch).
    trainer = Trainer(tcfg, ckpt.model, source, loss_fn, out, hooks, stage="dpo", loss_units=per_batch)
    ref.to(trainer.device)
    if judged is not None:  # sampled from the starting model, before a resume loads later weights
        with trainer.autocast():
            judged.sample(trainer.raw_model)
        train.extend(judged.train)
    if not train:
        if judged is not None and not cfg.written_pairs:
            raise DanluError(
                f"dpo: no judged pairs: the samples for {len(judged.prompts)} prompts of {cfg.prompts} all scored "
                f"alike under judge {cfg.judge!r} (or none ended within {cfg.sample_tokens} tokens); "
                "raise dpo.samples or dpo.sample_tokens, or set dpo.written_pairs: true"
            )
        raise DanluError(f"{data}: no preference pair fits the model's context of {context} tokens")
    if not online:  # same device and precision as training, so the first step's loss is exactly log 2
        source.extra["ref_logps"] = cached_logps(ref, PairBatches(train, 1, tok.pad_id, 0), trainer.autocast)
    world, limit = world_eval_folder(eval_data), heldout_limit(recipe, cfg.eval_pairs)
    before = (world_figures(trainer.raw_model, tok, world, ["preference_chat"], parent, limit=limit,
                            dtype=trainer.dtype, compile=tcfg.compile) if world is not None and d.main else {})  # fmt: skip
    if resume_wanted(out, cfg.resume, tcfg, "dpo"):
        trainer.resume()
    if d.main:
        print(f"[danlu] dpo: {len(train)} pairs ({dropped} too long dropped), {len(held)} held out, β={cfg.beta}, "
              f"reference {cfg.reference_mode}, {tcfg.steps} steps")  # fmt: skip
    metrics = trainer.fit()
    evals = [h for h in trainer.history if h.get("event") == "eval" and "val_pref_accuracy" in h]
    result: dict[str, Any] = {
        "steps": trainer.step, "train_loss": metrics.get("loss"), "train_accuracy": metrics.get("accuracy"),
        "rewards_chosen": metrics.get("rewards_chosen"), "rewards_rejected": metrics.get("rewards_rejected"),
        "reward_margin": metrics.get("margin"),
    }  # fmt: skip
    if evals:
        if world is None:  # a user's held-out pairs; in a run the world evaluator's figure below is the one
            result["heldout_pref_accuracy_before"] = round(evals[0]["val_pref_accuracy"], 4)
            result["heldout_pref_accuracy"] = round(evals[-1]["val_pref_accuracy"], 4)
        # TRL's eval rewards/accuracies: 0.5 before training by definition (policy = reference, every pair a tie)
        result["heldout_implicit_reward_accuracy_before"] = round(evals[0]["val_reward_accuracy"], 4)
        result["heldout_implicit_reward_accuracy"] = round(evals[-1]["val_reward_accuracy"], 4)
        result["heldout_dpo_loss"] = round(evals[-1]["val_loss"], 4)
        result["heldout_pairs"] = len(held)
    if world is not None and d.main:
        after = world_figures(trainer.raw_model, tok, world, ["preference_chat"], out, limit=limit,
                              dtype=trainer.dtype, compile=tcfg.compile)  # fmt: skip
        result["heldout"] = {"before": before, "after": after}
        print(before_after_line("dpo", before, after))
    if judged is not None:
        with trainer.autocast():
            result.update(judged.report(trainer.raw_model, trainer.history, out))
    return result


class JudgedSets:
    """DPO's pairs judged from the starting model's own samples: training pairs, held-out pairs, and the held-out
    prompts' greedy answer accuracy before and after (does preferring right answers make the model give them?)."""

    def __init__(
        self, cfg: DPOConfig, tokenizer: Any, context: int, seed: int, compile: str = "auto"
    ) -> None:
        from danlu.data.preference import read_rl_prompts

        if not cfg.prompts:
            raise DanluError(
                "dpo.sample_prompts needs dpo.prompts: RL prompts with answers (messages + answer)"
            )
        self.cfg, self.tok, self.context, self.seed = cfg, tokenizer, context, seed
        self.compile = compile  # train.compile, for the sampled and greedy generations
        self.judge = make_scorer(cfg.judge, tokenizer)
        self.prompts = read_prompts(cfg.prompts, cfg.prompt_kinds, cfg.sample_prompts)
        self.held_prompts = (
            read_rl_prompts(cfg.eval_prompts, cfg.eval_pairs or None, split="dev") if cfg.eval_prompts else []
        )
        self.train: list[tuple] = []
        self.pairs: dict[str, list[Any]] = {}
        self.stats: dict[str, Any] = {}
        self.held_batches: Any = None

    def _pairs(self, model: Any, prompts: list[Any], seed: int) -> tuple[list[Any], dict[str, float]]:
        from danlu.stages.judged_pairs import judged_pairs

        return judged_pairs(model, self.tok, prompts, self.judge, samples=self.cfg.samples,
                            max_tokens=self.cfg.sample_tokens, seed=seed, compile=self.compile)  # fmt: skip

    def sample(self, model: Any) -> None:

        if self.judge.model is not None:
            self.judge.model.to(model.lm_head.weight.device)
        self.pairs["train"], st = self._pairs(model, self.prompts, self.seed)
        self.train = encode_pairs(self.pairs["train"], self.tok, self.context)[0]
        self.stats = {"judged_prompts": st["prompts"], "judged_pairs": len(self.train),
                      "judged_mean_reward": st["mean_reward"]}  # fmt: skip
        if self.held_prompts:
            self.pairs["eval"], _ = self._pairs(model, self.held_prompts, self.seed + 1)
            held = encode_pairs(self.pairs["eval"], self.tok, self.context)[0]
            self.held_batches = PairBatches(held, 16, self.tok.pad_id, 0) if held else None
            self.stats["heldout_judged_pairs"] = len(held)
            self.stats["heldout_answer_accuracy_before"] = answer_accuracy(
                model, self.tok, self.held_prompts, self.judge, self.cfg.sample_tokens, compile=self.compile
            )["accuracy"]

    def report(self, model: Any, history: list[dict[str, Any]], out: Path) -> dict[str, Any]:
        from danlu.stages.judged_pairs import write_pairs

        for name, pairs in self.pairs.items():  # beside the checkpoint, for reading what DPO learned from
            write_pairs(pairs, out / f"judged_pairs_{name}.jsonl")
        result = dict(self.stats)
        evals = [h for h in history if h.get("event") == "eval" and "val_judged_pref_accuracy" in h]
        if evals:
            result["heldout_judged_pref_accuracy_before"] = round(evals[0]["val_judged_pref_accuracy"], 4)
            result["heldout_judged_pref_accuracy"] = round(evals[-1]["val_judged_pref_accuracy"], 4)
        if self.held_prompts:
            result["heldout_answer_accuracy"] = answer_accuracy(
                model, self.tok, self.held_prompts, self.judge, self.cfg.sample_tokens, compile=self.compile
            )["accuracy"]
        return result


def read_config(section: dict[str, Any]) -> DPOConfig:
    return from_dict(DPOConfig, section, "dpo")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.stages.common import rl_stage_inputs

    cfg = read_config(ctx.cfg)
    parent, data, eval_data = rl_stage_inputs(ctx, cfg, "preference.jsonl", "eval/preference.jsonl")
    if cfg.sample_prompts:  # the judged pairs' prompts: the world's RL prompts unless given
        world = ctx.run_dir / "world"
        cfg.prompts = cfg.prompts or (str(world / "rl.jsonl") if ctx.has("world") else None)
        cfg.eval_prompts = cfg.eval_prompts or (
            str(world / "eval" / "rl.jsonl") if ctx.has("world") else None
        )
    return train_dpo(parent, data, ctx.out, recipe=ctx.recipe, cfg=cfg, eval_data=eval_data)
