"""GRPO: groups of sampled answers per prompt, rewards that check the answers, group-normalized advantages.

The data source does the rollout: each `next_batch()` samples `group_size` completions for each of
`prompts_per_step` prompts with the CURRENT policy (batched KV-cache generation, no grad), scores them, and
returns token tensors with advantages and reference log-probs; the loss is GRPO's clipped objective (+ β·KL).
One optimizer step per rollout, so the "old" policy is the current one (ratio 1 at the sample; TRL's default).
Rollouts are seeded by (seed, position), so a resumed run samples exactly what the uninterrupted one would.
With a `peft:` section the rollouts come from base + adapter, only the adapter trains and is saved, and the KL
reference (β > 0) is the base with the adapter switched off (danlu.stages.dpo.attach_with_reference): no copy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import from_dict
from danlu.runner import StageContext


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
    max_prompts: int = 0
    eval_rows: int = 200
    resume: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)  # an adapter instead of all weights (danlu.adapters.PeftSpec)


TRAIN_DEFAULTS = {"steps": 60, "batch_size": 1, "lr": 1e-4, "warmup_steps": 5, "eval_every": 0, "log_every": 5,
                  "weight_decay": 0.0}  # fmt: skip


class Rollouts:
    """The RL data source: samples with the current policy, scores, and returns training tensors."""

    def __init__(
        self, prompts: list[Any], tokenizer: Any, policy: Any, ref: Any | None, reward: Any, *, group_size: int,
        prompts_per_step: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
        step_reward: float = 0.0, credit: str = "answer", rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        self.prompts, self.tok, self.policy, self.ref, self.reward = prompts, tokenizer, policy, ref, reward
        self.rank, self.world_size = rank, world_size  # each rank rolls out its own prompts of the global batch
        self.group_size, self.per_step = group_size, prompts_per_step
        self.max_new_tokens, self.temperature, self.top_p, self.seed = (
            max_new_tokens,
            temperature,
            top_p,
            seed,
        )
        if credit not in ("answer", "steps"):
            raise DanluError(f"grpo.credit: {credit!r}; expected answer or steps")
        self.step_reward, self.credit = step_reward, credit
        self.position = 0
        self.autocast: Any = None  # set to the trainer's autocast once the trainer exists
        self.encoded = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in prompts]

    def _prompt_indices(self, position: int) -> list[int]:
        """This rank's prompts of rollout `position`: rank r takes the r-th `prompts_per_step` of the global
        batch of prompts_per_step × world_size, so N processes roll out N times the prompts of one."""
        n, out = len(self.prompts), []
        start = (position * self.world_size + self.rank) * self.per_step
        for k in range(start, start + self.per_step):
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + k // n).shuffle(order)
            out.append(order[k % n])
        return out

    @torch.no_grad()
    def sample(self, position: int) -> tuple[list[int], list[Any]]:
        from danlu.generate import Generator, SamplingParams

        idx = [i for i in self._prompt_indices(position) for _ in range(self.group_size)]
        params = SamplingParams(
            max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=(self.seed * 7_919 + position) * self.world_size + self.rank,  # one process: as before
        )  # fmt: skip
        was_training = self.policy.training
        with self.autocast():
            completions = Generator(self.policy, self.tok).generate([self.encoded[i] for i in idx], params)
        self.policy.train(was_training)
        return idx, completions

    def next_batch(self) -> dict[str, torch.Tensor]:
        from danlu.data.preference import rows_from_sequences
        from danlu.losses import group_advantages

        idx, completions = self.sample(self.position)
        self.position += 1
        from danlu.rewards import step_credit

        rows, texts = [self.prompts[i] for i in idx], [c.text for c in completions]
        scores = self.reward(rows, texts)
        if self.step_reward:
            scores = [s + self.step_reward * step_credit(t, p.steps) for s, p, t in zip(scores, rows, texts)]
        rewards = torch.tensor(scores)
        seqs, tails = [], []
        for i, c in zip(idx, completions):
            tail = c.token_ids + ([self.tok.end_of_turn_id] if c.finish_reason == "stop" else [])
            p = self.encoded[i]
            seqs.append((p + tail, [0] * len(p) + [1] * len(tail)))
            tails.append(len(tail))
        batch = rows_from_sequences(seqs, self.tok.pad_id)
        if self.group_size < 2:  # no group to compare with (PPO's rollouts): the caller sets advantages
            batch["advantages"] = torch.zeros_like(rewards)
        elif self.credit == "steps":
            batch["advantages"] = self._step_advantages(
                idx, completions, tails, rewards, batch["targets"].size(1)
            )
        else:
            batch["advantages"] = group_advantages(rewards, self.group_size)
        batch["rewards"] = rewards
        batch["completion_tokens"] = torch.tensor([float(len(c.token_ids)) for c in completions])
        if self.ref is not None:
            from danlu.stages.dpo import token_logps

            device = self.ref.lm_head.weight.device
            with torch.no_grad(), self.autocast():
                batch["ref_logps"] = (
                    token_logps(self.ref, batch["input_ids"].to(device), batch["targets"].to(device))
                    .float()
                    .cpu()
                )
        return batch

    def _step_advantages(
        self, idx: list[int], completions: list[Any], tails: list[int], scores: torch.Tensor, length: int
    ) -> Any:
        """Per-token advantages (B, length) aligned with the targets: one reward per expected step of the prompt
        (`rewards.step_marks`) on the token that completes it, and the answer's score on the last token."""
        from danlu.losses import step_advantages
        from danlu.rewards import step_marks

        slots = 1 + max(len(self.prompts[i].steps or []) for i in idx)
        rewards, ends = torch.zeros(len(idx), slots), torch.zeros(len(idx), slots, dtype=torch.long)
        for row, (i, c, n, score) in enumerate(zip(idx, completions, tails, scores.tolist())):
            start = (
                len(self.encoded[i]) - 1
            )  # the target index of the first completion token; n trained tokens
            # Character offset → token: the decoded length after each token (ids decode left to right).
            ids = c.token_ids
            decoded = [len(self.tok.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
            for s, (offset, right) in enumerate(step_marks(c.text, self.prompts[i].steps or [])):
                token = next((k for k, end in enumerate(decoded) if end >= offset), n - 1)
                rewards[row, s], ends[row, s] = right, start + token
            rewards[row, -1], ends[row, -1] = score, start + n - 1
        return step_advantages(rewards, ends, self.group_size, length)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "prompts": len(self.prompts), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("prompts") != len(self.prompts):
            raise DanluError(
                f"--resume: the checkpoint was trained on {state.get('prompts')} prompts, this data has {len(self.prompts)}"
            )
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size:
            raise DanluError(f"--resume: the checkpoint was trained on {saved_world} processes, this run has "
                             f"{self.world_size}; its rollout position counts global batches of that many ranks, "
                             f"so resume with {saved_world} processes (or start over with resume: false)")  # fmt: skip
        self.position = int(state["position"])


@torch.no_grad()
def answer_accuracy(
    model: Any, tokenizer: Any, prompts: list[Any], reward: Any, max_tokens: int, batch_size: int = 64
) -> dict[str, Any]:
    """Greedy answers to held-out prompts, scored by the checking reward: the before/after number of RL."""
    from danlu.generate import Generator, SamplingParams

    gen = Generator(model, tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    scores, examples = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in chunk]
        texts = [c.text for c in gen.generate(ids, params)]
        scores += reward(chunk, texts)
        examples += [
            {"prompt": p.messages[-1]["content"], "completion": t, "answer": p.answers[:1]}
            for p, t in zip(chunk, texts)
        ]
    return {"accuracy": round(sum(scores) / max(1, len(scores)), 4), "examples": examples[:4]}


def read_prompts(data: str | Path, kinds: list[str], limit: int | None) -> list[Any]:
    """RL prompts, keeping only the listed `kind`s: the world's rl.jsonl mixes facts the SFT model already
    answers (every sample scores 1, so every advantage is 0 and the rollout teaches nothing) with arithmetic."""
    from danlu.data.preference import parse_rl_prompt, read_rl_prompts, records_with_lines
    from danlu.files import expand_inputs

    if not kinds:
        return read_rl_prompts(data, limit)
    files = expand_inputs([data])
    out = []
    for f in files:
        for where, rec in records_with_lines(f):
            if rec.get("kind") in kinds:
                out.append(parse_rl_prompt(rec, where))
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise DanluError(
            f"{data}: no RL prompts of kind {', '.join(kinds)} (grpo.kinds); check the `kind` field"
        )
    return out


def train_grpo(
    parent: Path, data: str | Path, out: Path, *, recipe: dict[str, Any], cfg: GRPOConfig,
    eval_data: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.preference import read_rl_prompts
    from danlu.engine import Hooks, Trainer, init_distributed, per_batch, set_seed, target_tokens
    from danlu.losses import grpo_loss
    from danlu.stages.common import attach_peft, make_saver, parent_checkpoint, resume_wanted, train_config
    from danlu.stages.dpo import attach_with_reference, token_logps

    if cfg.group_size < 2:
        raise DanluError(
            f"grpo.group_size: {cfg.group_size}; GRPO compares samples within a group, so it needs at least 2"
        )
    tcfg = train_config(recipe, cfg.train, "grpo", TRAIN_DEFAULTS)
    d = init_distributed(tcfg.device)
    set_seed(tcfg.seed)
    ckpt = parent_checkpoint(parent)
    tok = ckpt.tokenizer
    if cfg.beta:  # a KL reference: with an adapter, the base under it
        adapter, ref = attach_with_reference(ckpt, cfg.peft, "grpo", parent, cfg.reference)
    else:
        adapter, ref = attach_peft(ckpt, cfg.peft, "grpo", parent), None
    prompts = read_prompts(data, cfg.kinds, cfg.max_prompts or None)
    held = read_rl_prompts(eval_data, cfg.eval_rows or None) if eval_data else []
    reward = make_scorer(cfg.reward, tok)
    source = Rollouts(
        prompts, tok, ckpt.model, ref, reward, group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=tcfg.seed,
        step_reward=cfg.step_reward, credit=cfg.credit, rank=d.rank, world_size=d.world_size,
    )  # fmt: skip

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp = token_logps(m, b["input_ids"], b["targets"]).float()
        mask = b["targets"] != -100
        loss, st = grpo_loss(
            logp, logp.detach(), b["advantages"], mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
            ref_logp=b.get("ref_logps"), loss_type=cfg.loss_type,
        )  # fmt: skip
        groups = b["rewards"].view(-1, cfg.group_size)
        return loss, {"reward": float(b["rewards"].mean()), "reward_std": float(b["rewards"].std()),
                      "groups_learning": float((groups.std(1) > 0).float().mean()),
                      "kl": float(st["kl"]), "clip_ratio": float(st["clip_ratio"]),
                      "completion_tokens": float(b["completion_tokens"].mean())}  # fmt: skip

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
    # learning is shown on fixed prompts: greedy accuracy on a sample of the training prompts and on held-out ones.
    probe = random.Random(tcfg.seed).sample(prompts, min(len(prompts), cfg.eval_rows))
    sets = {"train_prompt_accuracy": probe, "heldout_accuracy": held}

    def accuracies(suffix: str) -> dict[str, Any]:
        with trainer.autocast():
            return {name + suffix: answer_accuracy(trainer.raw_model, tok, rows, reward, cfg.max_new_tokens)
                    for name, rows in sets.items() if rows}  # fmt: skip

    result: dict[str, Any] = {k: v["accuracy"] for k, v in accuracies("_before").items()}
    if resume_wanted(out, cfg.resume, tcfg, "grpo"):
        trainer.resume()
    if d.main:
        print(f"[danlu] grpo: {len(prompts)} prompts, {cfg.prompts_per_step}×{cfg.group_size} samples per step and "
              f"process ({d.world_size}), reward {cfg.reward}, β={cfg.beta}, {tcfg.steps} steps")  # fmt: skip
    metrics = trainer.fit()
    result.update({"steps": trainer.step, "train_loss": metrics.get("loss"), "kl": metrics.get("kl")})
    after = accuracies("")
    result.update({k: v["accuracy"] for k, v in after.items()})
    if held:
        result["heldout_rows"] = len(held)
        result["heldout_examples"] = after["heldout_accuracy"]["examples"]
    return result


def make_scorer(spec: str, tokenizer: Any) -> Any:
    return Scorer(spec, tokenizer)


class Scorer:
    """Rewards for (prompt, completion) rows: a checking function by name, or a reward model folder."""

    def __init__(self, spec: str, tokenizer: Any) -> None:
        from danlu.rewards import REWARD_FUNCTIONS, check_same_tokenizer, is_reward_model, load_reward_model

        self.spec, self.model, self.tokenizer = spec, None, tokenizer
        if spec in REWARD_FUNCTIONS:
            return
        if not is_reward_model(spec):
            raise DanluError(
                f"reward {spec!r}: neither a reward function ({', '.join(REWARD_FUNCTIONS)}) nor a reward model folder"
            )
        self.model, rm_tok = load_reward_model(spec)
        check_same_tokenizer(tokenizer, rm_tok, "reward model", "the policy", spec)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, prompts: list[Any], completions: list[str]) -> list[float]:
        from danlu.rewards import RewardModelScorer, compute_rewards, get_reward_fn

        if self.model is not None:
            convs = [[*p.messages, {"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
            scores = RewardModelScorer(self.model, self.tokenizer).score(convs)
            for s, p in zip(scores, prompts):
                if not math.isfinite(s):
                    raise DanluError(
                        f"reward model {self.spec} returned {s} (prompt {p.where}); training stopped"
                    )
            return scores
        names = [p.reward or self.spec for p in prompts]
        fns = [get_reward_fn(n) for n in names]
        return compute_rewards(
            fns, completions, [p.answers for p in prompts], [p.where for p in prompts], names
        )


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.stages.common import rl_stage_inputs

    cfg = from_dict(GRPOConfig, ctx.cfg, "grpo")
    parent, data, eval_data = rl_stage_inputs(ctx, cfg, "rl.jsonl", "eval/arithmetic.jsonl")
    return train_grpo(parent, data, ctx.out, recipe=ctx.recipe, cfg=cfg, eval_data=eval_data)
