"""Which base an adapter belongs to, and the check that refuses it on another one.

An adapter is a small delta: on a base of another shape it fails to load, and on a base of the same shape but other
weights or another vocabulary it loads and silently produces nonsense. So danlu.json records the base's name, the
config fields that fix its shape, and a fingerprint of its vocabulary; loading compares all three and says which
differs. Adapters that peft wrote carry only `base_model_name_or_path` (and maybe a tokenizer beside them), so
those are checked as far as they allow, and a shape mismatch is caught when their tensors load.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from danlu import DanluError

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")  # fmt: skip


def base_name(path: str | Path) -> str:
    """How adapter_config.json names the base: the folder's absolute path, or a hub id as given."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)


def shape_of(config: Any) -> dict[str, Any]:
    """The config fields that fix the tensors' shapes (a ModelConfig or a transformers-backed model's config)."""
    out: dict[str, Any] = {}
    for key in SHAPE_KEYS:
        try:
            value = getattr(config, key)
        except (AttributeError, DanluError):
            continue
        if isinstance(value, (int, str)):
            out[key] = value
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token → id, added tokens included): equal exactly when ids mean the same text."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()


def base_identity(path: str | Path, config: Any, tokenizer: Any) -> dict[str, Any]:
    """What an adapter's danlu.json records about its base."""
    return {"name": base_name(path), "shape": shape_of(config), "tokenizer": tokenizer_fingerprint(tokenizer)}


def check_base(adapter: Path, recorded: dict[str, Any] | None, base_path: Path, config: Any, tokenizer: Any,
               *, quiet: bool = False) -> None:  # fmt: skip
    """Raises when the adapter at `adapter` was trained on a base of another shape or vocabulary than the one at
    `base_path`; says so on stderr when only the name differs (a copy or a moved folder of the same base)."""
    if (adapter / "tokenizer.json").is_file():  # saved beside the adapter, as peft users often do
        from danlu.tokenizer import Tokenizer

        if tokenizer_fingerprint(Tokenizer.load(adapter)) != tokenizer_fingerprint(tokenizer):
            raise DanluError(f"{adapter}: the tokenizer saved with this adapter differs from the base's at "
                             f"{base_path}; an adapter only works with the vocabulary it was trained on")  # fmt: skip
    if not recorded:
        return
    theirs, ours = recorded.get("shape") or {}, shape_of(config)
    differ = [f"{k} {theirs[k]} vs {ours[k]}" for k in theirs if k in ours and theirs[k] != ours[k]]
    if differ:
        raise DanluError(f"{adapter}: adapter for another base: it was trained on {recorded.get('name')} and "
                         f"{base_path} differs in {', '.join(differ)}")  # fmt: skip
    if recorded.get("tokenizer") and recorded["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise DanluError(f"{adapter}: the base {base_path} has another tokenizer than the one this adapter was "
                         f"trained with ({recorded.get('name')}); token ids would mean other text")  # fmt: skip
    if not quiet and recorded.get("name") and recorded["name"] != base_name(base_path):
        print(f"[danlu] {adapter}: trained on {recorded['name']}; loading it on {base_path}, which has the same "
              "shape and vocabulary", file=sys.stderr)  # fmt: skip
