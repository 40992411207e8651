"""Runs a merge: opens the input folders, refuses what cannot be merged, merges tensor by tensor, writes a folder.

Inputs are danlu checkpoints or any Hugging Face causal-LM folder (hub ids resolve through danlu.io). Tensors are read
one name at a time from every input's (possibly sharded) safetensors, memory-mapped, so memory holds the output and
one tensor per input, never several models. The output is the reference model's folder (the base, else the first
model) with merged weights: its config.json (dtype updated), the tokenizer files of `tokenizer_source`, a danlu.json
that records the merge, and the config as `mergekit_config.yml` (mergekit's name for it).

Refused, with the difference named: vocabularies that differ (the first differing id and its token in each model,
or the sizes), tokenizers with the same vocabulary but different merges or pre-tokenization, tensors missing from
one input, tensors whose shapes differ; and the config problems config.py names.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from danlu import DanluError, __version__
from danlu.files import atomic_path
from danlu.io import DTYPES, META, WEIGHTS_INDEX, resolve_checkpoint, weight_files, write_weights
from danlu.merge import methods as M
from danlu.merge.config import MergeConfig, layer_position, parse_config, resolve

# Files of a model folder that carry the tokenizer and generation settings (copied from tokenizer_source).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.*",
                   "merges.txt", "*.model", "generation_config.json")  # fmt: skip
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class Source:
    """One input folder: its config.json, tokenizer, and a name → file index of its tensors (headers only)."""

    def __init__(self, ref: str, where: Path | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        from danlu.io import read_config
        from danlu.tokenizer import Tokenizer

        path = Path(ref)
        if not path.exists() and where is not None and (where / ref).exists():
            path = where / ref  # relative to the config file, where the current directory has no such folder
        self.ref = ref
        self.path = resolve_checkpoint(path)
        self.config = read_config(self.path)
        self.files = weight_files(self.path)
        self.tokenizer = Tokenizer.load(self.path)
        self.meta = json.loads((self.path / META).read_text()) if (self.path / META).is_file() else {}
        self.index: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[Path, Any] = {}
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise DanluError(
                    f"{f}: unreadable safetensors file ({e}); the checkpoint is partial or corrupt"
                ) from None
            self._handles[f] = handle
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):  # old transformers versions saved the RoPE buffer
                    continue
                self.index[name] = f
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.index[name]].get_tensor(name)

    @property
    def num_layers(self) -> int | None:
        cfg = (
            self.config.get("text_config")
            if isinstance(self.config.get("text_config"), dict)
            else self.config
        )
        return next((cfg[k] for k in _NUM_LAYER_KEYS if isinstance(cfg.get(k), int)), None)

    @property
    def is_chat(self) -> bool:
        """As danlu.io.Checkpoint.is_chat decides it."""
        return bool(
            self.meta.get("chat", self.meta.get("stage") is None and self.tokenizer.has_chat_template)
        )


def check_same_tokenizer(a: Source, b: Source) -> None:
    """Raises, naming the first difference, unless `a` and `b` tokenize every text the same way."""
    from danlu.tokenizer import tokenizer_difference

    diff = tokenizer_difference(a.tokenizer, b.tokenizer, a.ref, b.ref)
    if diff:
        raise DanluError(
            f"different tokenizers: {diff}; models with different tokenizers cannot be merged or ensembled "
            "(their embedding rows mean different tokens)"
        )


def check_same_tensors(sources: list[Source]) -> None:
    """Raises, naming the tensor, unless every input has the same tensor names with the same shapes."""
    ref = sources[0]
    for s in sources[1:]:
        missing = [n for n in ref.index if n not in s.index]
        extra = [n for n in s.index if n not in ref.index]
        if missing or extra:
            name, has, lacks = (missing[0], ref, s) if missing else (extra[0], s, ref)
            hint = (
                " (one model ties its output layer to the embedding, the other does not)"
                if "lm_head" in name
                else ""
            )
            raise DanluError(
                f"different architectures: tensor {name} is in {has.ref} but not in {lacks.ref}{hint}"
            )
        for name, shape in ref.shapes.items():
            if s.shapes[name] != shape:
                raise DanluError(
                    f"different shapes: tensor {name} is {list(shape)} in {ref.ref} but {list(s.shapes[name])} in "
                    f"{s.ref}; only models of one architecture and size can be merged"
                )


def check_weights(
    cfg: MergeConfig, shared: dict[str, Any], per_model: list[dict[str, Any]], name: str
) -> None:
    """The parameter values a method cannot use, named with the tensor they were resolved for."""
    method = cfg.method.name
    if method == "slerp" and not 0 <= shared["t"] <= 1:
        raise DanluError(f"slerp: t = {shared['t']} for tensor {name}; t must lie in [0, 1] (0 = base model)")
    weights = [p["weight"] for p in per_model if "weight" in p]
    total = sum(weights)
    if method == "linear":
        if shared["normalize"] and abs(total) < 1e-8:
            raise DanluError(f"linear: the weights sum to 0 for tensor {name}; they are divided by their sum")
        if not shared["normalize"] and abs(total - 1) > 1e-6:
            raise DanluError(f"linear with normalize: false: the weights sum to {total:g} for tensor {name}, which "
                             "scales every weight by that; make them sum to 1 or set normalize: true")  # fmt: skip
    for p, m in zip(per_model, cfg.models):
        d = p.get("density")
        if d is not None and not 0 < d <= 1:
            raise DanluError(
                f"{method}: density {d:g} of {m.ref} for tensor {name}; density must lie in (0, 1]"
            )
    if method != "linear" and shared.get("normalize") and weights and abs(total) < 1e-8:
        raise DanluError(f"{method}: the weights sum to 0 for tensor {name} with normalize: true")


def merge_tensor(
    cfg: MergeConfig, name: str, tensors: list[torch.Tensor], t: float, seed: int
) -> torch.Tensor:
    """One output tensor (float32/float64) from the inputs' tensors of that name, in cfg.models order."""
    shared, per_model = resolve(cfg, name, t)
    check_weights(cfg, shared, per_model, name)
    method, b = cfg.method, cfg.base_index
    if method.name == "linear":
        return M.linear(tensors, [p["weight"] for p in per_model], shared["normalize"])
    if method.name == "slerp":
        return M.slerp(shared["t"], tensors[b], tensors[1 - b])
    others = [i for i in range(len(tensors)) if i != b]
    if method.name == "model_stock":
        return M.model_stock(tensors[b], [tensors[i] for i in others], shared["filter_wise"])
    return M.task_arithmetic(
        tensors[b], [tensors[i] for i in others], [per_model[i]["weight"] for i in others],
        [per_model[i]["density"] for i in others], sparsify=method.sparsify, consensus=method.consensus,
        normalize=shared["normalize"], rescale=shared["rescale"], lam=shared["lambda"],
        generators=[M.mask_generator(seed, name, i) for i in others],
    )  # fmt: skip


