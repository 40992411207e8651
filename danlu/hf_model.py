"""A `transformers` causal LM behind the interface of danlu's native `Transformer`.

The native model covers the Llama family; every other causal LM (GPT-2, GPT-NeoX, OPT, Phi, …) runs through this
wrapper, so the engine, generation, evaluation and SFT/DPO drive both the same way: `model(ids, targets)`,
`model.hidden_states(ids, cache=…, segment_ids=…)`, `model.lm_head`, `model.new_cache(…)`, `model.config`.

The wrapper holds no parameters of its own: its child modules *are* the HF model's top-level children, registered
under the same names, and the HF model itself sits in an attribute that is not a submodule. So `state_dict()` keys
are the HF model's own (`transformer.h.0.attn.c_attn.weight`, `lm_head.weight`): a saved file loads back with
`AutoModelForCausalLM.from_pretrained`, and `.to()`, `.train()`, `.parameters()` act on the shared modules.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import DanluError
from danlu.losses_fused import logits_cross_entropy
from danlu.model import _segment_positions, dense_segment_mask

# Config keys that hold the context length, in the order transformers' configs use them.
_CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length", "n_ctx",
    "context_length",
)  # fmt: skip
DEFAULT_CONTEXT = 2048  # for configs that state no context length at all (ALiBi or recurrent models)
# Model types whose layers carry state across positions outside attention (recurrences, convolutions): a 4D mask
# cannot keep packed documents apart there, so such models are not packed.
_RECURRENT_HINTS = ("mamba", "rwkv", "jamba", "zamba", "bamba", "xlstm", "recurrent", "hybrid", "lfm2")
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
# Attention implementations that keep packed documents apart without any mask (`HFCausalLM._packing_route`).
_FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _text_config(hf_config: Any) -> Any:
    """The decoder's config: multimodal configs nest it (`text_config`); plain LMs are their own."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


