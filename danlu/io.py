"""Hugging Face-format checkpoint folders: the contract every stage's output follows (see DESIGN.md).

We write `config.json` and `generation_config.json` by hand rather than through transformers' `save_pretrained`:
the same files must load in transformers 4.x and 5.x (5.x writes `rope_parameters`, which 4.x silently ignores),
and danlu itself must not need transformers installed. Only safetensors and JSON are ever read back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError, __version__
from danlu.files import recover_swapped
from danlu.model import ModelConfig, Transformer

WEIGHTS = "model.safetensors"
META = "danlu.json"


def hf_config(cfg: ModelConfig, tokenizer: Any, *, chat: bool, dtype: str = "float32") -> dict[str, Any]:
    eos = [tokenizer.im_end_id, tokenizer.eos_id] if chat else tokenizer.eos_id
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def model_config_from_hf(cfg: dict[str, Any], where: Path) -> ModelConfig:
    if cfg.get("model_type") != "llama":
        raise DanluError(
            f"{where}: model_type {cfg.get('model_type')!r} is not supported (danlu loads Llama models)"
        )
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    try:
        mc = ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(rope),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )
    except KeyError as e:
        raise DanluError(f"{where}/config.json: missing key {e}") from None
    if cfg.get("head_dim") not in (None, mc.head_dim):
        raise DanluError(
            f"{where}/config.json: head_dim {cfg['head_dim']} differs from hidden_size/heads = {mc.head_dim}"
        )
    return mc


def save_model_dir(
    folder: Path, state_dict: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any, meta: dict[str, Any],
    *, chat: bool = False,
) -> None:  # fmt: skip
    """Writes a complete checkpoint folder (the caller makes it atomic, e.g. with files.atomic_path)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state_dict.items():
        if k.startswith("rope_") or (cfg.tie_word_embeddings and k == "lm_head.weight"):
            continue
        tensors[k.removeprefix("_orig_mod.").removeprefix("module.")] = (
            v.detach().to("cpu", torch.float32).contiguous()
        )
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    _write_json(folder / "config.json", hf_config(cfg, tokenizer, chat=chat))
    eos = [tokenizer.im_end_id, tokenizer.eos_id] if chat else [tokenizer.eos_id]
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id,
         "do_sample": True, "temperature": 0.7, "top_p": 0.9},
    )  # fmt: skip
    tokenizer.save(
        folder,
        model_max_length=cfg.max_position_embeddings,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
    )
    full_meta = {
        "danlu_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "chat": chat,
        **meta,
    }
    _write_json(folder / META, full_meta)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def update_meta_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """Adds a stage's final metrics (lists left out) to the checkpoint's danlu.json, after training saved it."""
    from danlu.files import write_json_atomic

    path = Path(folder) / META
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta["metrics"] = {
        **meta.get("metrics", {}),
        **{k: v for k, v in metrics.items() if not isinstance(v, list)},
    }
    write_json_atomic(path, meta)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise DanluError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DanluError(
            f"{path}: unreadable safetensors file ({e}); the checkpoint is partial or corrupt"
        ) from None


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Any
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path = Path(".")

    @property
    def is_chat(self) -> bool:
        return bool(self.meta.get("chat"))


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "config.json").exists() and (Path(path) / WEIGHTS).exists()


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Loads a danlu (or any local HF Llama) checkpoint folder, checking that its tokenizer fits the model."""
    from danlu.tokenizer import Tokenizer

    path = Path(path)
    recover_swapped(path)
    if not path.is_dir():
        raise DanluError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").exists():
        raise DanluError(
            f"{path}: not a checkpoint folder (no config.json); expected the output of a training stage"
        )
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise DanluError(f"{path}/config.json: malformed JSON ({e.msg})") from None
    cfg = model_config_from_hf(hf, path)
    tokenizer = Tokenizer.load(path)
    tokenizer.check_fits(cfg.vocab_size, str(path))
    state = load_state_dict_file(path / WEIGHTS)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise DanluError(
            f"{path}/{WEIGHTS}: tensors do not match config.json "
            f"(missing: {', '.join(missing[:4]) or '-'}; unexpected: {', '.join(unexpected[:4]) or '-'})"
        )
    if model.model.embed_tokens.weight.shape[0] != cfg.vocab_size:
        raise DanluError(f"{path}: embedding rows differ from vocab_size {cfg.vocab_size}")
    model.to(device=device, dtype=dtype or torch.float32).eval()
    meta = json.loads((path / META).read_text()) if (path / META).exists() else {}
    return Checkpoint(model=model, tokenizer=tokenizer, config=cfg, meta=meta, path=path)
