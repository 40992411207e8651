"""Hugging Face-format checkpoint folders: the contract every stage's output follows (see DESIGN.md).

Any local Hugging Face causal-LM folder (or a hub id where the machine has network) loads here, on one of two
paths behind one interface: the native model (`danlu.model`, the Llama family: compiled decode, packing, FSDP) or a
transformers-backed one (`danlu.hf_model`, every other causal LM). Loading says which path it took.

We write `config.json` and `generation_config.json` by hand rather than through transformers' `save_pretrained`:
the same files must load in transformers 4.x and 5.x (5.x writes `rope_parameters`, which 4.x silently ignores),
and the native path must not need transformers installed. Only safetensors and JSON are ever read back: a
pickle-only checkpoint is refused with the command that converts it. Native weights are built on the meta device
and filled tensor by tensor from the (possibly sharded) files, so loading never holds two copies of a model.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError, __version__
from danlu.families import hf_config, model_config_from_hf, native_unsupported
from danlu.files import atomic_path, recover_swapped
from danlu.model import ModelConfig, Transformer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
META = "danlu.json"
MAX_SHARD_BYTES = 5 * 2**30  # shards above this size, as transformers 4.x's save_pretrained does
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def dtype_name(dtype: torch.dtype | str) -> str:
    """A dtype as config.json spells it; raises for anything but float32/bfloat16/float16."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise DanluError(f"dtype {dtype} cannot be saved (choose {', '.join(DTYPES)})")
        return names[dtype]
    aliases = {
        "fp32": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "float": "float32",
    }
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in DTYPES:
        raise DanluError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def save_model_dir(
    folder: Path, state_dict: dict[str, torch.Tensor], cfg: Any, tokenizer: Any, meta: dict[str, Any],
    *, chat: bool = False, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:  # fmt: skip
    """Writes a complete checkpoint folder (the caller makes it atomic, e.g. with files.atomic_path).

    `cfg` is the native ModelConfig or a transformers-backed model's config; weights are written in `dtype`
    (default: the dtype the model came in, float32 for models danlu trained) and sharded above `max_shard_bytes`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    native = isinstance(cfg, ModelConfig)
    dtype = dtype_name(dtype or getattr(cfg, "torch_dtype", None) or "float32")
    tied = bool(cfg.tie_word_embeddings)
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        shared = (v.data_ptr(), tuple(v.shape)) if v.numel() else (id(v), ())
        if k.startswith("rope_") or (tied and k == "lm_head.weight") or shared in seen:
            continue  # tied tensors are saved once (safetensors refuses shared ones; loaders re-tie them)
        seen.add(shared)
        tensors[k] = v.detach().to("cpu", DTYPES[dtype]).contiguous()
    write_weights(folder, tensors, max_shard_bytes)
    config = (
        hf_config(cfg, tokenizer, chat=chat, dtype=dtype)
        if native
        else foreign_config(cfg, tokenizer, chat, dtype)
    )
    _write_json(folder / "config.json", config)
    stops = list(dict.fromkeys([tokenizer.end_of_turn_id, tokenizer.eos_id] if chat else [tokenizer.eos_id]))
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": tokenizer.pad_id,
         "do_sample": True, "temperature": 0.7, "top_p": 0.9},
    )  # fmt: skip
    tokenizer.save(
        folder,
        model_max_length=cfg.max_position_embeddings,
        eos_token=tokenizer.id_to_token(tokenizer.end_of_turn_id) if chat else None,
    )
    full_meta = {
        "danlu_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "chat": chat,
        **meta,
    }
    _write_json(folder / META, full_meta)


def foreign_config(cfg: Any, tokenizer: Any, chat: bool, dtype: str) -> dict[str, Any]:
    """config.json of a transformers-backed model: its own config, with danlu's token ids and dtype."""
    stops = list(dict.fromkeys([tokenizer.end_of_turn_id, tokenizer.eos_id] if chat else [tokenizer.eos_id]))
    out = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=stops if len(stops) > 1 else stops[0],
               pad_token_id=tokenizer.pad_id, torch_dtype=dtype, dtype=dtype)  # fmt: skip
    return out


