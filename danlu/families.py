"""Hugging Face `config.json` ↔ danlu's `ModelConfig`, one small converter per model family on the native path.

The native model covers the Llama family; each family differs only in a few config keys (Qwen2's q/k/v biases,
Qwen3's q/k norms and explicit head_dim, Llama-3's rope scaling). Everything else a config says that danlu does
not model (sliding-window bookkeeping, token ids, the transformers version) is kept in `ModelConfig.hf_extra` and
written back on save, so a fine-tuned Qwen folder still reads as Qwen to transformers, vLLM and llama.cpp.

We write `rope_theta`/`rope_scaling` (what transformers 4.x reads) and `rope_parameters` (5.x) side by side and
with the same values: 5.x's own `save_pretrained` writes only the latter, which 4.x silently ignores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.model import ROPE_TYPES, ModelConfig, rope_scaling_type

# model_type → the architecture name transformers registers for it
NATIVE_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# keys every family's config gets from ModelConfig; whatever else the original had rides along in hf_extra
_MODELLED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
    "tie_word_embeddings", "initializer_range", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "transformers_version", "_name_or_path", "auto_map",
}  # fmt: skip


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from a config written by transformers 4.x or 5.x."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling")
    if not scaling and rope_scaling_type(params) != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and rope_scaling_type(scaling) == "default":
        scaling = None
    return float(theta), scaling


def native_unsupported(cfg: dict[str, Any]) -> str | None:
    """Why this config cannot run on the native model (None when it can)."""
    family = cfg.get("model_type")
    if family not in NATIVE_FAMILIES:
        return f"model_type {family!r} is not in the Llama family ({', '.join(NATIVE_FAMILIES)})"
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (the native model is SwiGLU with silu)"
    kind = rope_scaling_type(_rope(cfg)[1])
    if kind not in ROPE_TYPES:
        return f"rope scaling {kind!r} (native: {', '.join(ROPE_TYPES)})"
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", family == "mistral")
    if uses_window and window and window < cfg.get("max_position_embeddings", 0):
        return f"sliding-window attention ({window} of {cfg['max_position_embeddings']} positions)"
    if family == "llama" and cfg.get("pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


def model_config_from_hf(cfg: dict[str, Any], where: Path | str) -> ModelConfig:
    """A native ModelConfig from a Llama-family config.json; a clear error naming what does not fit."""
    reason = native_unsupported(cfg)
    if reason:
        raise DanluError(f"{where}/config.json: the native model cannot run it: {reason}")
    family = cfg["model_type"]
    theta, scaling = _rope(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    try:
        mc = ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if family.startswith("qwen") else 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family not in ("llama", "mistral"))),
            initializer_range=cfg.get("initializer_range", 0.02),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3",
            model_type=family,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            hf_extra={k: v for k, v in cfg.items() if k not in _MODELLED},
        )
    except KeyError as e:
        raise DanluError(f"{where}/config.json: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise DanluError(f"{where}/config.json: {e}") from None
    return mc


def hf_config(cfg: ModelConfig, tokenizer: Any, *, chat: bool, dtype: str | None = None) -> dict[str, Any]:
    """The config.json of a native model: transformers 4.x and 5.x, vLLM and llama.cpp's converter read it."""
    family = cfg.model_type
    if family not in NATIVE_FAMILIES:
        raise DanluError(f"model_type {family!r} cannot be saved by the native model")
    if family == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise DanluError(
            "a llama config has one attention_bias for q/k/v/o; use model_type qwen2 for q/k/v only"
        )
    dtype = dtype or cfg.torch_dtype
    eos = [tokenizer.end_of_turn_id, tokenizer.eos_id] if chat else [tokenizer.eos_id]
    eos = list(dict.fromkeys(eos))
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope_parameters = {**cfg.rope_scaling, "rope_type": rope_scaling_type(cfg.rope_scaling),
                           "rope_theta": cfg.rope_theta}  # fmt: skip
    out = dict(cfg.hf_extra or {})
    out.update(
        architectures=[NATIVE_FAMILIES[family]],
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        rope_parameters=rope_parameters,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        use_cache=True,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_id,
        torch_dtype=dtype,
        dtype=dtype,
    )
    out.setdefault("attention_dropout", 0.0)
    if family == "llama":
        out.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
        out.setdefault("pretraining_tp", 1)
    elif family == "qwen3":
        out["attention_bias"] = cfg.o_bias
    if family in ("qwen2", "qwen3"):
        out.setdefault("use_sliding_window", False)
        out.setdefault("sliding_window", None)
        out.setdefault("max_window_layers", cfg.num_hidden_layers)
    if family == "mistral":
        out.setdefault("sliding_window", None)
    return out
