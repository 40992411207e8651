"""The Llama-family decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional tied embeddings, KV cache.

Module and parameter names are exactly those of transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`
…), so a checkpoint is a plain state dict with no renaming, and `transformers`, vLLM and llama.cpp load it as Llama.
A few config flags grow the same code into the rest of the family, so open weights run on this path too (compiled
decode, packing, FSDP): q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), an explicit head_dim, untied embeddings and
Llama-3's rope scaling. Anything outside the family runs through `danlu.hf_model` behind the same interface.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from danlu import DanluError
from danlu.losses_fused import IGNORE_INDEX, linear_cross_entropy, logits_cross_entropy

__all__ = ["IGNORE_INDEX", "KVCache", "ModelConfig", "Transformer"]  # IGNORE_INDEX: its home is losses_fused


@dataclass
class ModelConfig:
    """Model shape. `depth` alone sets everything else (as nanochat's single knob does); explicit fields win.

    Widths are multiples of 64 (head dim 64, vLLM's kernels) and the MLP width a multiple of 64 (GGUF blocks of 32).
    """

    vocab_size: int = 4096
    depth: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    head_dim: int | None = None  # default hidden_size / heads; Qwen3 and some Llamas set it explicitly
    qkv_bias: bool = False  # biases on q/k/v (Qwen2; Llama's attention_bias sets this and o_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    rope_scaling: dict | None = (
        None  # None, {"rope_type": "linear", "factor"} or Llama-3's {"rope_type": "llama3", …}
    )
    model_type: str = "llama"  # the HF family written to config.json: llama, mistral, qwen2, qwen3
    torch_dtype: str = "float32"  # the dtype weights are saved in (the parent's for imported models)
    hf_extra: dict | None = None  # config.json keys of an imported model that danlu keeps but does not model

    def __post_init__(self) -> None:
        depth = self.depth or self.num_hidden_layers or 4
        self.num_hidden_layers = self.num_hidden_layers or depth
        self.hidden_size = self.hidden_size or 64 * depth
        self.num_attention_heads = self.num_attention_heads or max(1, self.hidden_size // 64)
        if self.num_key_value_heads is None:
            # GQA with groups of 2 where the head count allows it: half the KV cache, no measurable quality cost.
            heads = self.num_attention_heads
            self.num_key_value_heads = heads // 2 if heads % 2 == 0 and heads >= 2 else heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope_type = rope_scaling_type(self.rope_scaling)
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    def num_params(self, embeddings: bool = True) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
        per_layer += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + (2 * i + h) * self.mlp_bias
        per_layer += 2 * self.head_dim * self.qk_norm
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + h + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the 6N + attention estimate of the PaLM paper."""
        n = (
            self.num_params(embeddings=False) + self.vocab_size * self.hidden_size
        )  # the lm_head matmul counts
        attn = 12 * self.num_hidden_layers * self.hidden_size * seq_len
        return 6 * n + attn

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            training = torch.is_grad_enabled() and self.weight.dtype == torch.float32
            if training and torch.compiler.is_compiling():
                return _CompiledRMSNorm.apply(x, self.weight, self.eps)
            # One kernel eager; decoding a token runs 2 norms a layer, so calls add up.
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Normalize in fp32 as transformers does, so logits match it closely under bf16 autocast too.
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


_NORM_BLOCKS = 64  # row blocks of the weight gradient's first-stage sum (_CompiledRMSNorm)


class _CompiledRMSNorm(torch.autograd.Function):
    """fp32 RMSNorm for training under torch.compile: `F.rms_norm`'s math, with a backward written out so that the
    weight's gradient is a two-stage sum.

    Autograd's own backward sums `grad · x̂` over all B·T rows in one reduction per feature. Inductor's CPU code for
    that reduction loops over the features in groups of one vector and starts a parallel region per group (8 per
    norm at width 256), each of which waits for both cores, so on a shared CPU these kernels took 11–17% of the
    compiled tiny step. Summing blocks of rows first (a reduction parallel over blocks × features), then the few
    block sums, is the same sum up to fp32 rounding (tests/test_model.py checks loss and gradients) and made the
    whole step ~1.16× faster on a shared 2-core CPU at load ~10 (interleaved side by side); on a quiet machine
    the two are equal within noise (BENCHMARKS.md, eighth session)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # noqa: ANN001
        x, weight, rstd = ctx.saved_tensors
        d = x.size(-1)
        x_hat = (x * rstd).reshape(-1, d)
        g = grad.float().reshape(-1, d)
        rows = g.size(0)
        grad_w = None
        if ctx.needs_input_grad[1]:  # a frozen norm (adapter training) skips the sum
            # 64 blocks, the rows zero-padded to a multiple of 64: a block count chosen by divisibility made
            # dynamo guard on rows % 64, % 32, … and compile RL's varying shapes again and again
            per_block = F.pad(g * x_hat, (0, 0, 0, (-rows) % _NORM_BLOCKS)).view(_NORM_BLOCKS, -1, d)
            grad_w = per_block.sum(1).sum(0)
        g_w = g * weight
        grad_x = rstd.reshape(-1, 1) * (g_w - x_hat * (g_w * x_hat).mean(-1, keepdim=True))
        return grad_x.view(x.shape), grad_w, None


ROPE_TYPES = ("default", "linear", "llama3")


def rope_scaling_type(scaling: dict | None) -> str:
    """The rope type of a config's `rope_scaling` ("default" when absent); HF writes it as `rope_type` or `type`."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Rotation frequencies per pair of dims, with the config's scaling applied as transformers applies it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    kind, scaling = rope_scaling_type(cfg.rope_scaling), cfg.rope_scaling or {}
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if (
        kind == "llama3"
    ):  # Llama 3.1+: low frequencies slowed by `factor`, a smooth ramp between the two bands
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(
    cfg: ModelConfig, length: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables: the sin's first half is negated, so `apply_rope` rotates with one `roll`."""
    inv_freq = rope_inv_freq(cfg, device)
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    # transformers' "rotate_half" layout (not interleaved pairs): dims i and i + D/2 rotate together.
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs, freqs], dim=-1).sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D). rotate_half(x) * sin == roll(x, D/2) * signed sin."""
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


def kv_cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """What a model with this weight keeps keys and values in: bf16 under autocast (what attention then computes
    in), else the weight's dtype. One rule for every cache built on our layout (danlu's Transformer, prompt
    adapters over it)."""
    return torch.bfloat16 if torch.is_autocast_enabled(weight.device.type) else weight.dtype


class KVCache:
    """Preallocated keys/values for generation. Rows may be left-padded: `pad[b]` leading slots of row b are ignored.

    All rows advance together (`pos`), which is what batched sampling needs; each row's RoPE position is
    `pos - pad[b]`, so a left-padded prompt gets the same positions as it would alone. One tensor per layer, so
    a decode step writes and reads it with `narrow` views (the step is small enough that indexing calls show).
    """

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
        pad: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0
        self.max_len = max_len
        self.pad = pad.to(device) if pad is not None and bool((pad > 0).any()) else None

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        base = torch.arange(self.pos, self.pos + t, device=device).unsqueeze(0)
        if self.pad is None:
            return base
        return (base - self.pad.unsqueeze(1)).clamp(min=0)

    def mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (B, 1, t, pos+t) mask, or None where plain causal/full attention is right."""
        if self.pad is None and t == 1:
            return None
        q = torch.arange(self.pos, self.pos + t, device=device).view(1, 1, t, 1)
        k = torch.arange(self.pos + t, device=device).view(1, 1, 1, -1)
        allowed = k <= q
        if self.pad is not None:
            allowed = allowed & (k >= self.pad.view(-1, 1, 1, 1))
        return allowed

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's keys/values (B, H, t, D) at `pos` and returns all of them so far."""
        t, end = k.size(2), self.pos + k.size(2)
        self.k[layer].narrow(2, self.pos, t).copy_(k)
        self.v[layer].narrow(2, self.pos, t).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps only the rows in `index` (finished rows leave a batch)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]
        if self.pad is not None:
            self.pad = self.pad[index]