def write_weights(
    folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards with transformers' index file."""
    from safetensors.torch import save_file

    for old in [*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS, folder / WEIGHTS_INDEX]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


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


# ───────────────────────── finding a checkpoint and its weights ─────────────────────────


def resolve_checkpoint(name: str | Path) -> Path:
    """A local folder as it is; a hub id ("Qwen/Qwen2.5-0.5B-Instruct") through huggingface_hub's cache or download.

    Offline, one line says so and how to bring the folder over, instead of a stack of connection errors."""
    path = Path(name)
    recover_swapped(path)
    if path.exists() or not HUB_ID.match(str(name)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DanluError(f"{name}: no such folder (hub ids need `pip install huggingface_hub`)") from None
    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not in the local cache: try the network
        pass
    print(f"[danlu] {name}: not a local folder; downloading it from the Hugging Face hub", file=sys.stderr)
    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_FILES))
    except Exception as e:  # huggingface_hub raises many types for "offline", "no such repo", "gated"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DanluError(
            f"{name}: not a local folder, and the Hugging Face hub did not give it ({type(e).__name__}: {first}). "
            f"Offline? Download it where there is network (`hf download {name} --local-dir DIR`) and pass DIR"
        ) from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index names."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DanluError(f"{index}: malformed shard index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DanluError(
                f"{index}: shard(s) missing: {', '.join(missing[:3])}; the download is incomplete"
            )
        return files
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DanluError(
            f"{path}: only pickle weights ({', '.join(pickles[:3])}); danlu never unpickles files (they can run "
            'code). Convert them once, in an environment you trust: python -c "from transformers import '
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
            "and copy the tokenizer files beside it"
        )
    raise DanluError(f"{path}: no weights (expected {WEIGHTS} or {WEIGHTS_INDEX} with its shards)")


