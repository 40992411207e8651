"""The loss formulas of preference and RL training, each small and written out once.

They follow TRL's definitions (RewardTrainer, DPOTrainer's sigmoid loss, GRPOTrainer, PPOTrainer) so that a
number danlu reports means what the literature means by it. Every function takes plain tensors, so the tests
check them on fixed random tensors against the formulas written out independently.
Shapes: B sequences, T completion tokens; `mask` (B, T) is 1 on completion tokens that count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from danlu.model import IGNORE_INDEX


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalization; unbiased variance as TRL)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, T); 0 where the target is IGNORE_INDEX. Logits are already aligned."""
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * (targets != IGNORE_INDEX)


# ── reward model ─────────────────────────────────────────────────────────────────────────────────────────


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected - margin), mean over pairs (TRL RewardTrainer); `center_coef` adds
    coef·E[(r_c + r_r)²], which keeps rewards centred at zero so their scale means something across runs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


# ── DPO ───────────────────────────────────────────────────────────────────────────────────────────────────


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """DPO's sigmoid loss per pair, and the implicit rewards β·(log π - log π_ref) of chosen and rejected.

    Inputs are summed log-probabilities of each completion (B,). `label_smoothing` > 0 is conservative DPO
    (cDPO): it assumes that share of the labels is flipped.
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# ── KL estimators (Schulman, "Approximating KL divergence") ─────────────────────────────────────────────────


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π: k1 = log r⁻¹ (unbiased, high variance),
    k2 = ½(log r)² (low variance, biased), k3 = r - 1 - log r with r = π_ref/π (unbiased, always ≥ 0)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


# ── GRPO ──────────────────────────────────────────────────────────────────────────────────────────────────


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); rewards (B·G,) with each group's G samples adjacent.
    A group whose samples all score the same gets advantage 0: it teaches nothing, as it should."""
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def step_advantages(
    rewards: torch.Tensor, ends: torch.Tensor, group_size: int, length: int, eps: float = 1e-4
) -> torch.Tensor:
    """Token advantages from rewards given at steps: `rewards` and `ends` (B·G, S) hold each sample's reward for
    step s and the index of the token that completes it (the last step is usually the outcome, at the last token).

    Each step's rewards are normalized within the group like `group_advantages` (a step every sample got equally
    right or wrong teaches nothing), and a token's advantage is the sum over the steps it helped produce, those
    ending at or after it (DeepSeekMath's process supervision). Returns (B·G, length)."""
    adv = torch.stack(
        [group_advantages(rewards[:, s], group_size, eps=eps) for s in range(rewards.size(1))], 1
    )
    positions = torch.arange(length, device=rewards.device).view(1, 1, -1)
    return (adv.unsqueeze(-1) * (positions <= ends.unsqueeze(-1))).sum(1)


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
    loss_type: str = "grpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """GRPO's clipped surrogate with a sequence-level advantage (B,) broadcast over tokens, or per-token
    advantages (B, T) from `step_advantages`, plus β·KL (k3).

    loss_type: "grpo" averages tokens within each sequence then over sequences (the paper); "bnpo" averages
    over all tokens of the batch (DAPO's token-level loss: long answers are not down-weighted).
    """
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if beta and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected grpo or bnpo")
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    stats = {"kl": masked_mean(kl, m).detach(), "clip_ratio": masked_mean(is_clipped.float(), m).detach()}
    return loss, stats


# ── PPO ───────────────────────────────────────────────────────────────────────────────────────────────────


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens; returns (advantages, returns).

    Positions outside `mask` have neither reward nor value (the episode ended), so the value after the last
    token is 0: δ_t = r_t + γ·V_{t+1} - V_t, A_t = δ_t + γλ·A_{t+1}, returns = A + V.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    steps = rewards.size(1)
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages * m, (advantages + values) * m


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate max(-A·ρ, -A·clip(ρ, 1±ε)) averaged over tokens; returns (loss, clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)
    return loss, masked_mean((losses_clipped > losses).float(), mask).detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """½·max((V - R)², (clip(V, V_old ± ε) - R)²) averaged over tokens: the value may not jump far per update."""
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ── knowledge distillation ───────────────────────────────────────────────────────────────────────────────────


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
    beta: float = 0.5, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """TRL's generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024) between the token distributions at
    temperature T, mean over the positions `mask` keeps (all when None). β = 0 is the forward KL(teacher‖student),
    β = 1 the reverse KL(student‖teacher), in between β·KL(t‖m) + (1-β)·KL(s‖m) with m = β·t + (1-β)·s."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        mix = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        kl_t = (t.exp() * (t - mix)).sum(-1)
        kl_s = (s.exp() * (s - mix)).sum(-1)
        per_token = beta * kl_t + (1 - beta) * kl_s
    if mask is None:
        return per_token.mean()
    return masked_mean(per_token, mask)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Hinton's distillation loss: T²·KL(p_teacher^T ‖ p_student^T) per token, averaged over `mask`. The T² keeps
    the gradient's scale independent of the temperature (soft targets' gradients shrink as 1/T²)."""
    return temperature**2 * generalized_jsd(
        student_logits, teacher_logits, mask, beta=0.0, temperature=temperature
    )


def topk_kd_loss(
    student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_tail: torch.Tensor,
    mask: torch.Tensor | None = None, beta: float = 0.0, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """`kd_loss` (β = 0) or T²·`generalized_jsd` against a sparse teacher: its K most likely tokens' log-probs
    `teacher_logp` (B, T, K) at `teacher_ids`, and the log of the mass left to all other tokens `teacher_tail` (B, T).

    Both distributions are coarsened to the same K + 1 bins (the K tokens, and one bucket for the rest of the
    vocabulary), and the divergence is taken between the binned distributions. Unlike renormalizing the teacher's
    top K, the tail bucket keeps the mass the teacher leaves outside them as a target, so the student is not pushed
    to put all of its mass on K tokens; by the data-processing inequality the binned KL is a lower bound of the full
    one and equals it when K covers the vocabulary (the tail bin is then empty and left out)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = teacher_ids.long()
    s_bins = s.gather(-1, ids)
    t_bins = teacher_logp.float()
    if ids.size(-1) < s.size(-1):
        s_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
        s_bins = torch.cat([s_bins, s_tail], dim=-1)
        t_bins = torch.cat([t_bins, teacher_tail.float().unsqueeze(-1)], dim=-1)
    return temperature**2 * generalized_jsd(s_bins, t_bins, mask, beta=beta, temperature=1.0)
