"""Soft prompts as peft defines them: P-tuning, prompt tuning, prefix tuning, on danlu's model and its KV cache.

The trainable parts are peft's own modules (`PromptEncoder`: an embedding reparameterized by an MLP or an LSTM, as
in P-tuning; `PromptEmbedding`; `PrefixEncoder`), built from peft's configs, so the saved file is what
`PeftModel.save_pretrained` writes: one tensor `prompt_embeddings`, the encoder's output (n × hidden for the virtual
tokens; n × layers·2·kv-width for a prefix). peft loads it as is. Because that output is all peft keeps, the
encoder's own weights go beside it in `prompt_encoder.safetensors` for an exact resume.

How the base sees them, as in peft: P-tuning and prompt tuning put n vectors before the input's embeddings
(positions 0 … n-1, the text from n on); prefix tuning puts n keys and values into every layer's cache ahead of the
text (which then starts at position n). In generation they live in the KV cache: the first step of a prompt
carries the virtual tokens (or starts from the filled prefix), later steps do not, so greedy tokens with the cache
equal those without it. Left-padded batches keep the virtual slots first and skip each row's padding after them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu import DanluError
from danlu.adapters.spec import PeftSpec
from danlu.model import IGNORE_INDEX, KVCache, kv_cache_dtype

PROMPT_KEY = "prompt_embeddings"  # peft's one key for every prompt-learning method


def _check_native(ckpt: Any, where: str) -> None:
    if getattr(ckpt, "backend", "native") != "native":
        raise DanluError(f"{where}: soft prompts (ptuning, prompt, prefix) run on the native model path; "
                         f"{ckpt.path} runs through transformers — use a LoRA-family method for it")  # fmt: skip


def prompt_config(spec: PeftSpec, cfg: Any, base_name: str) -> Any:
    """peft's config for the method, with the model dimensions peft would fill in itself
    (`_prepare_prompt_learning_config`; grouped-query attention narrows a prefix to the key/value heads)."""
    import peft

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=spec.virtual_tokens, num_transformer_submodules=1,
                  num_layers=cfg.num_hidden_layers, base_model_name_or_path=base_name)  # fmt: skip
    hidden = cfg.hidden_size
    if spec.method == "ptuning":
        kind = "LSTM" if spec.encoder == "lstm" else "MLP"
        return peft.PromptEncoderConfig(**common, token_dim=hidden, num_attention_heads=cfg.num_attention_heads,
                                        encoder_reparameterization_type=kind,
                                        encoder_hidden_size=spec.encoder_hidden or hidden)  # fmt: skip
    if spec.method == "prompt":
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": spec.init_text,
                "tokenizer_name_or_path": base_name} if spec.init_text else {}  # fmt: skip
        return peft.PromptTuningConfig(**common, token_dim=hidden, num_attention_heads=cfg.num_attention_heads,
                                       **init)  # fmt: skip
    kv = cfg.num_key_value_heads
    return peft.PrefixTuningConfig(**common, token_dim=cfg.head_dim * kv, num_attention_heads=kv,
                                   prefix_projection=spec.prefix_projection,
                                   encoder_hidden_size=spec.encoder_hidden or hidden)  # fmt: skip


def build_encoder(config: Any, word_embeddings: nn.Module) -> nn.Module:
    """peft's module for the config (its constructor builds the inference form when config.inference_mode)."""
    from peft.tuners.p_tuning import PromptEncoder
    from peft.tuners.prefix_tuning import PrefixEncoder
    from peft.tuners.prompt_tuning import PromptEmbedding

    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind == "P_TUNING":
        return PromptEncoder(config)
    if kind == "PREFIX_TUNING":
        return PrefixEncoder(config)
    if str(getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)) == "TEXT":
        return PromptEmbedding(_random_init(config), word_embeddings)  # TEXT init is done by `init_from_text`
    return PromptEmbedding(config, word_embeddings)


def _random_init(config: Any) -> Any:
    import copy

    out = copy.deepcopy(config)
    out.prompt_tuning_init = "RANDOM"
    return out


