"""mergekit's YAML schema: reading a merge config and resolving its parameters for one tensor.

The keys and their meaning are mergekit's (`mergekit/config.py`, `parameter_resolver.py`), so that users' existing
configs work: `merge_method`, `base_model`, `models: [{model, parameters}]` (or `slices:` with one slice whose sources
span every layer, the form many SLERP configs use), `parameters` (global), `dtype`, `out_dtype`,
`tokenizer_source`. A parameter is a scalar, a gradient (a list interpolated over the layers: layer i of L gets
position i/(L−1); tensors outside the layers get position 0), or a list of `{filter, value}` where the first filter
that is a substring of the tensor's name (or `*`, or no filter) wins. Precedence: the model's own parameters, then the
slice's, then the global ones, then the method's default. Keys danlu does not implement (`modules`, frankenmerge
slices, `tokenizer:` surgery, `union` vocabularies, `model+lora` references) are refused by name, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.io import dtype_name
from danlu.merge.methods import METHODS, Method, Param

KNOWN_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "chat_template", "name"}  # fmt: skip
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")


@dataclass
class ModelSpec:
    """One input model: its reference as written and its own parameters."""

    ref: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    method: Method
    models: list[ModelSpec]  # the inputs, the base among them where the method has one
    base: str | None
    parameters: dict[str, Any]
    slice_parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def base_index(self) -> int | None:
        if self.base is None:
            return None
        return next(i for i, m in enumerate(self.models) if m.ref == self.base)


def _ref(value: Any, where: str) -> str:
    """A model reference: a string path or hub id; mergekit's `base+lora` form is not supported here."""
    if isinstance(value, dict) and "model" in value:  # mergekit also accepts {model: ..., lora: ...} objects
        if value.get("lora"):
            raise DanluError(f"{where}: LoRA references are not supported by danlu merge; merge the adapter into "
                             "its base first (peft's merge_and_unload) and reference that folder")  # fmt: skip
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise DanluError(f"{where}: expected a model folder or hub id, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise DanluError(f"{where}: {value!r} is mergekit's model+LoRA form, which danlu merge does not support; "
                         "merge the adapter into its base first (peft's merge_and_unload) and reference that folder")  # fmt: skip
    return value


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DanluError(
            f"{where}: `parameters` must be a mapping of name: value, got {type(value).__name__}"
        )
    return dict(value)


def parse_config(raw: Any, where: str = "merge config") -> MergeConfig:
    """Checks a loaded YAML mapping against mergekit's schema and the method's needs (one message per problem)."""
    if not isinstance(raw, dict):
        raise DanluError(f"{where}: expected a YAML mapping with merge_method and models")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if "modules" in unknown or "tokenizer" in unknown:
        key = "modules" if "modules" in unknown else "tokenizer"
        raise DanluError(f"{where}: `{key}:` is a mergekit feature danlu merge does not implement "
                         "(supported: models or one full-depth slice, and tokenizer_source)")  # fmt: skip
    if unknown:
        raise DanluError(f"{where}: unknown key(s) {', '.join(unknown)} (mergekit's schema: "
                         f"{', '.join(sorted(KNOWN_KEYS))})")  # fmt: skip
    name = raw.get("merge_method")
    if name not in METHODS:
        raise DanluError(f"{where}: merge_method {name!r} is not one of {', '.join(METHODS)}")
    method = METHODS[name]
    base = _ref(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None
    slice_params: dict[str, Any] = {}
    if raw.get("models") is not None and raw.get("slices") is not None:
        raise DanluError(f"{where}: give either `models:` or `slices:`, not both")
    if raw.get("slices") is not None:
        models, slice_params = _from_slices(raw["slices"], where)
    else:
        items = raw.get("models")
        if not isinstance(items, list) or not items:
            raise DanluError(f"{where}: `models:` must be a non-empty list of {{model: PATH, parameters: …}}")
        models = []
        for i, item in enumerate(items):
            at = f"{where}: models[{i}]"
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict) or "model" not in item:
                raise DanluError(f"{at}: expected {{model: PATH, parameters: …}}")
            models.append(ModelSpec(_ref(item["model"], at), _params(item.get("parameters"), at)))
    refs = [m.ref for m in models]
    dup = next((r for i, r in enumerate(refs) if r in refs[:i]), None)
    if dup:
        raise DanluError(f"{where}: model {dup!r} is listed twice")
    if method.base == "required":
        if base is None:
            raise DanluError(f"{where}: merge_method {name} needs a base_model (the model the others' differences "
                             "are taken from); add `base_model: PATH`")  # fmt: skip
        if base not in refs:  # mergekit adds a base missing from the inputs
            models.append(ModelSpec(base))
    elif base is not None and base not in refs:
        base = None  # linear has no base: mergekit ignores it for the arithmetic
    n = len(models)
    if name == "slerp" and n != 2:
        raise DanluError(f"{where}: slerp interpolates exactly two models (the base and one other); got {n}: "
                         f"{', '.join(m.ref for m in models)}. Use linear or model_stock for more")  # fmt: skip
    if n < method.min_inputs:
        raise DanluError(f"{where}: merge_method {name} needs at least {method.min_inputs} models including the "
                         f"base, got {n}")  # fmt: skip
    params = _params(raw.get("parameters"), where)
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            raw[key] = dtype_name(raw[key])
    source = raw.get("tokenizer_source")
    if source == "union":
        raise DanluError(f"{where}: tokenizer_source: union builds a new vocabulary, which danlu merge refuses; "
                         "merged models must share one tokenizer (use base, or one model's path)")  # fmt: skip
    if source is not None and source != "base":
        source = _ref(source, f"{where}: tokenizer_source")
        if source not in [m.ref for m in models]:
            raise DanluError(f"{where}: tokenizer_source {source!r} is not one of the merged models")
    if source == "base" and base is None:
        raise DanluError(f"{where}: tokenizer_source: base needs a base_model")
    template = raw.get("chat_template")
    if template is not None and (
        not isinstance(template, str)
        or (template != "auto" and "{%" not in template and "{{" not in template)
    ):
        raise DanluError(f"{where}: chat_template must be a Jinja template string or 'auto' (mergekit's built-in "
                         f"template names are not bundled), got {template!r}")  # fmt: skip
    return MergeConfig(method, models, base, params, slice_params, raw.get("dtype"), raw.get("out_dtype"),
                       base if source == "base" else source, template, raw)  # fmt: skip


