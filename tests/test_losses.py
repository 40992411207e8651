"""Each loss against its formula written out independently (scalar loops over fixed random tensors)."""

from __future__ import annotations

import math

import torch

from danlu import losses


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_with_margin_and_centering() -> None:
    c, r, m = _rand(6, seed=1), _rand(6, seed=2), _rand(6, seed=3).abs()
    want = sum(-_logsig(float(c[i] - r[i] - m[i])) for i in range(6)) / 6
    want += 0.01 * sum(float(c[i] + r[i]) ** 2 for i in range(6)) / 6
    got = losses.bradley_terry_loss(c, r, m, center_coef=0.01)
    assert math.isclose(float(got), want, rel_tol=1e-10)


def test_dpo_sigmoid_loss_and_rewards() -> None:
    pc, pr, rc, rr = (_rand(5, seed=s) * 5 for s in range(4))
    beta, ls = 0.1, 0.1
    got, cr, rj = losses.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=ls)
    for i in range(5):
        h = float((pc[i] - rc[i]) - (pr[i] - rr[i]))
        want = -(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h)
        assert math.isclose(float(got[i]), want, rel_tol=1e-10)
        assert math.isclose(float(cr[i]), beta * float(pc[i] - rc[i]), rel_tol=1e-10)
        assert math.isclose(float(rj[i]), beta * float(pr[i] - rr[i]), rel_tol=1e-10)
    same = losses.dpo_loss(pc, pr, pc, pr, beta)[0]  # policy = reference: log 2 exactly
    assert torch.allclose(same, torch.full_like(same, math.log(2)))


def test_kl_estimators() -> None:
    lp, ref = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    for i in range(4):
        for j in range(3):
            d = float(lp[i, j] - ref[i, j])
            assert math.isclose(float(losses.kl_estimate(lp, ref, "k1")[i, j]), d, abs_tol=1e-12)
            assert math.isclose(float(losses.kl_estimate(lp, ref, "k2")[i, j]), 0.5 * d * d, abs_tol=1e-12)
            assert math.isclose(
                float(losses.kl_estimate(lp, ref, "k3")[i, j]), math.exp(-d) + d - 1, abs_tol=1e-12
            )


def test_group_advantages() -> None:
    r = _rand(12, seed=7)
    got = losses.group_advantages(r, 4)
    for g in range(3):
        xs = [float(v) for v in r[4 * g : 4 * g + 4]]
        mean = sum(xs) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)  # unbiased, as TRL (torch.std)
        for k in range(4):
            assert math.isclose(float(got[4 * g + k]), (xs[k] - mean) / (std + 1e-4), rel_tol=1e-9)
    flat = losses.group_advantages(torch.ones(8, dtype=torch.float64), 4)
    assert torch.equal(flat, torch.zeros(8, dtype=torch.float64))


def test_step_advantages_sum_each_steps_group_normalized_reward_over_the_tokens_before_it() -> None:
    rewards = torch.tensor(
        [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64
    )
    ends = torch.tensor([[1, 4], [2, 3], [0, 5], [1, 2], [3, 5], [0, 1]])
    got = losses.step_advantages(rewards, ends, group_size=2, length=6)

    def normalized(i: int, k: int) -> float:  # step k's reward of row i, normalized within its group of 2
        g = [float(rewards[j, k]) for j in (i - i % 2, i - i % 2 + 1)]
        mean = sum(g) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / 1)  # unbiased, n = 2
        return (float(rewards[i, k]) - mean) / (std + 1e-4)

    for i in range(6):
        for t in range(6):  # a token carries every step that ends at or after it
            want = sum(normalized(i, k) for k in range(2) if t <= int(ends[i, k]))
            assert math.isclose(float(got[i, t]), want, abs_tol=1e-9)
    assert torch.equal(got[2:4], torch.zeros(2, 6, dtype=torch.float64))  # a group that agrees everywhere


