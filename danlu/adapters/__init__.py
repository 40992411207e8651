"""Parameter-efficient tuning: LoRA-family adapters through peft, and soft prompts as peft defines them.

spec     the `peft:` section of a stage (PeftSpec)
lora     LoRA, DoRA, PiSSA, rsLoRA: peft's layers injected into danlu's models; merge
prompts  P-tuning (MLP/LSTM prompt encoder), prompt tuning, prefix tuning on danlu's model and KV cache
adapter  an adapter attached to a base: train, save, resume, merge
folder   peft-format adapter folders: write, read, load as base + adapter
identity which base an adapter belongs to, and the check that refuses another
multi    several adapters on one loaded base, one chosen per call (serving)

Names are imported on first use, so the CLI can read `METHODS` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Adapter": "adapter", "adapter_of": "adapter", "attach": "adapter", "merge": "adapter",
    "is_adapter_folder": "folder", "load_adapter_checkpoint": "folder",
    "METHODS": "spec", "PeftSpec": "spec", "peft_spec": "spec",
}  # fmt: skip
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'danlu.adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"danlu.adapters.{_WHERE[name]}"), name)
