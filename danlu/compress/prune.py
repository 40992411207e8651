"""Structured pruning: a smaller model cut out of a bigger one by importance (Minitron width, ShortGPT depth).

The student keeps, per layer, the most important attention heads (whole KV groups first, then query heads within
each kept group, so grouped-query attention stays valid), the most important MLP channels, globally the most
important hidden (embedding) channels, and the layers with the largest block influence. Every kept weight is
copied unchanged, so pruning nothing reproduces the teacher exactly, and the result is an ordinary checkpoint
(same tensor names, smaller shapes) that transformers, vLLM and the GGUF export load as they are.

Widths stay multiples of `MULTIPLE` (GGUF quantizes rows in blocks of 32) and the head dim is never changed (vLLM's
kernels want 64 or 128), which is why a target shape is validated before anything is cut.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from danlu import DanluError
from danlu.compress.importance import Importance, require_native
from danlu.model import ModelConfig, Transformer

MULTIPLE = 32  # GGUF block size: hidden and MLP widths must be multiples of it


@dataclass
class TargetShape:
    """The student's shape; None keeps the teacher's value."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None


def shape_for_ratio(cfg: ModelConfig, ratio: float, multiple: int = 64) -> TargetShape:
    """A student with about 1/ratio of the teacher's non-embedding parameters.

    Non-embedding parameters grow as layers × width², so layers and every width shrink by ratio^(1/3) each (Minitron
    found width pruning slightly better than depth at equal size; a cube root keeps both moderate). Widths round to
    `multiple`, heads to whole KV groups; the achieved ratio is reported, not assumed.
    """
    if not ratio or ratio < 1:
        raise DanluError(f"compress.ratio={ratio}: must be ≥ 1 (the teacher's size divided by the student's)")
    f = ratio ** (-1 / 3)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = max(1, round(cfg.num_key_value_heads * f))
    shape = TargetShape(
        hidden_size=max(multiple, multiple * round(cfg.hidden_size * f / multiple)),
        intermediate_size=max(multiple, multiple * round(cfg.intermediate_size * f / multiple)),
        num_hidden_layers=max(1, round(cfg.num_hidden_layers * f)),
        num_attention_heads=kv * group,
        num_key_value_heads=kv,
    )
    achieved = achieved_ratio(cfg, student_config(cfg, shape))
    if achieved < ratio / 2:  # the floors (one layer, one KV group, widths of `multiple`) stop the cut
        raise DanluError(
            f"compress.ratio={ratio:g}: the smallest student this teacher allows at widths in multiples of "
            f"{multiple} (hidden {shape.hidden_size}, MLP {shape.intermediate_size}, {shape.num_hidden_layers} "
            f"layer(s), {kv} KV head(s)) is only {achieved:.1f}× smaller; choose compress.ratio ≤ {achieved:.1f} "
            "or a smaller compress.multiple"
        )
    return shape


def student_config(cfg: ModelConfig, target: TargetShape) -> ModelConfig:
    """The teacher's config with the target's dimensions, after checking that the target can be cut from it."""
    t = {k: v for k, v in dataclasses.asdict(target).items() if v is not None}
    new = {**dataclasses.asdict(cfg), **t, "head_dim": cfg.head_dim, "depth": None}
    problems = []
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        value, limit = new[key], getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value} (must be a positive whole number)")
        elif value > limit:
            problems.append(f"{key}={value} is larger than the teacher's {limit} (pruning only removes)")
    for key in ("hidden_size", "intermediate_size"):
        if isinstance(new[key], int) and new[key] % MULTIPLE:
            problems.append(f"{key}={new[key]} is not a multiple of {MULTIPLE} (GGUF quantizes rows in blocks of "
                            f"{MULTIPLE}; try {max(MULTIPLE, MULTIPLE * round(new[key] / MULTIPLE))})")  # fmt: skip
    heads, kv = new["num_attention_heads"], new["num_key_value_heads"]
    if not problems and heads % kv:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if not problems and heads // kv > cfg.num_attention_heads // cfg.num_key_value_heads:
        problems.append(f"{heads // kv} query heads per KV head, more than the teacher's "
                        f"{cfg.num_attention_heads // cfg.num_key_value_heads} (pruning cannot regroup heads)")  # fmt: skip
    if problems:
        raise DanluError(
            "compress.prune: target shape cannot be cut from the teacher: " + "; ".join(problems)
        )
    return ModelConfig(**new)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the earlier unit wins)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return order.sort().values


@dataclass
class PrunePlan:
    """Which units survive: kept layer indices, and per kept layer its query heads, KV heads and MLP channels."""

    layers: list[int]
    heads: dict[int, list[int]]
    kv_heads: dict[int, list[int]]
    channels: dict[int, list[int]]
    embedding: list[int]

    def summary(self, cfg: ModelConfig) -> dict[str, Any]:
        dropped = sorted(set(range(cfg.num_hidden_layers)) - set(self.layers))
        return {"layers_dropped": dropped, "hidden_dropped": cfg.hidden_size - len(self.embedding)}


