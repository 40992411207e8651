"""PPO: the policy with a value head, rewards from a reward model or a checking function, a KL penalty to the
reference folded into the per-token rewards, GAE, and clipped policy + value losses (TRL's PPOTrainer formulas).

The value head lives on the policy's backbone (`PolicyWithValue`); the saved model is the plain policy (an HF
causal LM), and the value head's few weights travel in the data source's state so that resume is exact.
Under torchrun (DDP; FSDP is refused: rollouts need the whole policy on every rank) the advantages are whitened
over the global batch (`whiten_global`), so N processes train as one process with the same global batch.

With a `peft:` section (LoRA family) the backbone is frozen under the adapter, the value head still trains in full
(it starts at zero: there is nothing to adapt) and is not saved, as without an adapter; the output is the policy's
adapter folder, and the reference is the base with the adapter switched off (no copy; danlu.stages.dpo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.config import from_dict
from danlu.model import Transformer
from danlu.pipeline import StageContext
from danlu.stages.common import attach_with_reference
from danlu.stages.rollouts import Rollouts, Scorer, answer_accuracy, check_rollout_parallel, rollouts_compiled


@dataclass
class PPOConfig:
    model: str | None = None
    reference: str | None = None
    data: str | None = None  # RL prompts; in a pipeline: world/rl.jsonl
    eval_data: str | None = None  # held-out prompts; in a pipeline: world/eval/rl.jsonl
    reward: str | None = (
        None  # function name or reward model folder; in a pipeline: the reward stage if it ran
    )
    prompts_per_step: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    max_prompts: int = 0
    tools: bool = False  # execute the rollouts' tool calls (get_date, calculator) and score the final answer
    tool_rounds: int = 1
    eval_rows: int = 100
    resume: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(
        default_factory=dict
    )  # an adapter instead of all weights (danlu.adapters.PeftSpec)


TRAIN_DEFAULTS = {"steps": 40, "batch_size": 1, "lr": 5e-5, "warmup_steps": 5, "eval_every": 0, "log_every": 5,
                  "weight_decay": 0.0}  # fmt: skip


class PolicyWithValue(Transformer):
    """The policy (same parameter names as a causal LM) plus `value_head` on the final hidden states."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.hidden_size, 1, bias=True)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def logps_and_values(
        self, input_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from danlu.losses import token_logprobs

        h = self.hidden_states(input_ids)
        return token_logprobs(self.lm_head(h), targets), self.value_head(h).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, values: bool = False,
                **kw: Any) -> Any:  # fmt: skip
        """The causal LM's forward; with `values=True`, `logps_and_values`. Training calls it this way, through
        `forward`, because a DDP/FSDP wrapper only syncs gradients of what runs through the wrapper's __call__
        (the wrapper has no `logps_and_values`, and calling it on the inner module would skip the sync)."""
        if values:
            if targets is None:
                raise DanluError("PolicyWithValue(values=True) needs the targets whose log-probs it returns")
            return self.logps_and_values(input_ids, targets)
        return super().forward(input_ids, targets, **kw)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Model folders hold only the policy; the value head is restored by the data source on resume."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        result.missing_keys[:] = [k for k in result.missing_keys if not k.startswith("value_head.")]
        if strict and (result.missing_keys or result.unexpected_keys):
            raise RuntimeError(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        return result


def whiten_global(x: torch.Tensor, mask: torch.Tensor, world_size: int) -> torch.Tensor:
    """`losses.masked_whiten` over the GLOBAL batch: (x - mean) / std with the mean and (unbiased) variance of the
    masked entries of every rank's rollouts, summed in fp64 by one all-reduce. Per-rank statistics would whiten
    each rank's half of the batch on its own, and N processes would train on other advantages than one process
    with the same global batch."""
    import torch.distributed as dist

    m = mask.to(torch.float64)
    xd = x.to(torch.float64) * m
    sums = torch.stack([xd.sum(), (xd * xd).sum(), m.sum()])
    if world_size > 1:
        dist.all_reduce(sums)
    total, squares, n = sums.tolist()
    mean = total / max(n, 1.0)
    var = max(squares - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return ((x.to(torch.float64) - mean) / math.sqrt(var + 1e-8)).to(x.dtype)


class PPORollouts(Rollouts):
    """Rollouts plus old log-probs, values, KL-shaped rewards and GAE advantages."""

    def __init__(self, *a: Any, cfg: PPOConfig, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.cfg = cfg

    def next_batch(self) -> dict[str, torch.Tensor]:
        from danlu.losses import gae, kl_estimate

        b = super().next_batch()
        device = self.policy.lm_head.weight.device
        x, y = b["input_ids"].to(device), b["targets"].to(device)
        mask = y != -100
        with torch.no_grad(), self.autocast():
            old_logp, values = self.policy.logps_and_values(x, y)
        kl = kl_estimate(old_logp.float(), b["ref_logps"].to(device), "k1") * mask
        rewards = -self.cfg.kl_coef * kl
        last = mask.long().cumsum(1).argmax(1)  # index of each row's last completion token
        rewards[torch.arange(len(last)), last] += b["rewards"].to(device)
        adv, returns = gae(rewards, values * mask, mask, self.cfg.gamma, self.cfg.lam)
        b.update(
            old_logps=old_logp.float().cpu(), old_values=(values * mask).cpu(), returns=returns.cpu(),
            advantages=(whiten_global(adv, mask, self.world_size) * mask).cpu(), kl_seq=kl.sum(1).cpu(),
        )  # fmt: skip
        return b

    def state_dict(self) -> dict[str, Any]:
        vh = self.policy.value_head
        return {**super().state_dict(), "value_weight": vh.weight.detach().cpu().flatten().tolist(),
                "value_bias": vh.bias.detach().cpu().tolist()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        vh = self.policy.value_head
        with torch.no_grad():
            vh.weight.copy_(torch.tensor(state["value_weight"]).view_as(vh.weight))
            vh.bias.copy_(torch.tensor(state["value_bias"]))


def train_ppo(
    parent: Path, data: str | Path, out: Path, *, recipe: dict[str, Any], cfg: PPOConfig, reward: str,
    eval_data: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.preference import read_rl_prompts
    from danlu.engine import Hooks, Trainer, init_distributed, resume_wanted, set_seed
    from danlu.losses import ppo_policy_loss, ppo_value_loss
    from danlu.stages.common import make_saver, parent_checkpoint, train_config

    tcfg = train_config(recipe, cfg.train, "ppo", TRAIN_DEFAULTS)
    d = init_distributed(tcfg.device)
    check_rollout_parallel("ppo", tcfg.parallel, d.world_size)
    set_seed(tcfg.seed)
    ckpt = parent_checkpoint(parent)
    if ckpt.backend != "native":
        raise DanluError(
            f"{parent}: PPO's value head needs the native (Llama-family) model; this one runs through transformers"
        )
    tok = ckpt.tokenizer
    policy = PolicyWithValue(ckpt.config)
    policy.load_state_dict(ckpt.model.state_dict())
    ckpt.model = policy
    adapter, ref = attach_with_reference(
        ckpt, value_head_section(cfg.peft, policy), "ppo", parent, cfg.reference, tcfg.seed
    )
    policy.value_head.requires_grad_(
        True
    )  # the adapter froze every base weight; the value head always trains
    scorer = Scorer(reward, tok)
    prompts = read_rl_prompts(data, cfg.max_prompts or None)
    held = read_rl_prompts(eval_data, cfg.eval_rows or None, split="dev") if eval_data else []
    source = PPORollouts(
        prompts, tok, policy, ref, scorer, group_size=1, prompts_per_step=cfg.prompts_per_step,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, seed=tcfg.seed, cfg=cfg,
        rank=d.rank, world_size=d.world_size, tools=cfg.tools, tool_rounds=cfg.tool_rounds,
        compile=rollouts_compiled(tcfg.compile, tcfg.steps, tcfg.device),
    )  # fmt: skip

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = b["targets"] != -100
        logp, values = m(b["input_ids"], b["targets"], values=True)  # through the DDP/FSDP wrapper (forward)
        pg, clipfrac = ppo_policy_loss(logp.float(), b["old_logps"], b["advantages"], mask, cfg.clip)
        vf = ppo_value_loss(values, b["old_values"], b["returns"], mask, cfg.value_clip)
        return pg + cfg.vf_coef * vf, {"reward": float(b["rewards"].mean()), "kl": float(b["kl_seq"].mean()),
                                       "policy_loss": float(pg.detach()), "value_loss": float(vf.detach()),
                                       "clip_frac": float(clipfrac)}  # fmt: skip

    meta = {"stage": "ppo", "parent": str(parent), "data": str(data), "reward": reward}
    saver = make_saver(ckpt.config, tok, meta, chat=True, adapter=adapter)

    def save(state: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        saver({k: v for k, v in state.items() if not k.startswith("value_head.")}, folder, step_meta)

    # Policy and value losses are means over the rollout's completion tokens: the engine's default weighting
    # (target_tokens) makes the step's gradient the mean over the tokens of all ranks' rollouts.
    trainer = Trainer(tcfg, policy, source, loss_fn, out, Hooks(save_model=save), stage="ppo")
    source.autocast = trainer.autocast
    ref.to(trainer.device)
    if scorer.model is not None:
        scorer.model.to(trainer.device)
    result: dict[str, Any] = {}
    if held:
        with trainer.autocast():
            result["heldout_reward_before"] = answer_accuracy(
                policy, tok, held, scorer, cfg.max_new_tokens, compile=tcfg.compile
            )["accuracy"]
    if resume_wanted(out, cfg.resume, tcfg, "ppo"):
        trainer.resume()
    if d.main:
        print(f"[danlu] ppo: {len(prompts)} prompts, {cfg.prompts_per_step} samples per step and process "
              f"({d.world_size}), reward {reward}, kl_coef {cfg.kl_coef}, {tcfg.steps} steps")  # fmt: skip
    metrics = trainer.fit()
    trains = [h for h in trainer.history if h.get("event") == "train" and "reward" in h]
    result.update({"steps": trainer.step, "kl": metrics.get("kl"), "value_loss": metrics.get("value_loss")})
    if trains:
        k = max(1, len(trains) // 4)
        result["train_reward_first"] = round(sum(h["reward"] for h in trains[:k]) / k, 4)
        result["train_reward_last"] = round(sum(h["reward"] for h in trains[-k:]) / k, 4)
        result["kl_max"] = round(max(h["kl"] for h in trains), 4)
    if held:
        with trainer.autocast():
            result["heldout_reward"] = answer_accuracy(
                policy, tok, held, scorer, cfg.max_new_tokens, compile=tcfg.compile
            )["accuracy"]
    return result


VALUE_HEAD = "value_head"


def value_head_section(section: dict[str, Any], policy: nn.Module) -> dict[str, Any]:
    """`ppo.peft` with the target modules made explicit: every backbone linear layer but the value head, which
    trains in full (a rank-r update of a zero 1-row head would only slow it down). Soft prompts are refused: the
    value head reads the policy's hidden states per token, which a PromptedLM does not expose to it."""
    from danlu.adapters import peft_spec
    from danlu.adapters.spec import linear_suffixes

    spec = peft_spec(section, "ppo.peft")
    if not spec.enabled:
        return section
    if not spec.is_lora:
        raise DanluError(f"ppo.peft.method: {spec.method} is a soft prompt; PPO's value head reads the policy's "
                         "hidden states, so PPO takes a LoRA-family adapter (lora, dora, pissa, rslora)")  # fmt: skip
    targets = spec.target_modules
    if targets is None:
        targets = [s for s in linear_suffixes(policy) if s != VALUE_HEAD]
    elif targets == VALUE_HEAD or (isinstance(targets, list) and VALUE_HEAD in targets):
        raise DanluError(f"ppo.peft.target_modules: {VALUE_HEAD!r} trains in full; list only policy layers")
    return {**section, "target_modules": targets}


def read_config(section: dict[str, Any]) -> PPOConfig:
    return from_dict(PPOConfig, section, "ppo")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.stages.common import rl_stage_inputs

    cfg = read_config(ctx.cfg)
    parent, data, eval_data = rl_stage_inputs(ctx, cfg, "rl.jsonl", "eval/rl.jsonl")
    reward = cfg.reward or (str(ctx.input("reward")) if ctx.has("reward") else "world")
    return train_ppo(parent, data, ctx.out, recipe=ctx.recipe, cfg=cfg, reward=reward, eval_data=eval_data)
