"""GRPO: groups of sampled answers per prompt, rewards that check the answers, group-normalized advantages.

The data source does the rollout: each `next_batch()` samples `group_size` completions for each of
`prompts_per_step` prompts with the CURRENT policy (batched KV-cache generation, no grad), scores them, and
returns token tensors with advantages and reference log-probs; the loss is GRPO's clipped objective (+ β·KL).
One optimizer step per rollout, so the "old" policy is the current one (ratio 1 at the sample; TRL's default).
Each rollout row is seeded by its index in the run (danlu.stages.rollouts.rollout_seed), so a resumed run samples
exactly what the uninterrupted one would, and N processes what one process with the same global batch would.
Under torchrun, DDP only: every rank samples with the whole policy (FSDP is refused with the reason).
With a `peft:` section the rollouts come from base + adapter, only the adapter trains and is saved, and the KL
reference (β > 0) is the base with the adapter switched off (danlu.stages.dpo.attach_with_reference): no copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import from_dict
from danlu.pipeline import StageContext, heldout_limit
from danlu.stages.common import (
    attach_with_reference,
    before_after_line,
    packs_rows,
    token_logps,
    world_eval_folder,
    world_figures,
)
from danlu.stages.rollouts import (
    Rollouts,
    answer_accuracy,
    check_rollout_parallel,
    make_scorer,
    prompt_kinds,
    read_prompts,
    rollouts_compiled,
)


@dataclass
class GRPOConfig:
    model: str | None = None  # checkpoint to start from; in a pipeline: the sft stage's output
    reference: str | None = None  # KL reference; default: a frozen copy of the starting model
    data: str | None = None  # RL prompts; in a pipeline: world/rl.jsonl
    eval_data: str | None = None  # held-out prompts; in a pipeline: world/eval/arithmetic.jsonl
    reward: str = (
        "world"  # a reward function name (world, arithmetic, gsm8k, exact, contains) or a reward model folder
    )
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL penalty to the reference (0 = off, as DAPO / Dr. GRPO recommend)
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_type: str = "grpo"  # grpo | bnpo
    step_reward: float = 0.0  # + this × share of a prompt's `steps` written right (dense credit; not in eval)
    credit: str = "answer"  # answer: one advantage per sample; steps: each checked step's on its own tokens
    kinds: list[str] = field(default_factory=list)  # keep only prompts whose `kind` is listed ([] = all)
    tools: bool = False  # execute the rollouts' tool calls (get_date, calculator) and score the final answer
    tool_rounds: int = 1  # tool rounds per episode before the answer must come
    max_prompts: int = 0
    eval_rows: int = 200
    resume: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(
        default_factory=dict
    )  # an adapter instead of all weights (danlu.adapters.PeftSpec)


# What GRPO targets, scored before and after by the run's one evaluator (danlu.eval.world) on the dev split;
# the eval stage scores everything else (facts, translation …) of every checkpoint, so a lost skill shows there.
RL_QUANTITIES = ["arithmetic_chat_unseen", "arithmetic_chat_times_table", "tools_call", "tools_answer"]
TRAIN_DEFAULTS = {"steps": 60, "batch_size": 1, "lr": 1e-4, "warmup_steps": 5, "eval_every": 0, "log_every": 5,
                  "weight_decay": 0.0}  # fmt: skip


def train_grpo(
    parent: Path, data: str | Path, out: Path, *, recipe: dict[str, Any], cfg: GRPOConfig,
    eval_data: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.preference import read_rl_prompts
    from danlu.engine import (
        Hooks,
        Trainer,
        init_distributed,
        per_batch,
        resume_wanted,
        set_seed,
        target_tokens,
    )
    from danlu.losses import grpo_loss
    from danlu.stages.common import attach_peft, make_saver, parent_checkpoint, train_config

    if cfg.group_size < 2:
        raise DanluError(
            f"grpo.group_size: {cfg.group_size}; GRPO compares samples within a group, so it needs at least 2"
        )
    tcfg = train_config(recipe, cfg.train, "grpo", TRAIN_DEFAULTS)
    d = init_distributed(tcfg.device)
    check_rollout_parallel("grpo", tcfg.parallel, d.world_size)
    set_seed(tcfg.seed)
    ckpt = parent_checkpoint(parent)
    tok = ckpt.tokenizer
    if cfg.beta:  # a KL reference: with an adapter, the base under it
        adapter, ref = attach_with_reference(ckpt, cfg.peft, "grpo", parent, cfg.reference, tcfg.seed)
    else:
        adapter, ref = attach_peft(ckpt, cfg.peft, "grpo", parent, seed=tcfg.seed), None
    prompts = read_prompts(data, cfg.kinds, cfg.max_prompts or None)
    held = read_rl_prompts(eval_data, cfg.eval_rows or None, split="dev") if eval_data else []
    reward = make_scorer(cfg.reward, tok)
    source = Rollouts(
        prompts, tok, ckpt.model, ref, reward, group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=tcfg.seed,
        step_reward=cfg.step_reward, credit=cfg.credit, rank=d.rank, world_size=d.world_size, tools=cfg.tools,
        tool_rounds=cfg.tool_rounds, compile=rollouts_compiled(tcfg.compile, tcfg.steps, tcfg.device),
    )  # fmt: skip

    pack = packs_rows(ckpt.model)  # rollouts are half padding: pack them

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp = token_logps(m, b["input_ids"], b["targets"], pack=pack).float()
        mask = b["targets"] != -100
        loss, st = grpo_loss(
            logp, logp.detach(), b["advantages"], mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
            ref_logp=b.get("ref_logps"), loss_type=cfg.loss_type,
        )  # fmt: skip
        groups = b["rewards"].view(-1, cfg.group_size)
        return loss, {"reward": float(b["rewards"].mean()), "reward_std": float(b["rewards"].std()),
                      "groups_learning": float((groups.std(1) > 0).float().mean()),
                      "kl": float(st["kl"]), "clip_ratio": float(st["clip_ratio"]),
                      "completion_tokens": float(b["completion_tokens"].mean()),
                      "tool_calls": float(b["tool_calls"].mean())}  # fmt: skip

    meta = {"stage": "grpo", "parent": str(parent), "data": str(data), "reward": cfg.reward}
    trainer = Trainer(
        tcfg,
        ckpt.model,
        source,
        loss_fn,
        out,
        Hooks(save_model=make_saver(ckpt.config, tok, meta, chat=True, adapter=adapter)),
        stage="grpo",
        # grpo: a mean over each rollout's sequences (all micro-batches weigh the same); bnpo: over its tokens
        loss_units=target_tokens if cfg.loss_type == "bnpo" else per_batch,
    )
    source.autocast = trainer.autocast
    if ref is not None:
        ref.to(trainer.device)
    if reward.model is not None:
        reward.model.to(trainer.device)
    # Mean reward per step moves with which prompts the step drew (a 40-step run with lr≈0 "fell" 0.39 → 0.25), so
    # learning is shown on fixed prompts: greedy accuracy on a sample of the training prompts, and held-out figures
    # (in a run: the world evaluator's arithmetic and tool quantities on the dev split, kept beside each checkpoint).
    probe = random.Random(tcfg.seed).sample(prompts, min(len(prompts), cfg.eval_rows))
    world = world_eval_folder(eval_data)
    limit = heldout_limit(recipe, cfg.eval_rows)
    sets = {"train_prompt_accuracy": probe}
    if world is None and held:
        sets["heldout_accuracy"] = held

    def accuracies(suffix: str) -> dict[str, Any]:
        with trainer.autocast():
            return {name + suffix: answer_accuracy(trainer.raw_model, tok, rows, reward, cfg.max_new_tokens,
                                                     compile=tcfg.compile)
                    for name, rows in sets.items() if rows}  # fmt: skip

    def figures(checkpoint: Path) -> dict[str, Any]:
        return world_figures(trainer.raw_model, tok, world, RL_QUANTITIES, checkpoint, limit=limit,
                             dtype=trainer.dtype, compile=tcfg.compile) if world is not None else {}  # fmt: skip

    result: dict[str, Any] = {k: v["accuracy"] for k, v in accuracies("_before").items()}
    before = figures(parent)
    if resume_wanted(out, cfg.resume, tcfg, "grpo"):
        trainer.resume()
    if d.main:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(prompt_kinds(prompts).items()))
        print(f"[danlu] grpo: {len(prompts)} prompts (tool needed: {kinds}), {cfg.prompts_per_step}×{cfg.group_size} "
              f"samples per step and process ({d.world_size}), reward {cfg.reward}, tools {'on' if cfg.tools else 'off'}, "
              f"β={cfg.beta}, {tcfg.steps} steps")  # fmt: skip
    metrics = trainer.fit()
    result.update({"steps": trainer.step, "train_loss": metrics.get("loss"), "kl": metrics.get("kl")})
    after = accuracies("")
    result.update({k: v["accuracy"] for k, v in after.items()})
    if "heldout_accuracy" in after:
        result["heldout_rows"] = len(held)
        result["heldout_examples"] = after["heldout_accuracy"]["examples"]
    if world is not None and d.main:
        result["heldout"] = {"before": before, "after": figures(out)}
        print(before_after_line("grpo", before, result["heldout"]["after"]))
    return result


def read_config(section: dict[str, Any]) -> GRPOConfig:
    return from_dict(GRPOConfig, section, "grpo")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.stages.common import rl_stage_inputs

    cfg = read_config(ctx.cfg)
    parent, data, eval_data = rl_stage_inputs(ctx, cfg, "rl.jsonl", "eval/arithmetic.jsonl")
    return train_grpo(parent, data, ctx.out, recipe=ctx.recipe, cfg=cfg, eval_data=eval_data)
