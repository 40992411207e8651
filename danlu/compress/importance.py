"""How much each head, MLP channel, embedding channel and layer of a model matters, measured on calibration text.

Minitron (Muralidharan et al. 2024) ranks width by activations and depth by what a block changes. Here:

- an attention head's score is the norm of what it adds to the residual stream, ‖W_o[:, head] · y_head‖ per token;
- an MLP channel's score is |silu(gate)·up| · ‖W_down[:, c]‖ per token (its contribution to the residual);
- an embedding (hidden) channel's score is |RMSNorm output| at that channel, summed over every norm of the model;
- a layer's score is ShortGPT's block influence, 1 − cos(block input, block output), averaged over tokens.

Scores are means over tokens. Weighting activations by the output projection's column norm (Minitron uses the
activation alone) also catches a unit whose output weights are zero: its activation may be large and still change
nothing. One forward pass per batch under hooks, no gradients, so 1k calibration rows cost about as much as 1k rows of
evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from danlu import DanluError


@dataclass
class Importance:
    """Mean per-token scores; higher matters more. heads (L, H), channels (L, I), embedding (hidden,), layers (L,)."""

    heads: torch.Tensor
    channels: torch.Tensor
    embedding: torch.Tensor
    layers: torch.Tensor
    tokens: int

    def to_dict(self) -> dict[str, list]:
        return {k: getattr(self, k).tolist() for k in ("heads", "channels", "embedding", "layers")}


def require_native(model: torch.nn.Module, what: str) -> None:
    """Pruning and quantization edit the native Llama-family modules; a transformers-backed model is refused."""
    from danlu.model import Transformer

    if not isinstance(model, Transformer):
        raise DanluError(
            f"{what}: the model runs through transformers ({type(model).__name__}); {what} needs the native "
            "Llama-family model (llama, mistral, qwen2, qwen3 checkpoints)"
        )


@torch.no_grad()
def measure_importance(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> Importance:
    """Scores of every prunable unit of a native model from forward passes over `batches` (rows of input_ids)."""
    require_native(model, "importance")
    cfg = model.config
    n_layers, n_heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    device = model.lm_head.weight.device
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    channels = torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64)
    embedding = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    layers = torch.zeros(n_layers, dtype=torch.float64)
    handles = []

    def on_o_proj(i: int):  # noqa: ANN202 - hook factories
        def hook(mod: torch.nn.Module, args: tuple) -> None:
            y = args[0].float().reshape(-1, n_heads, hd)  # (tokens, H, D): each head's attention output
            w = mod.weight.float().view(mod.weight.size(0), n_heads, hd)  # (hidden, H, D)
            contrib = torch.einsum("thd,ohd->tho", y, w)  # what each head adds to the residual
            heads[i] += contrib.norm(dim=-1).sum(0).double().cpu()

        return hook

    def on_down_proj(i: int):  # noqa: ANN202
        def hook(mod: torch.nn.Module, args: tuple) -> None:
            act = args[0].float().reshape(-1, args[0].size(-1)).abs()
            channels[i] += (act.sum(0) * mod.weight.float().norm(dim=0)).double().cpu()

        return hook

    def on_norm(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        embedding.add_(out.float().reshape(-1, out.size(-1)).abs().sum(0).double().cpu())

    def on_block(i: int):  # noqa: ANN202
        def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            x, y = args[0].float().reshape(-1, out.size(-1)), out.float().reshape(-1, out.size(-1))
            layers[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum().double().cpu()

        return hook

    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(block.input_layernorm.register_forward_hook(on_norm))
        handles.append(block.post_attention_layernorm.register_forward_hook(on_norm))
        handles.append(block.register_forward_hook(on_block(i)))
    handles.append(model.model.norm.register_forward_hook(on_norm))
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            model.hidden_states(ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise DanluError("importance: no calibration tokens (the calibration data is empty)")
    return Importance(
        heads=(heads / tokens).float(), channels=(channels / tokens).float(),
        embedding=(embedding / tokens).float(), layers=(layers / tokens).float(), tokens=tokens,
    )  # fmt: skip
