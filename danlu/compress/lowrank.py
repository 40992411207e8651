"""Low-rank factorization of a model's block weights: activation-aware SVD, rank chosen by retained energy.

A weight W (out × in) becomes B · A with A (r × in) and B (out × r), which saves parameters only when
r · (in + out) < in · out. Plain SVD keeps the directions of largest weight norm; what matters is the layer's output
on real inputs, ‖(W - BA) x‖, so (ASVD, Yuan et al. 2023) the SVD is taken of W · diag(s), with s the root mean
square of each input channel on calibration text, and the scale is folded back: A = Vᵣᵀ diag(1/s), B = Uᵣ Σᵣ. The
rank is the smallest r whose singular values keep `energy` of Σ σ² (the share of the calibration outputs' squared
norm kept); a layer whose rank would not save parameters stays dense.

The factorized model is an option measured by the compress pipeline, not a checkpoint format: every Llama loader
expects one dense matrix per projection, so it is kept only if it pays (see `danlu.compress.pipeline`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.compress.importance import require_native
from danlu.compress.quantize import block_linears


@dataclass
class LowRankConfig:
    """Recipe `compress.factorize:` (off unless enabled)."""

    enabled: bool = False
    energy: float = 0.9  # share of Σσ² (activation-weighted) each layer keeps
    heal_steps: int = 100  # distillation steps after factorizing (0: measure as cut)
    max_bpb_cost: float = 0.02  # kept only if held-out bpb rises by at most this share …
    min_saving: float = 0.1  # … and non-embedding parameters fall by at least this share


class LowRankLinear(nn.Module):
    """y = B (A x) (+ bias): two thin matrices standing in for one nn.Linear."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = a.size(1), b.size(0), a.size(0)
        self.down = nn.Linear(self.in_features, self.rank, bias=False, device=a.device)
        self.up = nn.Linear(self.rank, self.out_features, bias=bias is not None, device=b.device)
        with torch.no_grad():
            self.down.weight.copy_(a)
            self.up.weight.copy_(b)
            if bias is not None:
                self.up.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product (for code that reads `.weight`, e.g. importance hooks); not used by forward."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} σᵢ² ≥ energy · Σ σᵢ² (at least 1)."""
    if not 0 < energy <= 1:
        raise DanluError(f"compress.factorize.energy={energy}: must be in (0, 1] (the share of Σσ² kept)")
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp(min=1e-300)
    return int(min(len(power), int((kept < energy - 1e-12).sum()) + 1))


def factorize_weight(
    w: torch.Tensor, scale: torch.Tensor | None, energy: float, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) with W ≈ B A at the rank that keeps `energy` of the activation-weighted spectrum (or at `rank`), or
    None when that rank saves no parameters. `scale` is the per-input-channel RMS of the layer's inputs (None:
    plain SVD)."""
    out_f, in_f = w.shape
    s = torch.ones(in_f, dtype=torch.float64) if scale is None else scale.double().clamp(min=1e-6)
    u, sigma, vh = torch.linalg.svd(w.double() * s[None, :], full_matrices=False)
    r = rank_for_energy(sigma, energy) if rank is None else max(1, min(rank, len(sigma)))
    if r * (in_f + out_f) >= in_f * out_f:
        return None
    a = vh[:r] / s[None, :]
    b = u[:, :r] * sigma[:r]
    return a.to(w.dtype), b.to(w.dtype)


@torch.no_grad()
def input_scales(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[nn.Linear, torch.Tensor]:
    """RMS of every block Linear's input channels over the calibration `batches` (one forward pass each)."""
    sums: dict[nn.Linear, torch.Tensor] = {}
    counts: dict[nn.Linear, int] = {}
    handles = []

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().double().reshape(-1, args[0].size(-1))
        sums[mod] = sums.get(mod, 0) + (x * x).sum(0).cpu()
        counts[mod] = counts.get(mod, 0) + x.size(0)

    for _, _, lin in block_linears(model):
        handles.append(lin.register_forward_pre_hook(hook))
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            model.hidden_states(b["input_ids"].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts:
        raise DanluError("compress.factorize: no calibration tokens (the calibration data is empty)")
    return {m: (sums[m] / counts[m]).sqrt().float() for m in sums}


@torch.no_grad()
def factorize_model(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]] | None, energy: float
) -> dict[str, Any]:
    """Replaces, in place, every block Linear whose activation-aware rank at `energy` saves parameters by a
    LowRankLinear; returns {layers_factorized, layers_dense, mean_rank_share}. `batches` None: plain SVD."""
    require_native(model, "factorize")
    rank_for_energy(torch.ones(1), energy)  # validates energy before any work
    scales = input_scales(model, batches) if batches is not None else {}
    done, dense, shares = 0, 0, []
    for parent, name, lin in block_linears(model):
        ab = factorize_weight(lin.weight.detach().float(), scales.get(lin), energy)
        if ab is None:
            dense += 1
            continue
        a, b = ab
        bias = lin.bias.detach() if lin.bias is not None else None
        setattr(parent, name, LowRankLinear(a.to(lin.weight.dtype), b.to(lin.weight.dtype), bias))
        done += 1
        shares.append(a.size(0) / min(lin.in_features, lin.out_features))
    return {"layers_factorized": done, "layers_dense": dense,
            "mean_rank_share": sum(shares) / len(shares) if shares else None}  # fmt: skip