def _grpo_reference(lp, old, adv, mask, el, eh, beta, ref, kind):
    per_seq, tot, cnt = [], 0.0, 0.0
    for i in range(lp.shape[0]):
        s, n = 0.0, 0.0
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(float(lp[i, t] - old[i, t]))
            a = float(adv[i])
            val = -min(ratio * a, min(max(ratio, 1 - el), 1 + eh) * a)
            d = float(ref[i, t] - lp[i, t])
            val += beta * (math.exp(d) - d - 1)
            s, n = s + val, n + 1
        per_seq.append(s / max(n, 1))
        tot, cnt = tot + s, cnt + n
    return sum(per_seq) / len(per_seq) if kind == "grpo" else tot / cnt


def test_grpo_clipped_objective_with_kl() -> None:
    lp, old, ref = _rand(4, 6, seed=8) * 0.3, _rand(4, 6, seed=9) * 0.3, _rand(4, 6, seed=10) * 0.3
    adv = _rand(4, seed=11)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    for kind in ("grpo", "bnpo"):
        got, stats = losses.grpo_loss(
            lp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.04, ref_logp=ref, loss_type=kind
        )
        want = _grpo_reference(lp, old, adv, mask, 0.2, 0.28, 0.04, ref, kind)
        assert math.isclose(float(got), want, rel_tol=1e-9)
        assert 0.0 < float(stats["clip_ratio"]) < 1.0
    per_token = adv.unsqueeze(1).expand(4, 6)  # (B, T) advantages equal to broadcasting (B,) ones
    same, _ = losses.grpo_loss(lp, old, per_token, mask, eps_low=0.2, eps_high=0.28, beta=0.04, ref_logp=ref)
    assert math.isclose(
        float(same), _grpo_reference(lp, old, adv, mask, 0.2, 0.28, 0.04, ref, "grpo"), rel_tol=1e-9
    )


def test_gae() -> None:
    r, v = _rand(3, 5, seed=12), _rand(3, 5, seed=13)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    gamma, lam = 0.9, 0.8
    adv, ret = losses.gae(r, v, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(n)):
            nv = float(v[i, t + 1]) if t + 1 < n else 0.0
            delta = float(r[i, t]) + gamma * nv - float(v[i, t])
            last = delta + gamma * lam * last
            assert math.isclose(float(adv[i, t]), last, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(float(ret[i, t]), last + float(v[i, t]), rel_tol=1e-9, abs_tol=1e-12)
        assert torch.all(adv[i, n:] == 0)


def test_ppo_policy_and_value_losses() -> None:
    lp, old, adv = _rand(3, 4, seed=14) * 0.5, _rand(3, 4, seed=15) * 0.5, _rand(3, 4, seed=16)
    val, old_v, ret = _rand(3, 4, seed=17), _rand(3, 4, seed=18), _rand(3, 4, seed=19)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 2:] = False
    pg, _ = losses.ppo_policy_loss(lp, old, adv, mask, clip=0.2)
    vf = losses.ppo_value_loss(val, old_v, ret, mask, clip=0.2)
    pg_sum = vf_sum = n = 0.0
    for i in range(3):
        for t in range(4):
            if not mask[i, t]:
                continue
            ratio, a = math.exp(float(lp[i, t] - old[i, t])), float(adv[i, t])
            pg_sum += max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            vc = min(max(float(val[i, t]), float(old_v[i, t]) - 0.2), float(old_v[i, t]) + 0.2)
            vf_sum += 0.5 * max((float(val[i, t]) - float(ret[i, t])) ** 2, (vc - float(ret[i, t])) ** 2)
            n += 1
    assert math.isclose(float(pg), pg_sum / n, rel_tol=1e-9)
    assert math.isclose(float(vf), vf_sum / n, rel_tol=1e-9)


def test_masked_whiten() -> None:
    x = _rand(2, 5, seed=20)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = losses.masked_whiten(x, mask)
    vals = w[mask]
    assert abs(float(vals.mean())) < 1e-9 and math.isclose(float(vals.std()), 1.0, rel_tol=1e-6)
