"""Adapter folders: peft's format (`adapter_config.json` + `adapter_model.safetensors`) plus danlu.json.

`load_adapter_checkpoint` gives base + adapter as one Checkpoint, so `danlu chat`, `eval`, `generate` and `export`
take an adapter folder wherever they take a model folder. The base comes from danlu.json, else from peft's
`base_model_name_or_path`, and must be the one the adapter was made for (danlu.adapters.identity).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ENCODER_WEIGHTS = "prompt_encoder.safetensors"  # danlu's extra: a soft prompt's encoder, to train on from it


def is_adapter_folder(path: str | Path) -> bool:
    """An adapter folder: peft's config, and no full model weights beside it."""
    from danlu.io import is_checkpoint

    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not is_checkpoint(path)


def write_adapter_dir(folder: Path, tensors: dict[str, torch.Tensor], peft_config: Any, meta: dict[str, Any],
                      *, encoder: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Writes the adapter files into `folder` (the caller makes the folder atomic, e.g. with files.atomic_path)."""
    import time

    from safetensors.torch import save_file

    from danlu import __version__

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})  # fmt: skip
    if encoder:
        save_file(encoder, str(folder / ENCODER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it: loaders build the inference form
    config.save_pretrained(str(folder))
    full = {
        "danlu_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "adapter": True,
        **meta,
    }
    (folder / "danlu.json").write_text(
        json.dumps(full, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def read_adapter_config(folder: Path) -> Any:
    """peft's config object of an adapter folder; one error naming the file when it is not one peft reads."""
    try:
        from peft import PeftConfig
    except ImportError as e:
        raise DanluError(f"{folder}: adapters need the peft library ({e}): pip install peft") from None
    try:
        return PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, OSError, json.JSONDecodeError) as e:
        raise DanluError(
            f"{folder}/{ADAPTER_CONFIG}: not a peft adapter config peft can read ({e})"
        ) from None


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from danlu.io import load_state_dict_file

    return load_state_dict_file(Path(folder) / ADAPTER_WEIGHTS)


def load_adapter_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                            *, quiet: bool = False, base: str | Path | None = None) -> Any:  # fmt: skip
    """Base + adapter as one Checkpoint (model, the base's tokenizer, the base's config; meta from danlu.json with
    an "adapter" entry). `base` overrides the base the adapter names (a copy of it elsewhere)."""
    from danlu.adapters.identity import check_base
    from danlu.io import load_checkpoint, read_meta

    path = Path(path)
    config = read_adapter_config(path)
    meta = read_meta(path)
    base = base or (meta.get("base") or {}).get("name") or config.base_model_name_or_path
    if not base:
        raise DanluError(f"{path}: the adapter names no base model (base_model_name_or_path in {ADAPTER_CONFIG}); "
                         "load it with `--base BASE` or serve it with `danlu serve BASE --adapter NAME=PATH`")  # fmt: skip
    ckpt = load_checkpoint(base, device=device, dtype=dtype, quiet=True)
    if (ckpt.meta or {}).get("adapter"):
        # trained from an adapter (a pipeline's DPO after LoRA SFT): the stage merged that one into its base first
        # (stages.common.parent_checkpoint), so loading does the same
        from danlu.adapters.adapter import merge

        merge(ckpt)
    check_base(path, meta.get("base"), ckpt.path, ckpt.config, ckpt.tokenizer, quiet=quiet)
    attach_saved(ckpt, config, read_adapter_tensors(path), str(path))
    ckpt.model.to(device).eval()
    chat = meta.get("chat", ckpt.is_chat)
    info = adapter_info(config, ckpt.path)
    info["method"] = (meta.get("peft") or {}).get("method") or info["method"]  # PiSSA is saved as plain LoRA
    ckpt.meta = {**meta, "chat": chat, "adapter": info}
    ckpt.path = path
    return ckpt


def adapter_info(config: Any, base: Path) -> dict[str, Any]:
    """The "adapter" entry of a loaded adapter checkpoint's meta (what the server and export show and check)."""
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    method = kind.lower()
    if kind == "LORA":
        init = str(getattr(config, "init_lora_weights", True))
        method = ("dora" if config.use_dora else "rslora" if config.use_rslora
                  else "pissa" if init.startswith("pissa") else "lora")  # fmt: skip
    return {"peft_type": kind, "method": method, "base": str(base)}


def attach_saved(ckpt: Any, config: Any, tensors: dict[str, torch.Tensor], where: str,
                 name: str = "default") -> None:  # fmt: skip
    """Attaches a saved adapter (peft's config and tensors) to the loaded base in `ckpt`, for inference; several
    LoRA adapters may be attached to one base under different names (serving)."""
    from danlu.adapters import lora

    kind = str(getattr(config.peft_type, "value", config.peft_type))
    config = copy.deepcopy(config)
    config.inference_mode = True
    if kind == "LORA":
        lora.attach_lora(ckpt.model, config, name)
        try:
            lora.set_lora_state(ckpt.model, tensors, where, name)
        except RuntimeError as e:  # shapes differ: a peft adapter (no danlu.json) made for another base
            raise DanluError(f"{where}: adapter for another base: its tensors do not fit {ckpt.path} "
                             f"({str(e).strip().splitlines()[-1][:200]})") from None  # fmt: skip
    elif kind in ("P_TUNING", "PROMPT_TUNING", "PREFIX_TUNING"):
        from danlu.adapters.prompts import attach_saved_prompt

        attach_saved_prompt(ckpt, config, tensors, where, name)
    else:
        raise DanluError(f"{where}: peft adapter type {kind} is not supported (supported: LoRA, DoRA, PiSSA, "
                         "rsLoRA, P-tuning, prompt tuning, prefix tuning)")  # fmt: skip
    for p in ckpt.model.parameters():
        p.requires_grad_(False)


def add_adapter(ckpt: Any, path: str | Path, name: str, *, quiet: bool = False) -> dict[str, Any]:
    """Attaches the adapter folder at `path` to the already loaded base `ckpt` under `name` (several may share one
    base: serving). Refused, with the reason, when it was made for another base. Returns its "adapter" info."""
    from danlu.adapters.identity import check_base
    from danlu.io import read_meta

    path = Path(path)
    if not is_adapter_folder(path):
        raise DanluError(f"--adapter {name}={path}: not an adapter folder (expected {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS})")  # fmt: skip
    config = read_adapter_config(path)
    meta = read_meta(path)
    check_base(path, meta.get("base"), ckpt.path, ckpt.config, ckpt.tokenizer, quiet=quiet)
    attach_saved(ckpt, config, read_adapter_tensors(path), f"--adapter {name}={path}", name)
    info = adapter_info(config, ckpt.path)
    info["method"] = (meta.get("peft") or {}).get("method") or info["method"]
    return {**info, "path": str(path), "chat": meta.get("chat", ckpt.is_chat)}
