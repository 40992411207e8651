"""GGUF export of a Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3), for llama.cpp and Ollama.

The exporter reads the folder the way llama.cpp's `convert_hf_to_gguf.py` does, not through danlu's model classes,
so that any checkpoint of these families exports, whoever trained it: `config.json`, safetensors weights (one file
or shards with an index; fp32, bf16 or fp16), the tokenizer files and `generation_config.json`.

Why it is built this way:
- Everything that can be refused is refused before a byte is written: the architecture, the tensor names and
  shapes, the tokenizer (its pre-tokenizer must be one llama.cpp knows by name, see `vocab.py`), a pickle-only
  checkpoint (never unpickled: loading a pickle runs arbitrary code), and an existing output.
- Tensors are read one at a time with safetensors' `safe_open` and streamed into the file (tensor infos first,
  then data), so peak memory is one tensor, not the model.
- The file is written to a temporary name in the output folder and renamed at the end (`danlu.files.atomic_path`):
  an interrupted export or a full disk never leaves a partial `.gguf` where a finished one is expected.
- llama.cpp applies RoPE to adjacent pairs (its "normal" mode) for the `llama` architecture while transformers
  rotates the two halves of each head; the Q and K rows are therefore permuted per head on the way out, as the
  converter does. Qwen2/Qwen3 use the half-rotation ("neox") mode in llama.cpp too, so they are written as is.
- f32/f16/bf16 are written with the `gguf` library; 1-D tensors (norms, biases, rope factors) stay f32, as
  llama.cpp expects. q8_0, q4_0 and q4_k_m go through llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`,
  from llama-cpp-python) applied to a lossless intermediate file, so the blocks and the per-tensor type choices
  (Q6_K for the output, the Q4_K_M mix, fallbacks for rows that k-quant blocks of 256 do not divide) are exactly
  llama.cpp's. Without llama-cpp-python, q8_0 is written by gguf-py's numpy quantizer (bit-identical to
  llama.cpp's Q8_0 blocks); q4_0 and q4_k_m are refused with the command that installs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.export.modelfile import HEADER as MODELFILE_HEADER
from danlu.export.modelfile import render_modelfile
from danlu.export.vocab import VocabPlan, read_vocab, template_text
from danlu.files import atomic_path, write_text_atomic

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
# config.json's model_type → GGUF architecture (Mistral is the llama architecture to llama.cpp)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LLAMA_CPP_INSTALL = (
    "pip install llama-cpp-python  (builds llama.cpp; CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable build)"
)
_FLOAT_FTYPES = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_BF16
_Q8_0_FTYPE = 7  # gguf.LlamaFileType.MOSTLY_Q8_0
_LLAMA_FTYPE_NAMES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                      "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # fmt: skip

# HF tensor name inside `model.layers.N.` → GGUF name inside `blk.N.`
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BASE_BLOCK = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight",
}  # fmt: skip
_QKV_BIAS = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
# Per GGUF arch: block tensors llama.cpp requires, and those it loads when present.
_REQUIRED = {
    "llama": _BASE_BLOCK,
    "qwen2": _BASE_BLOCK | _QKV_BIAS,
    "qwen3": _BASE_BLOCK | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
}
_OPTIONAL = {"llama": _QKV_BIAS | {"self_attn.o_proj.bias"}, "qwen2": set(), "qwen3": set()}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class TensorFallback:
    """A tensor whose type in the file is not the asked one, and why."""

    name: str
    type: str
    reason: str


@dataclass
class ExportReport:
    """What `export_gguf` wrote."""

    path: Path
    arch: str  # GGUF architecture (llama, qwen2, qwen3)
    model_type: str  # config.json's model_type
    quant: str
    bytes: int
    pre_tokenizer: str  # tokenizer.ggml.pre
    quantizer: str  # "gguf" (written directly) or "llama.cpp" (llama_model_quantize)
    n_tensors: int
    n_params: int
    n_vocab: int  # token rows written (tokenizer tokens plus [PAD…] rows)
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[TensorFallback] = field(default_factory=list)
    modelfile: Path | None = None
    stop_tokens: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for people: what was written and how it turned out."""
        types = ", ".join(f"{n}× {t}" for t, n in sorted(self.tensor_types.items(), key=lambda x: -x[1]))
        lines = [
            f"wrote {self.path} ({_human(self.bytes)}): arch {self.arch} (model_type {self.model_type}), "
            f"{self.quant}, {self.n_params / 1e6:.2f}M parameters in {self.n_tensors} tensors ({types})",
            f"tokenizer: byte-level BPE, pre-tokenizer {self.pre_tokenizer}, {self.n_vocab} tokens; "
            f"stop tokens: {', '.join(self.stop_tokens) or '-'}",
        ]
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} tensor(s) not in {self.quant}:")
            lines += [f"  {f.name}: {f.type}, {f.reason}" for f in self.fallbacks]
        lines += [f"note: {n}" for n in self.notes]
        if self.modelfile is not None:
            lines.append(f"Ollama Modelfile: {self.modelfile}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ── reading the checkpoint folder ─────────────────────────────────────────────────────────────────────────────
@dataclass
class _Source:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: F32, BF16, F16…


@dataclass
class _Hparams:
    model_type: str
    arch: str
    hidden: int
    n_layers: int
    n_head: int
    n_kv: int
    head_dim: int
    ff: int
    eps: float
    context: int
    rope_theta: float
    rope: dict[str, Any]  # rope_scaling / rope_parameters (rope_type normalized), {} when none
    tied: bool | None  # None: not stated in config.json
    original_ctx: int | None = None  # top-level original_max_position_embeddings, if any


@dataclass
class _Tensor:
    """One tensor to write: its GGUF name and shape, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    source: _Source | None = None
    permute_heads: int = 0  # >0: permute rows from rotate-half to interleaved pairs with this many heads
    data: Any = None  # a float32 numpy array for generated tensors (rope_freqs)


def _read_config(folder: Path) -> dict[str, Any]:
    from danlu.io import read_config

    return read_config(folder)


def _hparams(cfg: dict[str, Any], folder: Path) -> _Hparams:
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise DanluError(
            f"{folder}/config.json: model_type {model_type!r} cannot be exported to GGUF by danlu "
            f"(supported: {', '.join(ARCHS)})"
        )
    try:
        hidden, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        n_head, ff = int(cfg["num_attention_heads"]), int(cfg["intermediate_size"])
    except KeyError as e:
        raise DanluError(f"{folder}/config.json: missing key {e}") from None
    archs = cfg.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise DanluError(
            f"{folder}/config.json: {', '.join(map(str, archs))} is not a causal language model; "
            "only …ForCausalLM checkpoints export to GGUF"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise DanluError(
            f"{folder}/config.json: hidden_act {act!r} is not supported (llama.cpp computes SiLU)"
        )
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise DanluError(
            f"{folder}/config.json: rope scaling {rope_type!r} is not supported (supported: llama3, linear)"
        )
    rope["rope_type"] = rope_type
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return _Hparams(
        model_type=model_type, arch=ARCHS[model_type], hidden=hidden, n_layers=n_layers, n_head=n_head,
        n_kv=int(cfg.get("num_key_value_heads") or n_head), head_dim=int(cfg.get("head_dim") or hidden // n_head),
        ff=ff, eps=float(cfg.get("rms_norm_eps", 1e-6)), context=int(cfg.get("max_position_embeddings", 2048)),
        rope_theta=float(theta), rope=rope if rope_type != "default" else {},
        tied=cfg["tie_word_embeddings"] if isinstance(cfg.get("tie_word_embeddings"), bool) else None,
        original_ctx=cfg.get("original_max_position_embeddings"),
    )  # fmt: skip


def _index_weights(folder: Path) -> dict[str, _Source]:
    """Tensor name → (file, shape, dtype) from safetensors headers alone; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    from danlu.io import WEIGHTS_INDEX, weight_files

    index = folder / WEIGHTS_INDEX
    files = weight_files(folder)  # one file or the index's shards; pickle-only folders refused there
    expected: dict[str, str] = (
        json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index.is_file() else {}
    )
    sources: dict[str, _Source] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    sl = h.get_slice(name)
                    sources[name] = _Source(name, f, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise DanluError(
                f"{f}: unreadable safetensors file ({e}); the checkpoint is partial or corrupt"
            ) from None
    if expected:
        absent = [n for n, f in expected.items() if n not in sources or sources[n].file.name != f]
        if absent:
            raise DanluError(
                f"{index}: tensor(s) not found in the shard the index names: {', '.join(absent[:4])}"
            )
    return sources


def _plan_tensors(hp: _Hparams, sources: dict[str, _Source], folder: Path) -> tuple[list[_Tensor], bool]:
    """GGUF tensors in file order, every name and shape checked; returns (tensors, tied)."""
    where = f"{folder}: tensor"
    unknown: list[str] = []
    blocks: dict[int, dict[str, _Source]] = {}
    top: dict[str, _Source] = {}
    for name, src in sources.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older checkpoints saved; recomputed from rope_theta
        m = _LAYER_RE.fullmatch(name)
        if m and m.group(2) in _BLOCK_NAMES and int(m.group(1)) < hp.n_layers:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = src
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            top[name] = src
        else:
            unknown.append(name)
    allowed = _REQUIRED[hp.arch] | _OPTIONAL[hp.arch]
    for i, b in blocks.items():
        unknown += [f"model.layers.{i}.{k}" for k in b if k not in allowed]
    if unknown:
        raise DanluError(
            f"{where}(s) {', '.join(sorted(unknown)[:5])}{' …' if len(unknown) > 5 else ''} have no GGUF "
            f"counterpart for arch {hp.arch} (a {hp.model_type} checkpoint of another variant, or quantized)"
        )
    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in top]
    for i in range(hp.n_layers):
        missing += [f"model.layers.{i}.{k}" for k in sorted(_REQUIRED[hp.arch]) if k not in blocks.get(i, {})]
    tied = hp.tied if hp.tied is not None else "lm_head.weight" not in top
    if not tied and "lm_head.weight" not in top:
        missing.append("lm_head.weight")
    if missing:
        raise DanluError(f"{where}(s) missing: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")

    vocab_rows = top["model.embed_tokens.weight"].shape[0]
    h, hd, q, kv = hp.hidden, hp.head_dim, hp.n_head * hp.head_dim, hp.n_kv * hp.head_dim
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,), "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,), "mlp.gate_proj.weight": (hp.ff, h), "mlp.up_proj.weight": (hp.ff, h),
        "mlp.down_proj.weight": (h, hp.ff),
    }  # fmt: skip
    if hp.n_head % hp.n_kv or hd % 2:
        raise DanluError(
            f"{folder}/config.json: {hp.n_head} heads, {hp.n_kv} KV heads, head_dim {hd} do not fit"
        )

    def check(src: _Source, shape: tuple[int, ...]) -> _Source:
        if src.shape != shape:
            raise DanluError(
                f"{where} {src.name} has shape {list(src.shape)}, config.json implies {list(shape)}"
            )
        if src.dtype not in ("F32", "F16", "BF16", "F64"):
            raise DanluError(
                f"{where} {src.name} has dtype {src.dtype}; expected float32, bfloat16 or float16"
            )
        return src

    out = [
        _Tensor(
            "token_embd.weight", (vocab_rows, h), check(top["model.embed_tokens.weight"], (vocab_rows, h))
        )
    ]
    if hp.rope.get("rope_type") == "llama3":
        out.append(_Tensor("rope_freqs.weight", (hd // 2,), data=_llama3_rope_factors(hp)))
    permute = hp.arch == "llama"
    for i in range(hp.n_layers):
        for key, src in blocks[i].items():
            heads = 0
            if permute and key.startswith("self_attn.q_proj."):
                heads = hp.n_head
            elif permute and key.startswith("self_attn.k_proj."):
                heads = hp.n_kv
            out.append(_Tensor(f"blk.{i}.{_BLOCK_NAMES[key]}", shapes[key], check(src, shapes[key]), heads))
    out.append(_Tensor("output_norm.weight", (h,), check(top["model.norm.weight"], (h,))))
    if not tied:
        out.append(_Tensor("output.weight", (vocab_rows, h), check(top["lm_head.weight"], (vocab_rows, h))))
    return out, tied


def _llama3_rope_factors(hp: _Hparams) -> Any:
    """Llama-3.1 RoPE scaling as per-frequency divisors (the `rope_freqs` tensor llama.cpp applies).

    Computed in float32 with torch, as llama.cpp's converter does; `original_max_position_embeddings` is read from
    the rope parameters first (where transformers reads it), then from the top level of config.json.
    """
    import torch

    r = hp.rope
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings") or hp.original_ctx or 8192)
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float32) / hp.head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = torch.where(
        wavelen < old_ctx / high,
        torch.ones_like(freqs),
        torch.where(
            wavelen > old_ctx / low, torch.full_like(freqs, factor), 1 / ((1 - smooth) / factor + smooth)
        ),
    )
    return factors.to(torch.float32).numpy()


# ── writing ───────────────────────────────────────────────────────────────────────────────────────────────────
def _permute_rows(w: Any, n_head: int) -> Any:
    """Q/K rows of each head from transformers' rotate-half order (i, i + d/2) to llama.cpp's pairs (2i, 2i+1)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_metadata(w: Any, hp: _Hparams, vocab: VocabPlan, n_rows: int, ftype: int, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_type("model")
    w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.n_layers)
    w.add_feed_forward_length(hp.ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.eps)
    w.add_vocab_size(n_rows)
    w.add_file_type(ftype)
    if hp.rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope.get("factor", 1.0)))
    tokens, types = vocab.padded(n_rows)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab.merges)
    for typ, tid in vocab.special_ids.items():
        getattr(w, f"add_{typ}_token_id")(tid)
    w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _load(t: _Tensor, handles: dict[Path, Any]) -> Any:
    """The tensor as float32 numpy, Q/K rows permuted where needed."""
    import torch

    if t.source is None:
        return t.data
    x = handles[t.source.file].get_tensor(t.source.name).to(torch.float32)
    if t.permute_heads:
        x = _permute_rows(x, t.permute_heads)
    return x.contiguous().numpy()


def _write_gguf(
    path: Path, hp: _Hparams, vocab: VocabPlan, tensors: list[_Tensor], dtype: str, file_type: int, name: str,
    *, quantized: bool = False,
) -> None:  # fmt: skip
    """Streams a GGUF file: metadata and tensor infos first, then each tensor as it is read and converted.

    `dtype` is the type of 2-D tensors: f32, f16, bf16, or q8_0 (gguf-py's numpy quantizer; rows it cannot
    block become f16). 1-D tensors are always f32.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    Q = gguf.GGMLQuantizationType
    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]

    def qtype(t: _Tensor) -> Any:
        if len(t.shape) < 2:
            return Q.F32
        if target == Q.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            return Q.F16
        return target

    w = gguf.GGUFWriter(None, hp.arch)
    try:
        _add_metadata(w, hp, vocab, tensors[0].shape[0], file_type, name)
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in tensors:
            qt = qtype(t)
            if qt in (Q.F32, Q.F16):
                np_dtype = np.float32 if qt == Q.F32 else np.float16
                w.add_tensor_info(
                    t.name, t.shape, np.dtype(np_dtype), math.prod(t.shape) * (4 if qt == Q.F32 else 2)
                )
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qt)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qt)
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with contextlib.ExitStack() as stack:
            files = {t.source.file for t in tensors if t.source is not None}
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
            for t in tensors:
                x = _load(t, handles)
                qt = qtype(t)
                if qt == Q.F16 and x.size and float(np.abs(x).max()) > 65504.0:
                    raise DanluError(
                        f"{t.source.name if t.source else t.name}: values beyond float16's range (±65504); "
                        "export with quant bf16 or f32"
                    )
                w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qt))
    finally:
        w.close()