@dataclass
class MergeResult:
    out: Path
    method: str
    models: list[str]
    tensors: int
    parameters: int


def load_config(path: str | Path) -> tuple[MergeConfig, str]:
    path = Path(path)
    if not path.is_file():
        raise DanluError(f"{path}: no such merge config")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DanluError(f"{path}: malformed YAML ({e})") from None
    return parse_config(raw, str(path)), text


def merge(
    config: str | Path | dict[str, Any],
    out: str | Path,
    *,
    seed: int = 0,
    force: bool = False,
    max_shard_bytes: int | None = None,
    quiet: bool = False,
) -> MergeResult:
    """Merges the models a mergekit-schema config names into `out` (written atomically)."""
    if isinstance(config, dict):
        cfg, text, where = parse_config(dict(config)), yaml.safe_dump(config, allow_unicode=True), None
    else:
        (cfg, text), where = load_config(config), Path(config).resolve().parent
    out = Path(out)
    if out.exists() and not force:
        raise DanluError(f"{out}: already exists (pass --force to replace it)")
    sources = [Source(m.ref, where) for m in cfg.models]
    ref = sources[cfg.base_index] if cfg.base_index is not None else sources[0]
    order = [ref, *[s for s in sources if s is not ref]]
    for s in order[1:]:
        check_same_tokenizer(ref, s)
    check_same_tensors(order)
    layers = ref.num_layers or 1 + max((int(n.split(".")[2]) for n in ref.index if n.startswith("model.layers.")),
                                       default=0)  # fmt: skip
    for m in cfg.models:
        lr = m.parameters.pop("__layer_range__", None)
        if lr is not None and lr[1] != layers:
            raise DanluError(f"{m.ref}: layer_range {list(lr)} does not span the model's {layers} layers; "
                             "partial-depth slices are not implemented")  # fmt: skip
    tok_source = next((s for s in sources if s.ref == cfg.tokenizer_source), ref)
    in_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    merged: dict[str, torch.Tensor] = {}
    n_params = 0
    names = list(ref.index)
    for k, name in enumerate(names):
        tensors = [s.get(name) for s in sources]
        if in_dtype is not None:
            tensors = [t.to(in_dtype) if t.is_floating_point() else t for t in tensors]
        stored = tensors[0].dtype
        if not tensors[0].is_floating_point():
            result = ref.get(name)  # integer buffers are not averaged
        else:
            result = merge_tensor(cfg, name, tensors, layer_position(name, layers), seed)
        out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else stored
        merged[name] = result.to(out_dtype if result.is_floating_point() else result.dtype).contiguous()
        n_params += result.numel()
        if not quiet and (k + 1) % 50 == 0:
            print(f"[danlu] merge: {k + 1}/{len(names)} tensors", file=sys.stderr)
    dtype_out = cfg.out_dtype or cfg.dtype or _stored_dtype(ref.config)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_weights(tmp, merged, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
        hf = dict(ref.config)
        hf["torch_dtype"] = dtype_out
        if "dtype" in hf:
            hf["dtype"] = dtype_out
        (tmp / "config.json").write_text(
            json.dumps(hf, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        _copy_tokenizer(tok_source.path, tmp, cfg.chat_template)
        (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")
        meta = {
            "danlu_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "chat": all(s.is_chat for s in sources),
            "stage": "merge",
            "merge": {"method": cfg.method.name, "base_model": cfg.base, "models": [m.ref for m in cfg.models],
                      "paths": [str(s.path) for s in sources], "parameters": cfg.parameters, "seed": seed,
                      "dtype": dtype_out, "tokenizer_source": str(tok_source.path)},
        }  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return MergeResult(out, cfg.method.name, [m.ref for m in cfg.models], len(merged), n_params)


def _stored_dtype(hf: dict[str, Any]) -> str:
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return name if name in DTYPES else "float32"


def _copy_tokenizer(src: Path, dst: Path, chat_template: str | None) -> None:
    """The tokenizer and generation files of `src`; a Jinja `chat_template` from the config replaces its template."""
    skip = {"config.json", META, WEIGHTS_INDEX}
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file() and f.name not in skip and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
    if chat_template is None or chat_template == "auto":
        return
    tc_path = dst / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc["chat_template"] = chat_template
    tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (dst / "chat_template.jinja").unlink(missing_ok=True)
