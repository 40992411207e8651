"""`<checkpoint>/heldout.json`: the one home of a checkpoint's held-out figures, so each is computed once.

SFT scores its checkpoint at the end of training; the eval stage scores every checkpoint of the run; an RL stage
scores its parent before training. Without one place to keep them, the same quantity of the same checkpoint was
computed two or three times, on different rows or at a different precision, and the run reported different
numbers for it (79.5% and 81.5% for the same SFT checkpoint's chat facts). A figure here is valid for the weights
it was computed on (file names, sizes and modification times of the weight files) and the settings that define it
(the rows' hash, the precision); anything else is recomputed and replaces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "heldout.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weights_signature(folder: Path) -> list[list[Any]]:
    """(name, size, mtime_ns) of the weight files in a checkpoint folder: what a stored figure is valid for."""
    return sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in folder.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )


class FigureStore:
    """The figures of one checkpoint folder, keyed `split/quantity`; writes go to a temp file then rename."""

    def __init__(self, folder: str | Path, *, readonly: bool = False) -> None:
        self.folder = Path(folder)
        self.readonly = readonly  # `danlu eval` reads a run's figures but writes nothing into a model folder
        self.path = self.folder / FILE
        self.weights = weights_signature(self.folder)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}  # a torn or foreign file: recomputed, then rewritten
        if not isinstance(data, dict) or data.get("weights") != self.weights:
            return {}
        return data.get("figures") or {}

    def get(self, key: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if not entry or entry.get("settings") != settings:
            return None
        return entry["figure"]

    def put(self, key: str, settings: dict[str, Any], figure: dict[str, Any]) -> None:
        from danlu.files import write_json_atomic

        if self.readonly:
            return
        figures = self._read()
        figures[key] = {"settings": settings, "figure": figure}
        write_json_atomic(self.path, {"weights": self.weights, "figures": figures})

    def figures(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{split: {quantity: figure}} of every figure valid for the current weights."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, entry in sorted(self._read().items()):
            split, _, quantity = key.partition("/")
            out.setdefault(split, {})[quantity] = entry["figure"]
        return out
