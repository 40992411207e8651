"""Weight-only quantization that runs in danlu on a CPU: int8 per output channel, int4 in groups along the input.

`QuantLinear` replaces the `nn.Linear` layers of the decoder blocks (the embedding and the output head stay in
float: the embedding is a lookup, and a tied head shares it). Activations stay in float; weights are stored as
integers and expanded on the fly:

- int8: w ≈ q · s, q ∈ [-127, 127], one fp32 scale per output row (s = max|row| / 127); |w - ŵ| ≤ s/2. The matmul
  runs on the int8 weights cast to the activation dtype, and the scale multiplies the output, so no scaled weight
  copy is ever built. A single decode row under torch.compile is multiply + sum on the int8 tensor (the same trick
  as `danlu.model.Linear`): inductor fuses the cast into one reduction that streams a quarter of fp32's bytes, which
  is what makes batch-1 decoding faster than fp32 once weights outgrow the caches (benchmarks/quantized_decode.py).
- int4: w ≈ q · s + m, q ∈ [0, 15], scale and minimum in fp16 per group of `group_size` inputs (llama.cpp's q4_1
  layout); two codes per byte; |w - ŵ| ≤ s/2 plus fp16 rounding of m. 4.5 bits per weight at group 64.

`torch.ao.quantization` is deprecated and torchao is not a dependency, so these are the few lines needed. A
quantized model saves to an ordinary checkpoint folder (config.json says `quantization_config: {quant_method:
"danlu", bits, group_size}`) that `load_quantized` (and so `danlu.io.load_checkpoint`) reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu import DanluError
from danlu.compress.importance import require_native

QUANT_METHOD = "danlu"
BITS = (8, 4)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes (out, in) int8, scales (out,) fp32)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along the input: (packed codes (out, in/2) uint8, scales and minimums
    (out, in/group) fp16). Codes are computed against the stored fp16 scale and minimum, so rounding error is the
    only error."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise DanluError(f"int4: input width {in_f} is not a multiple of the group size {group_size} "
                         "(choose compress.quantize.group_size dividing every layer's input width, e.g. 32)")  # fmt: skip
    g = w.detach().float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    mins = lo.half()
    scales = (
        ((hi - mins.float()) / 15 * (1 + 2**-9)).clamp(min=1e-7).half()
    )  # a hair wide: fp16 never clips hi
    q = torch.round((g - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(out_f, in_f)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, mins


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:  # fmt: skip
    out_f = packed.size(0)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(out_f, -1)
    groups = scales.size(1)
    g = q.view(out_f, groups, -1).to(dtype)
    return (g * scales.to(dtype)[..., None] + mins.to(dtype)[..., None]).view(out_f, -1)


class QuantLinear(nn.Module):
    """A weight-only quantized stand-in for nn.Linear (int8 per channel or int4 group-wise), inference only."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64, bias: bool = False,
                 device: Any = None) -> None:  # fmt: skip
        super().__init__()
        if bits not in BITS:
            raise DanluError(f"quantize: bits={bits} is not supported (choose 8 or 4)")
        self.in_features, self.out_features, self.bits, self.group_size = (
            in_features,
            out_features,
            bits,
            group_size,
        )
        if bits == 8:
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer("scales", torch.ones(out_features, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer(
                "scales", torch.ones(out_features, groups, dtype=torch.float16, device=device)
            )
            self.register_buffer(
                "mins", torch.zeros(out_features, groups, dtype=torch.float16, device=device)
            )
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64) -> QuantLinear:
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, w.device)
        if bits == 8:
            q.qweight, q.scales = quantize_int8(w)
        else:
            q.qweight, q.scales, q.mins = quantize_int4(w, group_size)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        return dequantize_int4(self.qweight, self.scales, self.mins, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            w = self.qweight.to(x.dtype)
            if x.size(-2) == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
                y = (x.unsqueeze(-2) * w).sum(
                    -1
                )  # one fused reduction streaming int8 (see the module docstring)
            else:
                y = F.linear(x, w)
            y = y * self.scales.to(x.dtype)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every Linear inside the decoder blocks."""
    found = []
    for block in model.model.layers:
        for parent in block.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    found.append((parent, name, child))
    return found


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """Replaces the block Linears of a native model by QuantLinear, in place; returns the model (eval mode)."""
    require_native(model, "quantize")
    if bits not in BITS:
        raise DanluError(f"compress.quantize.bits={bits}: choose 8 (per channel) or 4 (group-wise)")
    if bits == 4:
        bad = sorted({lin.in_features for _, _, lin in block_linears(model) if lin.in_features % group_size})
        if bad or group_size % 2 or group_size < 2:
            raise DanluError(f"compress.quantize.group_size={group_size}: must be even and divide every input "
                             f"width of the model (these do not: {bad}); try 32")  # fmt: skip
    for parent, name, lin in block_linears(model):
        setattr(parent, name, QuantLinear.from_linear(lin, bits, group_size))
    model.quantization = {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
    }
    return model.eval()


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers as they would be saved (tied tensors once)."""
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if name.startswith("rope_") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_quantized(
    model: nn.Module, folder: Path, tokenizer: Any, meta: dict[str, Any], *, chat: bool = False
) -> None:
    """A checkpoint folder of a quantized model (the caller makes it atomic): the usual config, tokenizer and
    danlu.json, integer weights in model.safetensors, and `quantization_config` in config.json."""
    from danlu.io import save_model_dir, write_weights

    quant = getattr(model, "quantization", None)
    if quant is None:
        raise DanluError("save_quantized: the model is not quantized (run quantize_model first)")
    save_model_dir(
        folder, {}, model.config, tokenizer, {**meta, "quantization": quant}, chat=chat, dtype="float32"
    )
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        if name.startswith("rope_") or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if (t.data_ptr(), tuple(t.shape)) in seen:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        tensors[name] = t.detach().to("cpu").contiguous()
    write_weights(folder, tensors)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = quant
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def is_quantized_folder(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(cfg, dict) and (cfg.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
    )


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   *, quiet: bool = False) -> Any:  # fmt: skip
    """A Checkpoint (danlu.io) of a folder that `save_quantized` wrote; float tensors load as `dtype` (fp32)."""
    from danlu.families import model_config_from_hf
    from danlu.io import Checkpoint, load_weights, read_config, read_meta
    from danlu.model import Transformer
    from danlu.tokenizer import Tokenizer

    path = Path(path)
    hf = read_config(path)
    quant = hf.get("quantization_config") or {}
    bits, group = quant.get("bits"), quant.get("group_size") or 64
    if quant.get("quant_method") != QUANT_METHOD or bits not in BITS:
        raise DanluError(f"{path}/config.json: quantization_config {quant} is not danlu's (bits 8 or 4)")
    cfg = model_config_from_hf(hf, path)
    tokenizer = Tokenizer.load(path)
    tokenizer.check_fits(cfg.vocab_size, str(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    for parent, name, lin in block_linears(model):
        setattr(
            parent,
            name,
            QuantLinear(lin.in_features, lin.out_features, bits, group, lin.bias is not None, "meta"),
        )
    state = load_weights(path)
    floating = dtype or torch.float32
    state = {k: v.to(floating) if v.dtype == torch.float32 else v for k, v in state.items()}
    expected = (
        set(model.state_dict())
        - {"rope_cos", "rope_sin"}
        - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    )
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise DanluError(f"{path}: tensors do not match its quantization_config (missing: {', '.join(missing[:4]) or '-'}; "
                         f"unexpected: {', '.join(unexpected[:4]) or '-'})")  # fmt: skip
    current = model.state_dict()
    for name, t in state.items():
        want = current[name]
        if t.shape != want.shape or t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise DanluError(
                f"{path}: tensor {name} is {tuple(t.shape)} {t.dtype}, expected {tuple(want.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()
    model.quantization = quant
    model.to(device).eval()
    return Checkpoint(
        model=model, tokenizer=tokenizer, config=cfg, meta=read_meta(path), path=path, backend="native"
    )
