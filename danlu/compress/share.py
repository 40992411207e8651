"""Sharing weights between adjacent blocks (MobileLLM's immediate block-wise sharing, Liu et al. 2024).

MobileLLM runs each block twice in a row: depth doubles at no parameter cost, and the shared weights are read from
cache the second time. Used here as a compression step, it goes the other way: blocks 2k and 2k+1 of a trained model
become one set of weights executed at both positions, halving the block parameters, after which a short
distillation lets the shared weights settle. Of each pair the block with the larger block influence (ShortGPT's
1 − cos, from `danlu.compress.importance`) is the one kept.

Each position keeps its own attention module object (its layer index addresses the KV cache) whose projections
and norms are the kept block's modules, so decoding with a cache works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu.compress.importance import require_native


@dataclass
class ShareConfig:
    """Recipe `compress.share:` (off unless enabled)."""

    enabled: bool = False
    heal_steps: int = 100  # distillation steps after sharing (0: measure as cut)
    max_bpb_cost: float = 0.02  # kept only if held-out bpb rises by at most this share …
    min_saving: float = 0.1  # … and non-embedding parameters fall by at least this share


def _share_block(keep: nn.Module, into: nn.Module) -> None:
    """Makes `into` compute with `keep`'s weights (module objects shared), leaving `into`'s layer index."""
    into.input_layernorm = keep.input_layernorm
    into.post_attention_layernorm = keep.post_attention_layernorm
    into.mlp = keep.mlp
    for name, child in keep.self_attn.named_children():
        setattr(into.self_attn, name, child)


@torch.no_grad()
def share_adjacent_blocks(model: nn.Module, influence: torch.Tensor | None = None) -> dict[str, Any]:
    """Pairs blocks (0, 1), (2, 3), … and runs the more influential of each pair at both positions, in place
    (an odd last block stays alone). Returns {pairs, kept}: the pairs and, for each, the block whose weights serve it."""
    require_native(model, "share")
    layers = model.model.layers
    pairs, kept = [], []
    for i in range(0, len(layers) - 1, 2):
        j = i + 1
        src = j if influence is not None and float(influence[j]) > float(influence[i]) else i
        dst = i if src == j else j
        _share_block(layers[src], layers[dst])
        pairs.append([i, j])
        kept.append(src)
    return {"pairs": pairs, "kept": kept}