class HFModelConfig:
    """The part of `ModelConfig`'s surface that danlu reads, computed from the live HF model (so a resize shows).

    Any other attribute is looked up on the HF (text) config, so e.g. `num_attention_heads` still works."""

    def __init__(self, hf: nn.Module) -> None:
        self._hf = hf

    @property
    def hf_config(self) -> Any:
        return _text_config(self._hf.config)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf_config, name)

    @property
    def max_position_embeddings(self) -> int:
        for key in _CONTEXT_KEYS:
            value = getattr(self.hf_config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return DEFAULT_CONTEXT

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_input_embeddings().weight.shape[0])

    @property
    def hidden_size(self) -> int:
        for key in ("hidden_size", "n_embd", "d_model"):
            value = getattr(self.hf_config, key, None)
            if isinstance(value, int):
                return value
        return int(self._hf.get_input_embeddings().weight.shape[1])

    @property
    def num_hidden_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(self.hf_config, key, None)
            if isinstance(value, int):
                return value
        raise DanluError(f"{type(self._hf).__name__}: its config names no layer count")

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the output projection *is* the input embedding (the tensors, not the config's claim)."""
        out = self._hf.get_output_embeddings()
        return out is not None and out.weight is self._hf.get_input_embeddings().weight

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once each; without embeddings, token and position tables (and an untied output
        matrix) are left out, as `ModelConfig.num_params` leaves out its embedding."""
        total = sum(p.numel() for p in self._hf.parameters())
        if embeddings:
            return total
        seen: set[int] = set()
        for module in self._hf.modules():
            if isinstance(module, nn.Embedding) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                total -= module.weight.numel()
        out = self._hf.get_output_embeddings()
        if out is not None and id(out.weight) not in seen:
            total -= out.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, the estimate `ModelConfig.flops_per_token` makes: 6N (the lm_head matmul
        counted) plus attention."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.hidden_size
        return 6 * n + 12 * self.num_hidden_layers * self.hidden_size * seq_len

    def to_dict(self) -> dict:
        d = self._hf.config.to_dict()
        if "vocab_size" in d:
            d["vocab_size"] = self.vocab_size
        if isinstance(d.get("text_config"), dict) and "vocab_size" in d["text_config"]:
            d["text_config"]["vocab_size"] = self.vocab_size
        if not d.get("architectures"):
            d["architectures"] = [type(self._hf).__name__]
        return d


class HFCache:
    """KV cache for `Generator`, in the native `KVCache`'s terms over transformers' own cache.

    All rows advance together (`pos`); `pad[b]` leading slots of row b are left padding, never attended, and row b's
    positions are `pos - pad[b]` (so a left-padded prompt sees the positions it would alone). The HF cache object
    (a `DynamicCache`, or past-key-value tuples on older transformers) is created by the model on the first call."""

    def __init__(
        self, batch: int, max_len: int, device: torch.device, pad: torch.Tensor | None = None
    ) -> None:
        self.hf: Any = None
        self.batch = batch
        self.pos = 0
        self.max_len = max_len
        self.pad = pad.to(device) if pad is not None and bool((pad > 0).any()) else None

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        base = torch.arange(self.pos, self.pos + t, device=device).unsqueeze(0)
        if self.pad is None:
            return base.expand(self.batch, t)
        return (base - self.pad.unsqueeze(1)).clamp(min=0)

    def attention_mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        """The 2D (B, pos+t) mask transformers takes for padding (1 = attend), or None where nothing is padded."""
        if self.pad is None:
            return None
        k = torch.arange(self.pos + t, device=device).unsqueeze(0)
        return (k >= self.pad.unsqueeze(1)).long()

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps only the rows in `index` (finished rows leave a batch)."""
        self.batch = int(index.numel())
        if self.pad is not None:
            self.pad = self.pad[index.to(self.pad.device)]
        cache = self.hf
        if cache is None:
            return
        if hasattr(cache, "batch_select_indices"):  # DynamicCache (transformers 4.38+ and 5)
            cache.batch_select_indices(index)
        elif hasattr(cache, "reorder_cache"):  # index_select on the batch dim: a subset works like beams
            cache.reorder_cache(index)
        else:  # legacy tuples of (key, value) per layer
            self.hf = tuple(tuple(x[index.to(x.device)] for x in layer) for layer in cache)


class _ScaledHead(nn.Module):
    """The output projection followed by the logit scaling or soft-capping that some HF heads apply after it
    (Cohere's logit_scale, Granite's logits_scaling, Gemma 2's final_logit_softcapping), so that `lm_head(h)`
    gives the logits the HF model gives. Holds the projection without registering it: keys stay the HF model's."""

    def __init__(self, proj: nn.Module, scale: float, softcap: float | None) -> None:
        super().__init__()
        object.__setattr__(self, "proj", proj)
        self.scale = scale
        self.softcap = softcap

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class HFCausalLM(nn.Module):
    """Any `transformers` causal LM, driven like `danlu.model.Transformer` (see the module docstring)."""

    supports_compiled_decode = False  # no static-shape `decode_step`: Generator decodes eagerly

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        config = getattr(hf, "config", None)
        name = type(hf).__name__
        if config is None or getattr(config, "is_encoder_decoder", False):
            raise DanluError(f"{name} is not a decoder-only causal LM; danlu trains causal LMs only")
        base = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        if not isinstance(base, nn.Module) or base is hf or hf.get_output_embeddings() is None:
            raise DanluError(
                f"{name}: no base model and output embeddings found "
                "(expected a …ForCausalLM with `base_model_prefix` and `get_output_embeddings()`)"
            )
        object.__setattr__(self, "_hf", hf)
        object.__setattr__(self, "_base", base)
        self.config = HFModelConfig(hf)
        self._sync_children()
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self._takes_positions = "position_ids" in params
        # transformers' attention kwargs (cu_seq_lens_q, … for flash attention) travel through **kwargs
        self._takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    # -- construction --
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> HFCausalLM:
        """Loads any HF causal-LM folder (sharded or not, any dtype on disk) with `AutoModelForCausalLM`."""
        from transformers import AutoModelForCausalLM

        # transformers 5 calls it `dtype`; 4.x `torch_dtype` (4.56+ takes both, older ones only the latter).
        kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise DanluError(f"{folder}: transformers cannot load it as a causal LM ({error})") from error
        return cls(hf)

    def _sync_children(self) -> None:
        """Makes the wrapper's modules, parameters and buffers the HF model's top-level ones, under the same names.
        Called again after anything that replaces a top-level module (resizing an untied lm_head does)."""
        reserved = set(dir(type(self))) - {"lm_head"}
        for table in ("_modules", "_parameters", "_buffers"):
            ours: dict = getattr(self, table)
            ours.clear()
            for key, value in getattr(self._hf, table).items():
                if key in reserved:
                    raise DanluError(f"{type(self._hf).__name__}: a top-level member named {key!r} clashes "
                                     "with the wrapper's interface")  # fmt: skip
                ours[key] = value
        self._non_persistent_buffers_set = set(getattr(self._hf, "_non_persistent_buffers_set", set()))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> HFCausalLM:
        super()._apply(fn, *args, **kwargs)
        # `.to()` may give top-level parameters/buffers new objects (children are shared and stay shared).
        for table in ("_parameters", "_buffers"):
            getattr(self._hf, table).update(getattr(self, table))
        return self

    def train(self, mode: bool = True) -> HFCausalLM:
        super().train(mode)
        self._hf.training = mode  # the top-level HF module is not a child; keep its flag in step
        return self

    # -- the interface danlu drives --
    @property
    def hf_model(self) -> nn.Module:
        """The wrapped transformers model (its parameters are this module's)."""
        return self._hf

    @property
    def architecture(self) -> str:
        """The HF class that runs, e.g. "GPT2LMHeadModel", for messages such as "model path: transformers (…)"."""
        return type(self._hf).__name__

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (GPT-NeoX calls it `embed_out`), plus any logit scaling its HF head applies."""
        proj = self._hf.get_output_embeddings()
        cfg = self.config.hf_config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling:
            scale /= float(scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        if scale == 1.0 and not softcap:
            return proj
        return _ScaledHead(proj, scale, softcap)

    @property
    def supports_packing(self) -> bool:
        """Whether rows may pack several documents (`segment_ids`): the model must be built on transformers'
        `create_causal_mask` (transformers 5), accept position ids, have no recurrent layers (state would flow across
        documents whatever the mask says), and run an attention implementation that keeps documents apart
        (`_packing_route`)."""
        return self.packing_problem() is None

    def packing_problem(self) -> str | None:
        """Why rows cannot pack documents for this model, or None when they can (see `supports_packing`)."""
        cfg = self.config.hf_config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        module = sys.modules.get(type(self._base).__module__)
        if module is None or not hasattr(module, "create_causal_mask"):
            return "its attention does not take a custom 4D mask"
        if self._packing_route() is None:
            return (
                f"attention implementation {impl!r} is not known to keep packed documents apart (eager and sdpa "
                f"take a 4D mask; {', '.join(_FLASH_ATTENTION)} and flex_attention split rows at position resets)"
            )
        if not self._takes_positions:
            return "it takes no position ids, so positions cannot restart at each document"
        model_type = str(getattr(cfg, "model_type", "")).lower()
        layer_types = set(getattr(cfg, "layer_types", None) or ())
        if any(h in model_type for h in _RECURRENT_HINTS) or layer_types - _ATTENTION_LAYERS:
            return "it has recurrent or convolutional layers that a mask cannot separate"
        return None

    def _packing_route(self) -> str | None:
        """How packed rows reach this model's attention implementation, as read in transformers 5's masking_utils
        and modeling_flash_attention_utils:

        - "mask" (eager, sdpa): our (B, 1, T, T) mask, which `create_causal_mask` passes through as is. transformers
          would build the same dense mask itself from the position resets, so ours costs nothing extra, and it holds
          where a version does not detect packing.
        - "flatten" (flash_attention_2/3/4): these kernels take no 4D mask at all, and `_flash_attention_forward`
          treats position ids as packed only for a batch of one row. So the rows are joined into one sequence of
          B*T tokens with per-document position ids and cu_seq_lens/max_length kwargs (transformers'
          padding-free input, as its DataCollatorWithFlattening makes it): the varlen kernel attends within each
          document, no mask and no wasted block anywhere.
        - "positions" (flex_attention): no mask is passed; `create_causal_mask` finds the documents from the
          position resets (`find_packed_sequence_indices`) and builds a block-sparse BlockMask.
        - None: any other implementation (paged, hub kernels): not known to keep documents apart."""
        impl = getattr(self.config.hf_config, "_attn_implementation", None) or "eager"
        if impl in ("eager", "sdpa"):
            return "mask"
        if impl in _FLASH_ATTENTION:
            return "flatten"
        if impl == "flex_attention":
            from transformers import masking_utils

            return "positions" if hasattr(masking_utils, "find_packed_sequence_indices") else None
        return None

    def _sliding_window(self) -> int | None:
        """The window of sliding-attention layers, if any: a packed mask replaces theirs, so rows must fit it."""
        cfg = self.config.hf_config
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            return int(window) if "sliding_attention" in layer_types else None
        return int(window) if getattr(cfg, "use_sliding_window", True) else None

    def _segment_mask(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) mask, causal within each segment: boolean for SDPA, additive (0 / dtype min) for eager
        attention, which adds the mask to its scores."""
        t = segment_ids.size(1)
        window = self._sliding_window()
        if window is not None and t > window:
            raise DanluError(
                f"model path: transformers ({self.architecture}): packed rows of {t} tokens exceed the sliding "
                f"window of {window}; set sft.pack=false or a shorter sequence length"
            )
        allowed = dense_segment_mask(segment_ids)
        if getattr(self.config.hf_config, "_attn_implementation", "eager") == "sdpa":
            return allowed
        dtype = self._hf.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def _packed_inputs(
        self, input_ids: torch.Tensor, segment_ids: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and position ids for packed rows, adding what the route needs to `kwargs` (`_packing_route`)."""
        problem = self.packing_problem()
        if problem is not None:
            raise DanluError(
                f"model path: transformers ({self.architecture}) cannot pack several documents in one row: "
                f"{problem}; set sft.pack=false"
            )
        positions = _segment_positions(segment_ids)
        route = self._packing_route()
        if route == "mask":
            kwargs["attention_mask"] = self._segment_mask(segment_ids)
        elif route == "flatten":
            positions = positions.reshape(1, -1)
            starts = (positions[0] == 0).nonzero().flatten()  # every document (and every row) starts at 0
            cu = torch.cat([starts, starts.new_tensor([positions.size(1)])]).to(torch.int32)
            if self._takes_kwargs:  # else each layer finds the same from the position ids (a sync per layer)
                longest = int((cu[1:] - cu[:-1]).max())
                kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
            input_ids = input_ids.reshape(1, -1)
        return input_ids, positions

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        cache: HFCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, H), what the HF head takes. `segment_ids` (B, T) packs several documents
        in a row: attention stays inside each segment (by a mask or by position resets, `_packing_route`) and
        positions restart at each segment's start."""
        b, t = input_ids.shape
        device = input_ids.device
        limit = self.config.max_position_embeddings
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            if cache.pos + t > min(limit, cache.max_len):
                raise ValueError(f"sequence of {cache.pos + t} tokens exceeds the context of {limit}")
            kwargs[self._cache_kw] = cache.hf
            kwargs["attention_mask"] = cache.attention_mask(t, device)
            positions = cache.positions(t, device)
        elif segment_ids is not None:
            if t > limit:
                raise ValueError(f"sequence of {t} tokens exceeds the context of {limit}")
            input_ids, positions = self._packed_inputs(input_ids, segment_ids, kwargs)
        else:
            if t > limit:
                raise ValueError(f"sequence of {t} tokens exceeds the context of {limit}")
            positions = None  # the model's own 0 … T-1
        if positions is not None and self._takes_positions:
            kwargs["position_ids"] = positions
        out = self._base(input_ids=input_ids, **kwargs)
        if cache is not None:
            new = out.get("cache") if hasattr(out, "get") else None
            if new is None:
                new = out.get("past_key_values") if hasattr(out, "get") else out[1]
            cache.hf = new
            cache.pos += t
        return out[0].reshape(b, t, -1)  # packed rows may have run joined as one (flash attention)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, cache: HFCache | None = None,
        segment_ids: torch.Tensor | None = None, reduction: str = "mean",
    ) -> torch.Tensor:  # fmt: skip
        """Logits (B, T, V) without targets; with targets, the fp32 cross-entropy (mean over scored tokens, or per
        token with reduction="none"); targets equal to IGNORE_INDEX score nothing."""
        x = self.hidden_states(input_ids, cache=cache, segment_ids=segment_ids)
        if targets is None:
            return self.lm_head(x)
        return logits_cross_entropy(self.lm_head(x), targets, reduction)

    def new_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> HFCache:
        return HFCache(batch, max_len or self.config.max_position_embeddings, self.lm_head.weight.device, pad)

    # -- vocabulary and saving --
    def resize_token_embeddings(self, n: int) -> None:
        """Grows (or shrinks) the token embedding, and an untied output matrix, to `n` rows; new rows start at the
        mean of the old ones (as transformers' `mean_resizing`, without its noise), so added tokens (ChatML markers
        on a base model) begin as an average token rather than a random one. config.vocab_size follows."""
        old = self.config.vocab_size
        if n == old:
            return
        try:  # transformers' own resize knows each architecture's tying and config fields
            self._hf.resize_token_embeddings(n, mean_resizing=False)
        except TypeError:  # transformers < 4.46: no mean_resizing
            self._hf.resize_token_embeddings(n)
        if n > old:
            with torch.no_grad():
                tables = [self._hf.get_input_embeddings()]
                out = self._hf.get_output_embeddings()
                if out is not None and out.weight is not tables[0].weight:
                    tables.append(out)
                for module in tables:
                    w = module.weight
                    w[old:] = w[:old].float().mean(0).to(w.dtype)
                    bias = getattr(module, "bias", None)
                    if isinstance(bias, torch.Tensor) and bias.numel() == n:
                        bias[old:] = bias[:old].float().mean().to(bias.dtype)
        self._text_config_set("vocab_size", n)
        self._sync_children()

    def _text_config_set(self, key: str, value: Any) -> None:
        setattr(self.config.hf_config, key, value)
        if self.config.hf_config is not self._hf.config and hasattr(self._hf.config, key):
            setattr(self._hf.config, key, value)

    def hf_config_dict(self) -> dict:
        """The HF config as a JSON-able dict with the current vocab_size and `architectures`, for config.json."""
        return self.config.to_dict()

    def tied_keys(self) -> list[str]:
        """state_dict keys whose tensor is an earlier key's (a tied lm_head): safetensors refuses to save shared
        tensors, and `from_pretrained` re-ties them from the config, so a saver drops these."""
        seen: set[int] = set()
        tied = []
        for key, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                tied.append(key)
            seen.add(id(tensor))
        return tied
