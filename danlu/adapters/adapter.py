"""An adapter attached to a loaded base: what trains, what is saved, how a run resumes, how it merges.

One object per adapter hides the difference between the LoRA family (peft layers injected into the model) and the
soft prompts (a wrapper that prepends virtual tokens or a key/value prefix), so the stages, the engine's resume and
the export call the same four methods. The adapter travels on the model (`model.danlu_adapter`), which is all the
engine holds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.adapters import lora
from danlu.adapters.identity import base_identity, base_name
from danlu.adapters.spec import PeftSpec

ATTR = "danlu_adapter"  # the attribute of the model that holds its Adapter


@dataclass
class Adapter:
    """A trainable adapter on a base model (`model` is the base with peft layers, or the soft-prompt wrapper)."""

    spec: PeftSpec
    config: (
        Any  # peft's config object (LoraConfig, PromptEncoderConfig, PromptTuningConfig, PrefixTuningConfig)
    )
    base: dict[str, Any]  # identity.base_identity of the base it was made for
    model: nn.Module = field(repr=False)
    initial: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # PiSSA's initial factors

    @property
    def is_lora(self) -> bool:
        return self.spec.is_lora

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def tensors(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the adapter file, in peft's keys (PiSSA converted to plain LoRA on the original base)."""
        if not self.is_lora:
            from danlu.adapters.prompts import prompt_tensors

            return prompt_tensors(self.model)
        out = lora.lora_state(self.model, state_dict)
        if self.spec.method == "pissa":
            out = lora.pissa_to_lora(out, self.initial or {})
        return out

    def saved_config(self) -> Any:
        """The peft config written beside the tensors (PiSSA's says rank 2r, plain init: what the file holds)."""
        return lora.converted_config(self.config) if self.spec.method == "pissa" else self.config

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
        """Writes the adapter folder (the caller makes it atomic): peft's two files plus danlu.json."""
        from danlu.adapters.folder import write_adapter_dir

        extra = None
        if not self.is_lora:
            from danlu.adapters.prompts import encoder_tensors

            extra = encoder_tensors(self.model)
        write_adapter_dir(folder, self.tensors(state_dict), self.saved_config(),
                          {**meta, "peft": self.spec.to_dict(), "base": self.base}, encoder=extra)  # fmt: skip

    def restore(self, folder: Path) -> None:
        """Loads the trained state from an adapter folder this adapter saved (`--resume`): exact, fp32."""
        from danlu.adapters.folder import read_adapter_tensors

        where = f"--resume: {folder}"
        if self.is_lora:
            tensors = read_adapter_tensors(folder)
            if self.spec.method == "pissa":
                tensors = lora.lora_from_pissa(tensors, self.spec.r)
            lora.set_lora_state(self.model, tensors, where)
        else:
            from danlu.adapters.prompts import load_encoder

            load_encoder(self.model, folder, where)


def attach(ckpt: Any, spec: PeftSpec, parent: str | Path, where: str, *, quiet: bool = False,
           seed: int = 0) -> Adapter:  # fmt: skip
    """Attaches a new trainable adapter to the checkpoint's model (in place for LoRA; `ckpt.model` becomes the
    soft-prompt wrapper otherwise), freezing the base. Says how many parameters train.

    Its random initialization is drawn from `seed` (the caller's RNG untouched): the same adapter in every run and
    on every rank. Under torchrun each process attaches its own, and FSDP2, unlike DDP, does not copy rank 0's
    weights to the others, so an unseeded init trained a patchwork of every rank's draws."""
    model = ckpt.model
    total = sum(p.numel() for p in model.parameters())
    identity = base_identity(parent, ckpt.config, ckpt.tokenizer)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        if spec.is_lora:
            config = lora.lora_config(spec, model, base_name(parent), where)
            lora.attach_lora(model, config)
            initial = (
                {k: v.clone() for k, v in lora.lora_state(model).items()} if spec.method == "pissa" else None
            )
            adapter = Adapter(spec, config, identity, model, initial)
        else:
            from danlu.adapters.prompts import attach_prompt

            ckpt.model, config = attach_prompt(ckpt, spec, base_name(parent), where)
            adapter = Adapter(spec, config, identity, ckpt.model)
    object.__setattr__(ckpt.model, ATTR, adapter)
    if not quiet:
        n = adapter.trainable_parameters()
        targets = getattr(config, "target_modules", None)
        on = f" on {', '.join(sorted(targets))}" if isinstance(targets, (set, list)) else ""
        print(f"[danlu] {where}: {spec.method}{on}: {n:,} trainable parameters, {n / max(1, total):.2%} of the "
              f"base's {total:,}", file=sys.stderr)  # fmt: skip
    return adapter


def adapter_of(model: nn.Module) -> Adapter | None:
    """The Adapter a model carries (None for a plain model)."""
    return model.__dict__.get(ATTR)


def merge(ckpt: Any) -> Any:
    """Folds a LoRA-family adapter loaded with the checkpoint into its base: `ckpt.model` becomes a plain model
    whose logits equal the adapter's forward. Soft prompts cannot be merged (they are inputs, not weight deltas)."""
    info = (ckpt.meta or {}).get("adapter") or {}
    if not info:
        return ckpt
    if info.get("peft_type") != "LORA":
        raise DanluError(f"{ckpt.path}: a {info.get('method')} adapter cannot be merged: its virtual tokens are "
                         "inputs the model reads, not a change to its weights; serve it with `danlu serve BASE "
                         "--adapter NAME=PATH` or load it with peft")  # fmt: skip
    lora.merge_lora(ckpt.model)
    ckpt.meta = {k: v for k, v in ckpt.meta.items() if k != "adapter"} | {"merged_adapter": str(ckpt.path)}
    return ckpt


def write_merged(
    adapter_path: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False
) -> Path:
    """`danlu export ADAPTER --merge`: base + LoRA-family adapter folded into one full checkpoint folder at `out`
    (written atomically), which loads anywhere a model does: transformers, vLLM, the GGUF export."""
    from danlu.adapters.folder import is_adapter_folder
    from danlu.files import atomic_path
    from danlu.io import load_checkpoint, save_model_dir

    out = Path(out)
    if out.exists() and not force:
        raise DanluError(f"{out}: already exists (pass --force to replace it)")
    if not is_adapter_folder(adapter_path):
        raise DanluError(f"{adapter_path}: --merge takes an adapter folder (adapter_config.json + "
                         "adapter_model.safetensors); this is not one")  # fmt: skip
    ckpt = merge(load_checkpoint(adapter_path, quiet=True))
    skip = ("danlu_version", "created", "chat", "adapter", "base", "peft")
    meta = {k: v for k, v in ckpt.meta.items() if k not in skip} | {"exported_from": str(adapter_path)}
    with atomic_path(out) as tmp:
        save_model_dir(tmp, ckpt.model.state_dict(), ckpt.config, ckpt.tokenizer, meta, chat=ckpt.is_chat,
                       dtype=dtype)  # fmt: skip
    return out
