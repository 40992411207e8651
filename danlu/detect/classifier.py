"""The fine-tuned detector: a causal-LM backbone plus a two-label head, saved as transformers'
`…ForSequenceClassification` with id2label {0: human, 1: machine}.

Why this shape: it is what `pipeline("text-classification")`, vLLM's classifiers and every HF tool load, and it is
how RoBERTa-detector and HC3's detectors are built (a pretrained LM with a classification head). Any backbone danlu
loads works: the native Llama family (saved as Llama/Qwen2/Qwen3/MistralForSequenceClassification) or any other HF
causal LM (saved under its family's sequence-classification class, e.g. GPT2ForSequenceClassification).

Pooling is transformers' own: the head reads the hidden state of the last token that is not the pad id. Rows are
right-padded and attention is causal, so padding never changes a row's score, and danlu and transformers give the
same probabilities for the same weights (a test checks it). Parameter names are the HF class's (`model.*` or
`transformer.*`, and `score.weight`), so the folder is a plain state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu import DanluError
from danlu.detect.metrics import MACHINE
from danlu.detect.texts import LABELS, encode_truncated, pad_right

ID2LABEL = {str(k): v for k, v in LABELS.items()}


def _native(backbone: nn.Module) -> bool:
    from danlu.model import Transformer

    return isinstance(backbone, Transformer)


def _head_keys(backbone: nn.Module) -> set[str]:
    """state_dict keys of the backbone's output projection (the LM head), which a classifier does not keep."""
    head = backbone.lm_head
    if head is None:
        return set()
    weight = getattr(head, "weight", None)
    keys = {n for n, p in backbone.named_parameters(remove_duplicate=False) if p is weight}
    embed_names = {n for n, p in backbone.named_parameters(remove_duplicate=True) if p is weight}
    return keys - embed_names  # a tied head is the embedding itself: that name stays


class SequenceClassifier(nn.Module):
    """backbone.hidden_states → last non-pad token → score (a bias-free Linear to two logits, as in HF)."""

    def __init__(self, backbone: nn.Module, pad_id: int, num_labels: int = 2) -> None:
        super().__init__()
        if _native(backbone) and not backbone.config.tie_word_embeddings:
            backbone.lm_head = None  # an untied LM head is dead weight here: never trained, never saved
        self.backbone = backbone
        self.pad_id = int(pad_id)
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=1 / (hidden + 1) ** 0.5)
        self.score.to(next(backbone.parameters()).device)
        self.register_load_state_dict_pre_hook(_backbone_names)

    @property
    def context(self) -> int:
        return int(self.backbone.config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) in fp32 of right-padded rows."""
        h = self.backbone.hidden_states(input_ids)
        idx = torch.arange(input_ids.size(1), device=input_ids.device)
        last = (idx * (input_ids != self.pad_id)).argmax(-1)  # HF's rule: the last non-pad token
        pooled = h[torch.arange(h.size(0), device=h.device), last]
        return self.score(pooled).float()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the names of the HF `…ForSequenceClassification` class."""
        return hf_names(self.state_dict(), self.backbone)


def _backbone_names(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """`load_state_dict` pre-hook: tensors under the saved folder's HF names (`model.*`; `score.weight` is the same
    in both), as the engine's `--resume` reads them back, go to their `backbone.` names. Under FSDP2 the engine's
    sharded load has already put this rank's current shards there (the HF names matched no parameter): each full
    tensor replaces its shard, cut locally the same way. A state dict in the module's own names is left alone."""
    own = (prefix + "backbone.", prefix + "score.")
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(own)]:
        name, value = prefix + "backbone." + k[len(prefix) :], state.pop(k)
        shard = state.get(name)
        if hasattr(shard, "device_mesh"):  # a DTensor
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(shard.device), shard.device_mesh, shard.placements,
                                      src_data_rank=None)  # fmt: skip
        state[name] = value