def _from_slices(slices: Any, where: str) -> tuple[list[ModelSpec], dict[str, Any]]:
    """mergekit's `slices:` form when it means a plain merge: one slice, every source over the same full range
    (checked against the layer count once the models are open)."""
    if not isinstance(slices, list) or len(slices) != 1:
        raise DanluError(f"{where}: danlu merge supports one slice spanning all layers (a plain merge); "
                         "several slices (layer stacking, 'frankenmerges') are not implemented")  # fmt: skip
    sources = slices[0].get("sources") if isinstance(slices[0], dict) else None
    if not isinstance(sources, list) or not sources:
        raise DanluError(f"{where}: slices[0].sources must be a non-empty list")
    models, ranges = [], set()
    for i, src in enumerate(sources):
        at = f"{where}: slices[0].sources[{i}]"
        if not isinstance(src, dict) or "model" not in src:
            raise DanluError(f"{at}: expected {{model: PATH, layer_range: [start, end]}}")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
            raise DanluError(f"{at}: layer_range must be [start, end]")
        ranges.add(tuple(lr))
        m = ModelSpec(_ref(src["model"], at), _params(src.get("parameters"), at))
        m.parameters["__layer_range__"] = tuple(lr)
        models.append(m)
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise DanluError(f"{where}: every source must use the same layer_range starting at 0 "
                         f"(got {sorted(ranges)}); partial-depth slices are not implemented")  # fmt: skip
    return models, _params(slices[0].get("parameters"), f"{where}: slices[0]")


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position of a tensor: i/(L−1) inside layer i (1 when L = 1), 0 outside the layers."""
    m = _LAYER.search(tensor_name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, tensor_name: str, t: float, param: Param, where: str) -> Any:
    """One setting (scalar, gradient, or filtered list) for one tensor; None where no filter matches."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(setting, param, where)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_validate(e, param, where) for e in setting]
            if param.kind is bool:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * values[i0] + frac * values[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise DanluError(f"{where}: expected a list of numbers or of {{filter, value}}, got {cond!r}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate(cond["value"], tensor_name, t, param, where)
        return None
    raise DanluError(f"{where}: unexpected value {setting!r}")


def _validate(value: Any, param: Param, where: str) -> Any:
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise DanluError(f"{where}: {param.name} must be true or false, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DanluError(f"{where}: {param.name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or out != out or out in (float("inf"), float("-inf")):
        raise DanluError(f"{where}: {param.name} must be a finite number, got {value!r}")
    return out


def resolve(cfg: MergeConfig, tensor_name: str, t: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(shared parameters, per-model parameters) for one tensor, with mergekit's precedence and defaults."""
    shared: dict[str, Any] = {}
    scopes = [cfg.slice_parameters, cfg.parameters]
    for p in cfg.method.params:
        if p.per_model:
            continue
        shared[p.name] = _resolve_one(p, scopes, tensor_name, t, "parameters")
    per_model = []
    for i, m in enumerate(cfg.models):
        values = {}
        for p in cfg.method.params:
            if not p.per_model or (i == cfg.base_index and not p.base_too):
                continue
            values[p.name] = _resolve_one(p, [m.parameters, *scopes], tensor_name, t, f"model {m.ref}")
        per_model.append(values)
    return shared, per_model


def _resolve_one(p: Param, scopes: list[dict[str, Any]], tensor_name: str, t: float, who: str) -> Any:
    for scope in scopes:
        if p.name in scope:
            value = evaluate(scope[p.name], tensor_name, t, p, f"{who}, parameter {p.name}")
            if value is not None:
                return value
    if p.default is None:
        raise DanluError(f"{who}: missing parameter {p.name} for tensor {tensor_name} "
                         f"(merge_method needs `{p.name}:` under parameters)")  # fmt: skip
    return p.default
