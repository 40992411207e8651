"""Recipes: YAML files of stage sections, `key=value` overrides, and dataclass configs with clear errors.

A recipe is a mapping of sections (`world:`, `tokenizer:`, `pretrain:`, …). Each stage turns its section into
its own dataclass with `from_dict`, which rejects unknown keys by name and lists the valid ones, so a typo in a
recipe fails at once instead of being silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from danlu import DanluError

RECIPES_DIR = Path(__file__).parent / "recipes"
T = TypeVar("T")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A built-in recipe by name (`tiny`, `smoke`, …) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise DanluError(
                f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(recipe_names())}"
            )
    if not path.exists():
        raise DanluError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DanluError(f"{path}: malformed YAML ({e})") from None
    if not isinstance(data, dict):
        raise DanluError(f"{path}: a recipe must be a mapping of sections")
    base = data.pop("extends", None)
    if base:
        data = deep_merge(load_recipe(base if "/" not in str(base) else path.parent / base), data)
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`pretrain.steps=200 model.depth=6` → nested keys; values are parsed as YAML scalars/lists."""
    out = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise DanluError(
                f"override {item!r} is not of the form key=value (for example pretrain.steps=100)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise DanluError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Builds dataclass `cls` from `data`, checking names and (simple) types; `where` names the section."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DanluError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DanluError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any or value is None and _allows_none(hint):
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except DanluError:
                continue
        raise DanluError(f"{where}: {value!r} is not a valid {_name(hint)}")
    if origin is typing.Literal:
        # YAML 1.1 reads on/off as booleans: `train.compile=off` means "off"
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(hint)):
            value = "on" if value else "off"
        if value not in typing.get_args(hint):
            raise DanluError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(hint)))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (arg, *_) = typing.get_args(hint) or (Any,)
        return origin(_coerce(v, arg, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise DanluError(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise DanluError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise DanluError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise DanluError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise DanluError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DanluError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _allows_none(hint: Any) -> bool:
    return hint is type(None) or type(None) in typing.get_args(hint)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
