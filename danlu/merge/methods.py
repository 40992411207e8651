"""The merge methods as pure tensor functions, one tensor name at a time, with mergekit's definitions.

Each function takes the same-named tensor of every input model (plus the base model's where the method has one)
and the parameters resolved for that tensor, and returns the merged tensor. They follow mergekit 0.1.5
(`mergekit/merge_methods/*.py`, `mergekit/sparsify.py`) formula for formula, so a mergekit YAML gives the same
model here (tests/test_merge.py checks them against independently written formulas, and against mergekit itself
where it is installed). Two deliberate differences: arithmetic is done in float32 (float64 for float64 inputs)
whatever the stored dtype, and DARE's random masks come from a generator seeded by (seed, tensor name, model), so a
merge is reproducible and does not depend on the order tensors are visited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Param:
    """A method parameter as mergekit declares it: `shared` (one value per tensor) or per input model."""

    name: str
    kind: type
    default: Any = None  # None = required
    per_model: bool = False
    base_too: bool = False  # per-model parameters the base model also gets (linear's weight)


@dataclass(frozen=True)
class Method:
    """What a method needs (`base`: required | ignored; input counts include the base) and its parameters."""

    name: str
    base: str
    min_inputs: int = 1
    max_inputs: int | None = None
    params: tuple[Param, ...] = field(default_factory=tuple)
    sparsify: str | None = None  # "magnitude" (TIES) | "random" (DARE)
    consensus: bool = False  # TIES sign election


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> Method:
    """The generalized task-arithmetic family (task_arithmetic, ties, dare_ties, dare_linear)."""
    return Method(
        name, "required", sparsify=sparsify, consensus=consensus,
        params=(
            Param("int8_mask", bool, False), Param("normalize", bool, normalize), Param("rescale", bool, rescale),
            Param("lambda", float, 1.0), Param("weight", float, None, per_model=True),
            Param("density", float, 1.0, per_model=True),
        ),
    )  # fmt: skip


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", "ignored", params=(Param("weight", float, None, True, True), Param("normalize", bool, True))),
        Method("slerp", "required", 2, 2, params=(Param("t", float),)),
        _gta("task_arithmetic", None, False, normalize=False, rescale=False),
        _gta("ties", "magnitude", True, normalize=True, rescale=False),
        _gta("dare_ties", "random", True, normalize=False, rescale=True),
        _gta("dare_linear", "random", False, normalize=False, rescale=True),
        Method("model_stock", "required", 3, params=(Param("filter_wise", bool, False),)),
    )
}  # fmt: skip


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σ w_i x_i, divided by Σ w_i when `normalize` (mergekit: Wortsman et al. 2022, model soups)."""
    dtype = work_dtype(tensors[0])
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for t, w in zip(tensors, weights):
        out.add_(t.to(dtype), alpha=float(w))
    if normalize:
        out.div_(float(sum(weights)))
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """Spherical interpolation from v0 (the base, t=0) to v1 (t=1) over the whole tensor as one vector; nearly
    collinear tensors (|cos| > dot_threshold) interpolate linearly. Norms below eps count as 1 (mergekit's rule)."""
    dtype = work_dtype(v0)
    a, b = v0.to(dtype).reshape(-1), v1.to(dtype).reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b).reshape(v0.shape)


def mask_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """The generator of DARE's mask for one tensor of one model: a stable hash of (seed, name, index)."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scales the masked delta back to the unmasked delta's L1 norm (mergekit's `rescale`, RescaleNorm.l1)."""
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keeps the `density` fraction of entries with the largest |value| (at least one), zeroes the rest (TIES)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    masked = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def random_prune(delta: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True) -> torch.Tensor:  # fmt: skip
    """Keeps each entry with probability `density` (a Bernoulli mask from `gen`), zeroes the rest (DARE)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=gen)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsify: str | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """base + λ · Σ w_i · prune(x_i − base), the sum kept to entries agreeing with the elected sign when
    `consensus` (TIES' sum rule) and divided by the summed weights of what was kept when `normalize`."""
    dtype = work_dtype(base)
    b = base.to(dtype)
    if not tensors:
        return b
    deltas = []
    for i, (t, d) in enumerate(zip(tensors, densities)):
        delta = t.to(dtype) - b
        if sparsify == "magnitude":
            delta = magnitude_prune(delta, d, rescale)
        elif sparsify == "random":
            delta = random_prune(delta, d, generators[i] if generators else torch.Generator(), rescale)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=dtype).reshape(-1, *([1] * b.dim()))
    stacked = stacked * w
    if consensus:
        majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(dtype)
        mask = (stacked.sign() == majority).to(dtype)
        mixed = (stacked * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return b + mixed


def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): the average of the fine-tuned tensors pulled towards the base by
    t = k·cosθ / (1 + (k−1)·cosθ), cosθ the mean pairwise cosine of their offsets from the base (per row when
    `filter_wise`); where the denominator vanishes the base is kept."""
    dtype = work_dtype(base)
    shape = base.shape
    if filter_wise:
        w0 = base.to(dtype) if base.dim() > 1 else base.to(dtype).unsqueeze(0)
        ws = [t.to(dtype) if t.dim() > 1 else t.to(dtype).unsqueeze(0) for t in tensors]
    else:
        w0 = base.to(dtype).reshape(-1)
        ws = [t.to(dtype).reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos_theta
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / torch.where(singular, 1, denom))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)