class Linear(nn.Linear):
    """nn.Linear (so peft and every tool that looks for one still finds it), with one exception: a single row on a
    CPU under torch.compile is written as multiply + sum. Inductor turns that into one vectorized reduction over both
    cores that streams the weight once, where the BLAS call for one row runs on one core at a fraction of its speed:
    the compiled decode step of the tiny model takes ~40% less time this way (BENCHMARKS.md). Eager code never takes
    this path: there, the product would be materialized (out × in floats)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-2) == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:  # fmt: skip
        q, k, v = self.qkv(x, cos, sin)
        causal = mask is None
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
            causal = mask is None and cache.pos == 0 and x.size(1) > 1
        return self.attend(q, k, v, mask, causal)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values, (B, heads, T, D)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
        causal: bool,
    ) -> torch.Tensor:  # fmt: skip
        b, _, t, _ = q.shape
        # enable_gqa shares each K/V head across its query group without copying (torch >= 2.5): copies of the
        # cache with repeat_interleave cost more than the attention itself when decoding.
        if isinstance(mask, BlockMask):  # packed rows, block-diagonal (see `packed_attention`)
            y = _flex_attention(q, k, v, mask, enable_gqa=self.n_kv != self.n_head)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_head
            )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):  # noqa: ANN001, ANN201 (hot path, types as in Attention)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds what transformers calls `model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    supports_compiled_decode = True  # `decode_step` exists (the transformers-backed model has none)
    supports_packing = True  # `segment_ids` work
    # How packed rows attend: "auto", "dense" or "flex" (`packed_attention` says what each is and why auto chooses
    # as it does). A runtime choice, not part of the checkpoint: set it on the model, e.g. `model.attention = "dense"`.
    attention: str = "auto"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Shares the embedding with the output head when the config ties them (again after `load_state_dict`
        with assign=True, which replaces parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recomputes the RoPE tables (a model built on the meta device has none)."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, self.config.max_position_embeddings, device)

    def resize_token_embeddings(self, rows: int) -> None:
        """Grows the embedding (and an untied head) to `rows`, new rows the mean of the old ones (transformers'
        mean resizing): tokens added to a tokenizer, e.g. ChatML's, start as an average token, not as noise."""
        old = self.model.embed_tokens.weight
        if rows <= old.size(0):
            return
        with torch.no_grad():
            grown = torch.cat([old, old.mean(0, keepdim=True).expand(rows - old.size(0), -1)])
            self.model.embed_tokens = nn.Embedding(rows, old.size(1), device=old.device, dtype=old.dtype)
            self.model.embed_tokens.weight.copy_(grown)
            if not self.config.tie_word_embeddings:
                head = self.lm_head.weight
                new_head = torch.cat([head, head.mean(0, keepdim=True).expand(rows - head.size(0), -1)])
                self.lm_head = Linear(head.size(1), rows, bias=False, device=head.device, dtype=head.dtype)
                self.lm_head.weight.copy_(new_head)
        self.config.vocab_size = rows
        self.tie_weights()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)  # GPT-2's scaled residual init
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B or 1, T) → cos/sin shaped (B or 1, 1, T, D)."""
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        return cos, sin

    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        *,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, H). `segment_ids` (B, T) packs several documents in a row: attention
        stays inside each segment (a dense mask or a block-sparse one, as `self.attention` and `packed_attention`
        choose) and positions restart at each segment's start. `inputs_embeds` (B, T, H) replace
        the token embeddings (soft prompts: virtual tokens that are vectors, not ids; danlu.adapters.prompts)."""
        b, t = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        limit = self.config.max_position_embeddings
        mask = None
        if cache is not None:
            if cache.pos + t > min(limit, cache.max_len):
                raise ValueError(f"sequence of {cache.pos + t} tokens exceeds the context of {limit}")
            mask = cache.mask(t, device)
            if cache.pad is None and t == 1:  # a decode step: a view of the tables, no index
                cos, sin = self.rope_cos.narrow(0, cache.pos, 1), self.rope_sin.narrow(0, cache.pos, 1)
            else:
                cos, sin = self._rope(cache.positions(t, device))
        elif segment_ids is not None:
            if t > limit:
                raise ValueError(f"sequence of {t} tokens exceeds the context of {limit}")
            positions = _segment_positions(segment_ids)
            if packed_attention(self.attention, device) == "flex":
                mask = block_segment_mask(segment_ids)  # block-sparse, no (T, T) tensor
            else:
                mask = dense_segment_mask(segment_ids)
            cos, sin = self._rope(positions)
        else:
            if t > limit:
                raise ValueError(f"sequence of {t} tokens exceeds the context of {limit}")
            cos, sin = self._rope(torch.arange(t, device=device).unsqueeze(0))
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += t
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None, reduction: str = "mean",
    ) -> torch.Tensor:  # fmt: skip
        """Logits (B, T, V) without targets; with targets, the cross-entropy (mean over scored tokens, or per
        token with reduction="none"); targets equal to IGNORE_INDEX score nothing."""
        x = self.hidden_states(input_ids, cache=cache, segment_ids=segment_ids)
        if targets is None:
            return self.lm_head(x)
        if (
            type(self.lm_head) is Linear and self.lm_head.bias is None
        ):  # not wrapped (a LoRA head takes the plain path)
            # In row chunks: the whole batch's fp32 logits never exist (danlu.losses_fused says why and how).
            return linear_cross_entropy(x, self.lm_head.weight, targets, reduction)
        return logits_cross_entropy(self.lm_head(x), targets, reduction)

    def decode_step(
        self, token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> torch.Tensor:
        """Logits (B, V) of one more token per row (`token` (B, 1)), at position `pos` (a one-element tensor) in every
        row, against a cache from `new_cache` (`cache.k`, `cache.v`) holding positions 0 … pos-1.

        The same computation as a `hidden_states` decode step, but with every shape fixed by the cache: the position
        is data rather than a Python number, keys and values are written in place, and attention reads the whole
        cache under a mask. So `torch.compile` traces it once and the graph serves every step of every generation
        with that cache length (`Generator(compile=True)`). Rows are not padded: all sit at the same position."""
        length = keys[0].size(2)
        cos = self.rope_cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self.rope_sin.index_select(0, pos).view(1, 1, 1, -1)
        visible = (torch.arange(length, device=pos.device) <= pos).view(1, 1, 1, length)
        x = self.model.embed_tokens(token)
        for layer, k_cache, v_cache in zip(self.model.layers, keys, values):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            x = x + attn.attend(q, k_cache, v_cache, visible, causal=False)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x)[:, -1])

    def decode_rows(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, V) after `tokens` (B, T) per row, row b's at positions `positions[b]` … `positions[b]`+T-1,
        against a slot cache (`keys`/`values`: per layer (B, kv heads, L, D), e.g. `new_cache(B, L).k`) whose row b
        holds that row's earlier positions. Each token's key/value is written at its own position and attends to
        cache slots up to it; the logits are those of token `last[b]` of row b (default: the last, T-1).

        With T = 1 this is `decode_step` for rows that are not in step: the batched decoder (danlu.generate.SlotBatch)
        keeps many generations in one cache, rows joining and leaving between steps. With T > 1 it prefills prompts
        (left-aligned, each from position 0; what follows a shorter prompt is written past its end, where its later
        tokens overwrite it), so one `torch.compile` of this method serves both a prefill and a step. The tokens
        travel along the sequence axis, (1, B·T, H), so each projection is one matrix product over all of them;
        only attention regroups them, as (B, kv heads, query group × T, D).

        Two choices make the compiled step fast on a CPU (benchmarks/rollout_generate.py): the cache write is an
        `index_put_`, which inductor does in place (a `scatter_` was copied whole, cache and all, every step), and
        attention is written out as two matrix products over each kv head's query group with a softmax between
        (SDPA's CPU kernel with a mask is built for many queries: at one query a row it took most of the step)."""
        b, t, length = tokens.size(0), tokens.size(1), keys[0].size(2)
        at = positions.view(b, 1) + torch.arange(t, device=positions.device).view(1, t)  # (B, T)
        flat = at.reshape(-1)
        cos = self.rope_cos.index_select(0, flat).view(1, 1, b * t, -1)
        sin = self.rope_sin.index_select(0, flat).view(1, 1, b * t, -1)
        hidden = torch.arange(length, device=positions.device).view(1, 1, length) > at.view(b, t, 1)
        hidden = hidden.view(b, 1, 1, t, length)
        rows = torch.arange(b, device=positions.device).view(b, 1).expand(b, t).reshape(b * t, 1)
        heads = torch.arange(keys[0].size(1), device=positions.device).view(1, -1)
        where = flat.view(b * t, 1)
        x = self.model.embed_tokens(tokens.reshape(1, b * t))
        for layer, k_cache, v_cache in zip(self.model.layers, keys, values):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)  # (1, heads, B·T, D)
            k_cache.index_put_((rows, heads, where), k[0].transpose(0, 1).to(k_cache.dtype))
            v_cache.index_put_((rows, heads, where), v[0].transpose(0, 1).to(v_cache.dtype))
            # the query heads grouped by the kv head they share: (B, kv heads, group × T, D)
            group = attn.n_head // attn.n_kv
            q = q[0].view(attn.n_head, b, t, attn.head_dim).permute(1, 0, 2, 3)  # (B, heads, T, D)
            q = q.reshape(b, attn.n_kv, group * t, attn.head_dim)
            scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * attn.head_dim**-0.5
            scores = scores.view(b, attn.n_kv, group, t, length).masked_fill(hidden, float("-inf"))
            weights = scores.softmax(-1).view(b, attn.n_kv, group * t, length)
            y = torch.matmul(weights.to(v_cache.dtype), v_cache)  # (B, kv heads, group × T, D)
            y = y.view(b, attn.n_head, t, attn.head_dim).transpose(1, 2).reshape(1, b * t, -1)
            x = x + attn.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x.view(b, t, -1)
        x = x[:, -1] if last is None else x.gather(1, last.view(b, 1, 1).expand(b, 1, x.size(-1))).squeeze(1)
        return self.lm_head(self.model.norm(x))

    def cache_dtype(self) -> torch.dtype:
        return kv_cache_dtype(self.lm_head.weight)

    def new_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        return KVCache(
            self.config, batch, max_len or self.config.max_position_embeddings, self.lm_head.weight.device,
            self.cache_dtype(), pad,
        )  # fmt: skip


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment: 0 at every segment start."""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, t)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


PACKED_ATTENTION = ("auto", "dense", "flex")


def packed_attention(setting: str, device: torch.device) -> str:
    """How rows that pack several documents (`segment_ids`) attend on `device` under `setting`: "dense" or "flex".
    Both compute the same thing, token i attending to token j <= i of its own segment (tests/test_packing.py).

    - dense: a boolean (B, 1, T, T) mask for `scaled_dot_product_attention`. It costs T x T bytes per row, every
      block is computed, across documents too, and on a GPU any mask rules out SDPA's flash kernel (it falls back to
      the memory-efficient or math one). On a CPU it costs little: SDPA runs its fused CPU kernel
      (`_scaled_dot_product_flash_attention_for_cpu`) with or without a mask.
    - flex: `flex_attention` with a `BlockMask` built from the segment ids (`block_segment_mask`): block-sparse
      (128 x 128 blocks that lie across documents are skipped, blocks inside one document and below the diagonal
      run unmasked), one fused kernel that torch.compile generates (Triton on a GPU), and no T x T tensor. Its
      backward exists on GPUs only: torch (2.13 included) refuses flex_attention on CPU or MPS tensors that need
      gradients, so there it serves inference only.
    - auto: flex on CUDA, dense elsewhere. On a CPU flex cannot train, and where it can run (no gradients, under
      torch.compile) it was slower than the dense mask at the tiny shape: 0.74x its forward tokens/s at 256 tokens
      a row, batch 16 (benchmarks/packed_attention.py). The GPU choice rests on the kernels, not on a timing here."""
    if setting not in PACKED_ATTENTION:
        raise DanluError(f"attention {setting!r} is not one of {', '.join(PACKED_ATTENTION)}")
    if setting == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return setting


def dense_segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask of packed rows: token i sees token j when both are in one segment and j <= i."""
    t = segment_ids.size(1)
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return (same & torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()).unsqueeze(1)