def _llama_cpp() -> Any:
    """The llama_cpp module, or None where llama-cpp-python is not installed (or its library does not load)."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):
        return None
    return llama_cpp


@contextlib.contextmanager
def _captured_stderr() -> Any:
    """Captures file descriptor 2 (llama.cpp's C code prints its per-tensor warnings there, past Python).

    The fallbacks it warns about are in the report already; on failure the caller shows what was captured.
    """
    import sys

    with tempfile.TemporaryFile(mode="w+b") as buf:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(buf.fileno(), 2)
        captured: list[str] = []
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            captured.append(buf.read().decode("utf-8", errors="replace"))


def _llama_quantize(llama_cpp: Any, src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer (the library behind `llama-quantize`), its log kept out of the terminal."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPE_NAMES[quant])
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _captured_stderr() as output:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0 or not dst.is_file():
        tail = " | ".join(line.strip() for line in "".join(output).strip().splitlines()[-3:])
        raise DanluError(
            f"{dst}: llama.cpp's quantizer failed ({quant}, return code {rc}){': ' + tail if tail else ''}"
        )


def _inspect(path: Path, quant: str, tied: bool) -> tuple[dict[str, int], list[TensorFallback], int]:
    """Reads the written file back: tensor type counts, the tensors not of the asked type and why, parameters."""
    import gguf

    Q = gguf.GGMLQuantizationType
    asked = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k_m": Q.Q4_K}[
        quant
    ]
    block = gguf.GGML_QUANT_SIZES[asked][0]
    reader = gguf.GGUFReader(path)
    counts: Counter[str] = Counter()
    fallbacks: list[TensorFallback] = []
    n_params = 0
    for t in reader.tensors:
        typ = Q(t.tensor_type)
        counts[typ.name] += 1
        n_params += int(t.n_elements)
        dims = [int(d) for d in t.shape]
        if sum(d > 1 for d in dims) < 2 or typ == asked:
            continue  # 1-D tensors stay F32 by design
        ne0 = dims[0]
        is_output = t.name == "output.weight" or (tied and t.name == "token_embd.weight")
        if ne0 % block:
            reason = f"rows of {ne0} not divisible by {block} ({asked.name} blocks)"
        elif is_output:
            reason = "output projection: llama.cpp keeps it at higher precision"
        elif quant == "q4_k_m" and typ == Q.Q6_K:
            reason = "Q4_K_M mix: llama.cpp keeps some attn_v/ffn_down at Q6_K"
        else:
            reason = f"llama.cpp chose {typ.name}"
        fallbacks.append(TensorFallback(t.name, typ.name, reason))
    del reader
    return dict(counts), fallbacks, n_params


def _resolve_out(out: Path, checkpoint: Path, quant: str) -> Path:
    """A .gguf path stays as given; a folder (existing, or a path without .gguf) gets `<checkpoint>-<quant>.gguf`."""
    if out.suffix.lower() == ".gguf" and not out.is_dir():
        return out
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", checkpoint.resolve().name).strip("-") or "model"
    return out / f"{stem}-{quant}.gguf"


def export_gguf(
    checkpoint: str | Path, out: str | Path, quant: str = "f16", *, force: bool = False
) -> ExportReport:
    """Exports a checkpoint folder to one GGUF file (plus an Ollama Modelfile beside it).

    `out` is a .gguf path or a folder. `quant`: f32, f16, bf16 (written here with gguf-py), q8_0, q4_0, q4_k_m
    (llama.cpp's quantizer through llama-cpp-python; q8_0 falls back to gguf-py's bit-identical numpy Q8_0 when
    llama-cpp-python is not installed). Raises DanluError, before writing anything, for a folder that cannot be
    exported faithfully; refuses an existing output unless `force`.
    """
    folder = Path(checkpoint)
    if quant not in QUANTS:
        raise DanluError(f"quant {quant!r} is not supported (choose one of: {', '.join(QUANTS)})")
    cfg = _read_config(folder)
    hp = _hparams(cfg, folder)
    sources = _index_weights(folder)
    tensors, tied = _plan_tensors(hp, sources, folder)
    vocab = read_vocab(folder, cfg)
    n_rows = tensors[0].shape[0]
    if isinstance(cfg.get("vocab_size"), int) and cfg["vocab_size"] != n_rows:
        raise DanluError(
            f"{folder}/config.json: vocab_size {cfg['vocab_size']} but the embedding has {n_rows} rows"
        )
    if vocab.n_tokens > n_rows:
        raise DanluError(
            f"{folder}: the tokenizer has {vocab.n_tokens} tokens but the model's embedding has only {n_rows} rows"
        )
    bad = {k: v for k, v in vocab.special_ids.items() if not 0 <= v < n_rows}
    if bad:
        raise DanluError(f"{folder}: special token id(s) outside the vocabulary: {bad}")
    notes = list(vocab.notes)
    window = cfg.get("sliding_window")
    uses_window = hp.model_type == "mistral" or cfg.get("use_sliding_window")
    if uses_window and isinstance(window, int) and window < hp.context:
        notes.append(
            f"config.json has sliding_window {window} < context {hp.context}: llama.cpp attends to the whole "
            "context, so outputs differ from transformers beyond that many tokens"
        )

    path = _resolve_out(Path(out), folder, quant)
    if path.exists() and not force:
        raise DanluError(f"{path}: already exists (pass force=True / --force to overwrite)")
    llama_cpp = None
    if quant in _LLAMA_FTYPE_NAMES:
        llama_cpp = _llama_cpp()
        if llama_cpp is None and quant != "q8_0":
            raise DanluError(
                f"{path}: {quant} needs llama.cpp's quantizer; install it with: {LLAMA_CPP_INSTALL}"
            )

    name = folder.resolve().name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            if quant in _FLOAT_FTYPES:
                _write_gguf(tmp, hp, vocab, tensors, quant, _FLOAT_FTYPES[quant], name)
            elif llama_cpp is None:  # q8_0 without llama.cpp
                _write_gguf(tmp, hp, vocab, tensors, "q8_0", _Q8_0_FTYPE, name, quantized=True)
            else:
                src_dtypes = {t.source.dtype for t in tensors if t.source is not None and len(t.shape) > 1}
                inter = "bf16" if src_dtypes == {"BF16"} else "f16" if src_dtypes == {"F16"} else "f32"
                fd, inter_name = tempfile.mkstemp(
                    prefix=f".{path.name}.", suffix=f".{inter}.tmp", dir=path.parent
                )
                os.close(fd)
                try:
                    _write_gguf(Path(inter_name), hp, vocab, tensors, inter, _FLOAT_FTYPES[inter], name)
                    _llama_quantize(llama_cpp, Path(inter_name), tmp, quant)
                finally:
                    Path(inter_name).unlink(missing_ok=True)
            tensor_types, fallbacks, n_params = _inspect(tmp, quant, tied)
    except OSError as e:
        raise DanluError(f"{path}: writing failed ({e.strerror or e}); no partial file was left") from None

    stops = [vocab.tokens[i] for i in vocab.stop_ids]
    modelfile = _write_modelfile(path, vocab, stops)
    return ExportReport(
        path=path, arch=hp.arch, model_type=hp.model_type, quant=quant, bytes=path.stat().st_size,
        pre_tokenizer=vocab.pre, quantizer="llama.cpp" if llama_cpp is not None else "gguf",
        n_tensors=sum(tensor_types.values()), n_params=n_params, n_vocab=n_rows, tensor_types=tensor_types,
        fallbacks=fallbacks, modelfile=modelfile, stop_tokens=stops, notes=notes,
    )  # fmt: skip


def _write_modelfile(gguf_path: Path, vocab: VocabPlan, stops: list[str]) -> Path:
    """`Modelfile` beside the GGUF (danlu's own is replaced: the latest export wins); one that someone else
    wrote is never overwritten, not even with force: `<name>.Modelfile` is written instead."""
    text = render_modelfile(gguf_path.name, template_text(vocab.chat_template), stops, vocab.generation)
    path = gguf_path.parent / "Modelfile"
    if path.exists():
        try:
            ours = path.read_text(encoding="utf-8").startswith(MODELFILE_HEADER)
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            path = gguf_path.with_suffix(".Modelfile")
    write_text_atomic(path, text)
    return path