def plan_pruning(cfg: ModelConfig, scores: Importance, target: ModelConfig) -> PrunePlan:
    """The units to keep: the highest scores of each kind, at the target's counts."""
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    new_group = target.num_attention_heads // target.num_key_value_heads
    layers = _top(scores.layers, target.num_hidden_layers).tolist()
    heads, kv_heads, channels = {}, {}, {}
    for i in layers:
        per_head = scores.heads[i].view(cfg.num_key_value_heads, group)
        kept_groups = _top(per_head.sum(1), target.num_key_value_heads).tolist()
        kv_heads[i] = kept_groups
        heads[i] = [g * group + h for g in kept_groups for h in _top(per_head[g], new_group).tolist()]
        channels[i] = _top(scores.channels[i], target.intermediate_size).tolist()
    return PrunePlan(layers, heads, kv_heads, channels, _top(scores.embedding, target.hidden_size).tolist())


def _rows(t: torch.Tensor, idx: list[int], size: int = 1) -> torch.Tensor:
    """Rows of `t` in blocks of `size` (a head's rows are head_dim consecutive rows)."""
    index = torch.tensor([j * size + d for j in idx for d in range(size)], dtype=torch.long, device=t.device)
    return t.index_select(0, index)


def _cols(t: torch.Tensor, idx: list[int], size: int = 1) -> torch.Tensor:
    index = torch.tensor([j * size + d for j in idx for d in range(size)], dtype=torch.long, device=t.device)
    return t.index_select(1, index)


@torch.no_grad()
def apply_pruning(model: Transformer, plan: PrunePlan, target: ModelConfig) -> Transformer:
    """A new model of the target's shape holding the kept slices of `model`'s weights (the teacher is untouched)."""
    require_native(model, "prune")
    hd = model.config.head_dim
    src = {k: v for k, v in model.state_dict().items() if not k.startswith("rope_")}
    emb = plan.embedding
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _cols(src["model.embed_tokens.weight"], emb),
        "model.norm.weight": src["model.norm.weight"][emb],
    }
    if not target.tie_word_embeddings:
        out["lm_head.weight"] = _cols(src["lm_head.weight"], emb)
    for new_i, i in enumerate(plan.layers):
        a, n = f"model.layers.{i}.", f"model.layers.{new_i}."
        heads, kv, ch = plan.heads[i], plan.kv_heads[i], plan.channels[i]
        for name, keep, size in (("q_proj", heads, hd), ("k_proj", kv, hd), ("v_proj", kv, hd)):
            out[f"{n}self_attn.{name}.weight"] = _cols(
                _rows(src[f"{a}self_attn.{name}.weight"], keep, size), emb
            )
            if f"{a}self_attn.{name}.bias" in src:
                out[f"{n}self_attn.{name}.bias"] = _rows(src[f"{a}self_attn.{name}.bias"], keep, size)
        out[f"{n}self_attn.o_proj.weight"] = _rows(_cols(src[f"{a}self_attn.o_proj.weight"], heads, hd), emb)
        for name in ("gate_proj", "up_proj"):
            out[f"{n}mlp.{name}.weight"] = _cols(_rows(src[f"{a}mlp.{name}.weight"], ch), emb)
            if f"{a}mlp.{name}.bias" in src:
                out[f"{n}mlp.{name}.bias"] = _rows(src[f"{a}mlp.{name}.bias"], ch)
        out[f"{n}mlp.down_proj.weight"] = _rows(_cols(src[f"{a}mlp.down_proj.weight"], ch), emb)
        for key in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "input_layernorm.weight",
                    "post_attention_layernorm.weight"):  # fmt: skip
            if a + key in src:
                out[n + key] = src[a + key][emb]
        for key in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):  # per head_dim: kept whole
            if a + key in src:
                out[n + key] = src[a + key]
    device = model.lm_head.weight.device
    with torch.device("meta"):
        student = Transformer(target)
    student.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False, assign=True)
    student.tie_weights()
    student.reset_rope(device)
    return student.to(device)


def prune(model: Transformer, scores: Importance, target: TargetShape) -> tuple[Transformer, PrunePlan]:
    """The student cut from `model` to `target` by `scores`, and the plan that says what was kept."""
    require_native(model, "prune")
    new_cfg = student_config(model.config, target)
    plan = plan_pruning(model.config, scores, new_cfg)
    return apply_pruning(model, plan, new_cfg), plan


def non_embedding_params(cfg: ModelConfig) -> int:
    return cfg.num_params(embeddings=False)


def achieved_ratio(teacher: ModelConfig, student: ModelConfig) -> float:
    return non_embedding_params(teacher) / max(1, non_embedding_params(student))
