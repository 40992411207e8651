"""Fine-tuning in a child process (`danlu sft`): how an experiment that trains several models on chat data — the
synth experiment's students, compression's restore step — runs the SFT stage without importing it.

Why a child process: a stage never imports another stage, and the command line is SFT's stable interface; the
child also frees every tensor of the fine-tuning when it exits. A marker in the output folder records the inputs
(data, recipe, base), so a rerun with the same inputs skips the training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.files import write_json_atomic


def inputs_signature(paths: list[Path], extra: dict[str, Any]) -> str:
    """A short hash of files (path and bytes) and settings: the same inputs give the same marker."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def sft_in_child(
    base: Path, data: list[Path], out: Path, recipe_file: Path, log: Path, timeout: float, who: str,
    extra: list[str] | None = None,
) -> bool:  # fmt: skip
    """`danlu sft --from BASE --data … --out OUT --recipe RECIPE [EXTRA…]`, its output appended to `log`, unless
    OUT's marker says it was done with the same inputs. Returns whether it trained; a failed child raises a
    DanluError that names `who` asked for it and the log to read."""
    marker = out / "student.json"
    sig = inputs_signature([*data, recipe_file], {"base": str(base), "extra": extra or []})
    if marker.is_file() and json.loads(marker.read_text()).get("signature") == sig:
        return False
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "danlu", "sft", "--from", str(base), "--data", *map(str, data), "--out", str(out),
           "--recipe", str(recipe_file), *(extra or [])]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    if code != 0:
        raise DanluError(f"{who}: fine-tuning {out.name} with danlu sft failed (exit {code}); see {log}")
    write_json_atomic(marker, {"signature": sig, "data": [str(p) for p in data]})
    return True