def block_segment_mask(segment_ids: torch.Tensor) -> BlockMask:
    """The rule of `dense_segment_mask` as flex attention's BlockMask: per 128 x 128 block, empty, full or partial
    (partial blocks apply the rule per element inside the kernel). Built from the rule itself by
    `create_block_mask`, which evaluates it over all (i, j) pairs; eagerly that materializes the (B, T, T) booleans
    for a moment, so on a GPU outside an outer torch.compile the builder runs compiled and fuses them away."""
    eager = torch.compiler.is_compiling() or segment_ids.device.type != "cuda"
    return (_block_segment_mask if eager else _compiled(_block_segment_mask))(segment_ids)


def _block_segment_mask(segment_ids: torch.Tensor) -> BlockMask:
    def same_segment_causal(
        b: torch.Tensor, _h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (segment_ids[b, q] == segment_ids[b, kv]) & (kv <= q)

    b, t = segment_ids.shape
    return create_block_mask(same_segment_causal, b, None, t, t, device=segment_ids.device)


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *, enable_gqa: bool
) -> torch.Tensor:
    """flex_attention over (B, heads, T, D) under `block_mask`. Outside torch.compile it runs compiled on a GPU (the
    eager flex_attention is an unfused reference that materializes the scores); on a CPU it stays eager (inference
    only, see `packed_attention`). q, k and v go in one dtype, autocast's when it is on, as SDPA takes them there
    (flex_attention is no autocast op, and under bf16 autocast a q/k norm leaves q and k in fp32, v in bf16)."""
    device = q.device.type
    if q.requires_grad and device in ("cpu", "mps"):
        raise DanluError(
            f"attention 'flex' cannot train on {device}: torch {torch.__version__} has no flex_attention backward "
            "there; use attention 'auto' or 'dense'"
        )
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    eager = torch.compiler.is_compiling() or device != "cuda"
    return (flex_attention if eager else _compiled(flex_attention))(
        q, k, v, block_mask=block_mask, enable_gqa=enable_gqa
    )


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """`fn` under torch.compile, wrapped once per process (a second row shape compiles it shape-generic)."""
    return torch.compile(fn)