class PromptCache(KVCache):
    """A KV cache whose first `virtual` slots belong to a soft prompt in every row; a left-padded row's padding
    comes after them (slots virtual … virtual+pad-1), is never attended, and does not count as a position."""

    def __init__(self, cfg: Any, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 pad: torch.Tensor | None, virtual: int) -> None:  # fmt: skip
        super().__init__(cfg, batch, max_len, device, dtype, pad)
        self.virtual = virtual

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        slots = torch.arange(self.pos, self.pos + t, device=device).unsqueeze(0)
        if self.pad is None:
            return slots
        return torch.where(slots < self.virtual, slots, slots - self.pad.unsqueeze(1)).clamp(min=0)

    def mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        if self.pad is None:
            return super().mask(t, device)
        q = torch.arange(self.pos, self.pos + t, device=device).view(1, 1, t, 1)
        k = torch.arange(self.pos + t, device=device).view(1, 1, 1, -1)
        pad = self.pad.view(-1, 1, 1, 1)
        return (k <= q) & ~((k >= self.virtual) & (k < self.virtual + pad))


class PromptedLM(nn.Module):
    """The base model with a soft prompt in front, driven like the base (`model(ids, targets)`, `hidden_states`,
    `lm_head`, `new_cache`): outputs cover the real tokens only, so losses and generation need no change."""

    supports_compiled_decode = False  # the compiled decode step knows no virtual slots
    supports_packing = False  # one prompt per row: packed dialogs would share it

    def __init__(self, base: nn.Module, encoder: nn.Module, config: Any) -> None:
        super().__init__()
        self.base = base
        self.prompt_encoder = encoder
        object.__setattr__(self, "peft_config", config)
        self.kind = str(getattr(config.peft_type, "value", config.peft_type))
        self.n = int(config.num_virtual_tokens)
        self.register_buffer("prompt_tokens", torch.arange(self.n), persistent=False)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    def virtual(self) -> torch.Tensor:
        """The encoder's output for the n virtual tokens (what peft saves as `prompt_embeddings`)."""
        if self.peft_config.inference_mode:  # peft's inference form holds the output itself
            return self.prompt_encoder.embedding.weight
        return self.prompt_encoder(self.prompt_tokens.unsqueeze(0))[0]

    def _prefix(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (layers·2 entries of (B, kv heads, n, head dim)), laid out as peft's `get_prompt`."""
        c = self.base.config
        kv = self.virtual().view(self.n, c.num_hidden_layers * 2, c.num_key_value_heads, c.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return kv[0::2], kv[1::2]

    def new_cache(
        self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None
    ) -> PromptCache:
        p = self.base.lm_head.weight
        dtype = kv_cache_dtype(p)
        length = (max_len or self.base.config.max_position_embeddings) + self.n
        cache = PromptCache(self.base.config, batch, length, p.device, dtype, pad, self.n)
        if self.kind == "PREFIX_TUNING":
            keys, values = self._prefix(batch)
            for layer in range(len(cache.k)):
                cache.k[layer][:, :, : self.n] = keys[layer].to(dtype)
                cache.v[layer][:, :, : self.n] = values[layer].to(dtype)
            cache.pos = self.n
        return cache

    def hidden_states(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if segment_ids is not None:
            raise DanluError(
                "a soft prompt precedes each row: rows cannot pack several dialogs (set pack=false)"
            )
        if self.kind == "PREFIX_TUNING":
            if cache is None:  # training: a fresh prefix cache per batch, so gradients reach the prefix
                cache = self.new_cache(input_ids.size(0), input_ids.size(1))
            return self.base.hidden_states(input_ids, cache=cache)
        if cache is not None and cache.pos > 0:  # decoding: the virtual tokens are in the cache already
            return self.base.hidden_states(input_ids, cache=cache)
        embeds = self.base.model.embed_tokens(input_ids)
        b = input_ids.size(0)
        virtual = self.virtual().to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        # a left-padded row becomes [virtual, its padding, text]: the layout PromptCache expects
        full = torch.cat([virtual, embeds], dim=1)
        h = self.base.hidden_states(None, cache=cache, inputs_embeds=full)
        return h[:, self.n :]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, segment_ids: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:  # fmt: skip
        """As the base's forward, over the real tokens (the virtual ones are context, never scored)."""
        x = self.hidden_states(input_ids, cache=cache, segment_ids=segment_ids)
        if targets is None:
            return self.lm_head(x)
        logits = self.lm_head(x).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=reduction)  # fmt: skip
        return loss.view(targets.shape) if reduction == "none" else loss


def attach_prompt(ckpt: Any, spec: PeftSpec, base_name: str, where: str) -> tuple[PromptedLM, Any]:
    """A new trainable soft prompt on the checkpoint's (native) model, base frozen."""
    _check_native(ckpt, where)
    config = prompt_config(spec, ckpt.config, base_name)
    base = ckpt.model
    for p in base.parameters():
        p.requires_grad_(False)
    encoder = build_encoder(config, base.model.embed_tokens)
    if spec.method == "prompt" and spec.init_text:
        init_from_text(encoder, base.model.embed_tokens, ckpt.tokenizer.encode(spec.init_text), where)
    model = PromptedLM(base, encoder.to(base.lm_head.weight.device), config)
    return model, config


def init_from_text(encoder: nn.Module, embed: nn.Module, ids: list[int], where: str) -> None:
    """peft's TEXT init: the virtual tokens start as the text's token embeddings, repeated to fill n."""
    if not ids:
        raise DanluError(f"{where}.init_text: the text has no tokens")
    n = encoder.embedding.weight.size(0)
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.no_grad():
        encoder.embedding.weight.copy_(embed.weight[torch.tensor(ids, device=embed.weight.device)])


def prompt_tensors(model: PromptedLM) -> dict[str, torch.Tensor]:
    """peft's file content: {"prompt_embeddings": the encoder's output}."""
    with torch.no_grad():
        return {PROMPT_KEY: model.virtual().detach().to("cpu", torch.float32).contiguous()}


def encoder_tensors(model: PromptedLM) -> dict[str, torch.Tensor]:
    """The encoder's own weights (danlu's extra file: what training goes on from)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.prompt_encoder.state_dict().items()}


def load_encoder(model: PromptedLM, folder: Path, where: str) -> None:
    from danlu.adapters.folder import ENCODER_WEIGHTS
    from danlu.io import load_state_dict_file

    path = Path(folder) / ENCODER_WEIGHTS
    if not path.is_file():
        raise DanluError(
            f"{where}: no {ENCODER_WEIGHTS}; only a soft prompt danlu trained can be trained further"
        )
    try:
        model.prompt_encoder.load_state_dict(load_state_dict_file(path))
    except RuntimeError as e:
        raise DanluError(f"{where}: the saved prompt encoder does not fit this one ({e})") from None


def attach_saved_prompt(
    ckpt: Any, config: Any, tensors: dict[str, torch.Tensor], where: str, name: str
) -> None:
    """A saved soft prompt (peft's file) on the loaded base: `ckpt.model` becomes its PromptedLM."""
    _check_native(ckpt, where)
    if name != "default" or isinstance(ckpt.model, PromptedLM):
        raise DanluError(f"{where}: soft-prompt adapters are served one per base for now: serve it alone "
                         "(`danlu serve ADAPTER`); LoRA-family adapters share a base")  # fmt: skip
    if PROMPT_KEY not in tensors:
        raise DanluError(f"{where}: no {PROMPT_KEY!r} tensor, which every peft prompt-learning adapter has")
    encoder = build_encoder(config, ckpt.model.model.embed_tokens)
    want = tuple(encoder.embedding.weight.shape)
    if tuple(tensors[PROMPT_KEY].shape) != want:
        raise DanluError(f"{where}: adapter for another base: its prompt embeddings are "
                         f"{tuple(tensors[PROMPT_KEY].shape)}, this base needs {want}")  # fmt: skip
    with torch.no_grad():
        encoder.embedding.weight.copy_(tensors[PROMPT_KEY])
    ckpt.model = PromptedLM(ckpt.model, encoder.to(ckpt.model.lm_head.weight.device), config)