def hf_names(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A classifier's state dict under the HF class's names: `backbone.` dropped, LM head and RoPE tables left out."""
    drop = _head_keys(backbone)
    out = {}
    for k, v in state.items():
        k = k.removeprefix("_orig_mod.")
        if k.startswith("backbone."):
            k = k.removeprefix("backbone.")
            if k in drop or k.startswith("rope_"):
                continue
        out[k] = v
    return out


def classification_architecture(backbone: nn.Module) -> str:
    """The HF class name a classifier on this backbone is saved as; an error when transformers has none."""
    if _native(backbone):
        from danlu.families import NATIVE_FAMILIES

        return (
            NATIVE_FAMILIES[backbone.config.model_type].removesuffix("ForCausalLM")
            + "ForSequenceClassification"
        )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    model_type = backbone.config.hf_config.model_type
    if model_type not in NAMES:
        raise DanluError(f"backbone {backbone.architecture}: transformers has no sequence-classification class for "
                         f"model_type {model_type!r}, so the detector could not be saved in a form it loads")  # fmt: skip
    return NAMES[model_type]


def save_classifier(
    folder: Path, state: dict[str, torch.Tensor], backbone: nn.Module, tokenizer: Any, max_tokens: int,
    meta: dict[str, Any],
) -> None:  # fmt: skip
    """Writes an HF sequence-classification folder into `folder` (the caller makes it atomic). `state` is the
    classifier's state_dict as the engine hands it; the tokenizer's model_max_length is `max_tokens`, so
    `pipeline(…, truncation=True)` cuts texts where danlu does."""
    from danlu.io import _write_json, save_model_dir

    tensors = hf_names(state, backbone)
    save_model_dir(folder, tensors, backbone.config, tokenizer, {**meta, "detector": True}, chat=False)
    (folder / "generation_config.json").unlink(missing_ok=True)  # a classifier does not generate
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(
        architectures=[classification_architecture(backbone)], num_labels=2, id2label=ID2LABEL,
        label2id={v: int(k) for k, v in ID2LABEL.items()}, pad_token_id=tokenizer.pad_id,
        problem_type="single_label_classification",
    )  # fmt: skip
    _write_json(folder / "config.json", config)
    tokenizer.save(folder, model_max_length=max_tokens)


def is_classifier(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def _causal_config(cfg: dict[str, Any]) -> dict[str, Any]:
    from danlu.families import NATIVE_FAMILIES

    causal = {k: v for k, v in cfg.items() if k not in ("id2label", "label2id", "num_labels", "problem_type")}
    family = cfg.get("model_type")
    causal["architectures"] = [NATIVE_FAMILIES.get(family, str(cfg["architectures"][0]))]
    return causal


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SequenceClassifier, Any, int]:
    """(classifier, tokenizer, max_tokens) of a detector folder; every mismatch is one error naming the folder."""
    from danlu.io import load_weights, model_path, read_config
    from danlu.tokenizer import Tokenizer

    path = Path(path)
    cfg = read_config(path)
    if not is_classifier(path):
        raise DanluError(f"{path}: not a detector folder (config.json architectures {cfg.get('architectures')} "
                         "has no …ForSequenceClassification); train one with `danlu detect train`")  # fmt: skip
    labels = {str(k): v for k, v in (cfg.get("id2label") or {}).items()}
    if labels != ID2LABEL:
        raise DanluError(f"{path}: id2label is {labels}, a danlu detector has {ID2LABEL}")
    tokenizer = Tokenizer.load(path)
    causal = _causal_config(cfg)
    backend, _ = model_path(causal)
    if backend == "native":
        from danlu.families import model_config_from_hf
        from danlu.model import Transformer

        mcfg = model_config_from_hf(causal, path)
        tokenizer.check_fits(mcfg.vocab_size, str(path))
        backbone: nn.Module = Transformer(mcfg)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from danlu.hf_model import HFCausalLM

        rest = {k: v for k, v in causal.items() if k not in ("architectures", "model_type")}
        hf_cfg = AutoConfig.for_model(causal["model_type"], **rest)
        backbone = HFCausalLM(AutoModelForCausalLM.from_config(hf_cfg))
        tokenizer.check_fits(backbone.config.vocab_size, str(path))
    if tokenizer.pad_id is None:
        raise DanluError(f"{path}: the tokenizer has no pad token")
    model = SequenceClassifier(backbone, int(cfg.get("pad_token_id", tokenizer.pad_id)))
    weights = {("score." + k[6:] if k.startswith("score.") else "backbone." + k): v
               for k, v in load_weights(path, torch.float32).items()}  # fmt: skip
    missing, unexpected = model.load_state_dict(weights, strict=False)
    head = {"backbone." + k for k in _head_keys(model.backbone)}
    missing = [k for k in missing if k not in head and "rope_" not in k]
    if missing or unexpected:
        raise DanluError(f"{path}: tensors do not fit a {cfg['architectures'][0]} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    if _native(model.backbone) and model.backbone.lm_head is not None:
        model.backbone.tie_weights()
    max_tokens = int(min(tokenizer.model_max_length or model.context, model.context))
    return model.to(device).eval(), tokenizer, max_tokens


class Detector:
    """P(machine) of texts with a trained classifier; texts over `max_tokens` keep their first tokens."""

    def __init__(
        self, model: SequenceClassifier, tokenizer: Any, max_tokens: int, batch_size: int = 16
    ) -> None:
        if tokenizer.pad_id is None:
            raise DanluError("detect: the backbone's tokenizer has no pad token (nor an eos to pad with)")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_tokens = min(max_tokens, model.context)
        self.truncated = 0  # texts cut to max_tokens by the last call
        self.name = "detector"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 16) -> Detector:
        det = cls(*load_classifier(path, device), batch_size=batch_size)
        det.name = Path(path).name
        return det

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> list[float]:
        rows, self.truncated = encode_truncated(self.tokenizer, texts, self.max_tokens)
        return self.probabilities_of_ids(rows)

    def detect(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: P(machine), the label at 0.5, its token count and whether it was cut (no shared state, so
        concurrent server requests may call it)."""
        from danlu.detect.texts import encode

        rows = [encode(self.tokenizer, t) for t in texts]
        if not all(rows):
            raise DanluError("detect: a text gives no tokens")
        probs = self.probabilities_of_ids([r[: self.max_tokens] for r in rows])
        return [{"p_machine": p, "label": LABELS[int(p > 0.5)], "tokens": len(r), "truncated": len(r) > self.max_tokens}
                for p, r in zip(probs, rows)]  # fmt: skip

    def scores(self, texts: list[str]) -> list[float]:
        """The machine score every detector offers (here P(machine))."""
        return self.probabilities(texts)

    @torch.no_grad()
    def probabilities_of_ids(self, rows: list[list[int]]) -> list[float]:
        device = self.model.score.weight.device
        out = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids = pad_right([rows[i] for i in idx], self.tokenizer.pad_id).to(device)
            p = F.softmax(self.model(ids), dim=-1)[:, MACHINE]
            for i, v in zip(idx, p.tolist()):
                out[i] = v
        return out