def read_tensors(files: list[Path], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from safetensors files one tensor at a time (memory-mapped; cast to `dtype` if given)."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    t = handle.get_tensor(name)
                    yield name, t if dtype is None or not t.is_floating_point() else t.to(dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise DanluError(
                f"{f}: unreadable safetensors file ({e}); the checkpoint is partial or corrupt"
            ) from None


def load_weights(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or shards)."""
    return dict(read_tensors(weight_files(Path(path)), dtype))


@dataclass
class Checkpoint:
    model: Any  # danlu.model.Transformer (native) or danlu.hf_model.HFCausalLM (transformers-backed)
    tokenizer: Any
    config: Any  # ModelConfig, or the transformers-backed model's config
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path = Path(".")
    backend: str = "native"  # "native" or "transformers"

    @property
    def is_chat(self) -> bool:
        return bool(
            self.meta.get("chat", self.meta.get("stage") is None and self.tokenizer.has_chat_template)
        )


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").exists() and ((path / WEIGHTS).exists() or (path / WEIGHTS_INDEX).exists())


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise DanluError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").exists():
        raise DanluError(
            f"{path}: not a checkpoint folder (no config.json); expected a training stage's output or a "
            "Hugging Face model folder"
        )
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DanluError(f"{path}/config.json: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DanluError(f"{path}/config.json: expected a JSON object")
    return cfg


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's danlu.json ({} when absent); malformed or not an object: one error naming the file."""
    if not (path / META).exists():
        return {}
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DanluError(f"{path / META}: malformed JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DanluError(f"{path / META}: expected a JSON object, got {type(meta).__name__}")
    return meta


def model_path(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """("native" | "transformers", why not native) for a config.json."""
    reason = native_unsupported(cfg)
    archs = cfg.get("architectures") or []
    if reason is None and any(not a.endswith("ForCausalLM") for a in archs):
        reason = f"architectures {archs} (the native model is a causal LM)"
    return ("native", None) if reason is None else ("transformers", reason)


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    quiet: bool = False,
) -> Checkpoint:
    """Loads a danlu checkpoint or any Hugging Face causal-LM folder (or hub id), on the native path where the
    architecture allows it and through transformers otherwise; checks that the tokenizer fits the model.

    Weights load as `dtype` (default float32: the engine trains fp32 master weights); the dtype they were stored
    in is kept in the config, and saving writes that dtype back unless told otherwise."""
    from danlu.tokenizer import Tokenizer

    path = resolve_checkpoint(path)
    if (path / "adapter_config.json").is_file() and not is_checkpoint(path):  # a peft adapter: base + adapter
        from danlu.adapters.folder import load_adapter_checkpoint

        return load_adapter_checkpoint(path, device, dtype, quiet=quiet)
    hf = read_config(path)
    if (hf.get("quantization_config") or {}).get("quant_method") == "danlu":  # int8/int4 from danlu.compress
        from danlu.compress.quantize import load_quantized

        return load_quantized(path, device, dtype, quiet=quiet)
    files = weight_files(path)
    try:
        backend, reason = model_path(hf)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise DanluError(f"{path}/config.json: a value has the wrong shape or type ({e})") from None
    tokenizer = Tokenizer.load(path)
    dtype = dtype or torch.float32
    if backend == "native":
        try:
            cfg = model_config_from_hf(hf, path)
            tokenizer.check_fits(cfg.vocab_size, str(path))
            model = _load_native(path, cfg, files, dtype)
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise DanluError(f"{path}/config.json: a value has the wrong shape or type ({e})") from None
    else:
        try:
            from danlu.hf_model import HFCausalLM
        except ImportError as e:
            raise DanluError(f"{path}: {reason}; such models run through transformers, which is not installed "
                             f"({e}): pip install transformers") from None  # fmt: skip
        model = HFCausalLM.from_pretrained(path, dtype=dtype)
        cfg = model.config
        tokenizer.check_fits(cfg.vocab_size, str(path))
    model.to(device=device).eval()
    meta = read_meta(path)
    if not quiet and not meta:  # a model from elsewhere: say which path it takes (danlu's own are native)
        arch = (hf.get("architectures") or [hf.get("model_type")])[0]
        n = sum(p.numel() for p in model.parameters())
        why = f" ({reason})" if reason else ""
        stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        print(f"[danlu] {path}: {arch}, {n / 1e6:.1f}M parameters ({stored} weights) on the {backend} "
              f"path{why}", file=sys.stderr)  # fmt: skip
    return Checkpoint(model=model, tokenizer=tokenizer, config=cfg, meta=meta, path=path, backend=backend)


def _load_native(path: Path, cfg: ModelConfig, files: list[Path], dtype: torch.dtype) -> Transformer:
    """Builds the model on the meta device and assigns the file's tensors, so memory holds one copy."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict()) - {"rope_cos", "rope_sin"}
    state = {}
    for name, t in read_tensors(files, dtype):
        if name.endswith("rotary_emb.inv_freq"):  # old transformers versions saved the RoPE buffer
            continue
        state[name] = t
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise DanluError(
            f"{path}: tensors do not match config.json "
            f"(missing: {', '.join(missing[:4]) or '-'}; unexpected: {', '.join(unexpected[:4]) or '-'})"
        )
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise DanluError(
                f"{path}: tensor {name} has shape {tuple(t.shape)}, config.json implies {tuple(want)}"
            )
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()
    return model


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str | None = None, force: bool = False) -> Path:
    """A clean Hugging Face folder of a checkpoint in the dtype asked (default: its own), written atomically."""
    out = Path(out)
    if out.exists() and not force:
        raise DanluError(f"{out}: already exists (pass --force to replace it)")
    ckpt = load_checkpoint(checkpoint, quiet=True)
    with atomic_path(out) as tmp:
        save_model_dir(
            tmp, ckpt.model.state_dict(), ckpt.config, ckpt.tokenizer,
            {k: v for k, v in ckpt.meta.items() if k not in ("danlu_version", "created", "chat")}
            | {"exported_from": str(ckpt.path)},
            chat=ckpt.is_chat, dtype=dtype,
        )  # fmt: skip
    return out
