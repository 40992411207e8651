"""Machine text made on the fly: a user's own model (a danlu checkpoint or any OpenAI-compatible endpoint) answers
prompts at several sampling settings, so a detector learns that model's text and not one temperature's.

Why several settings: detectors trained on one temperature miss text sampled at another (the known failure this
issue asks to measure). The teacher machinery (danlu.synth: batching, endpoint retries, rate limits) is reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.detect.metrics import MACHINE
from danlu.detect.texts import Text

SETTINGS: tuple[tuple[float, float], ...] = ((0.7, 0.9), (1.0, 1.0), (0.3, 1.0))  # (temperature, top_p)


def read_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """Prompts of a file: `prompt`, `instruction` (+ `input`), `question`, `text`, or the first user message."""
    from danlu.files import located_records

    out = []
    for where, rec in located_records(path):
        if isinstance(rec, DanluError):
            raise rec
        if not isinstance(rec, dict):
            continue
        text = next((rec[k] for k in ("prompt", "instruction", "question", "text") if isinstance(rec.get(k), str)),
                    None)  # fmt: skip
        if (
            text is not None
            and rec.get("instruction") == text
            and isinstance(rec.get("input"), str)
            and rec["input"]
        ):
            text = f"{text}\n\n{rec['input']}"
        if text is None and isinstance(rec.get("messages"), list):
            text = next((m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"),
                        None)  # fmt: skip
        if not isinstance(text, str):
            raise DanluError(
                f"{where}: no prompt (fields prompt, instruction, question, text or a user message)"
            )
        if text.strip():
            out.append(text.strip())
        if limit and len(out) >= limit:
            break
    if not out:
        raise DanluError(f"{path}: no prompts")
    return out


def generate_machine_texts(
    teacher: Any, prompts: list[str], *, settings: tuple[tuple[float, float], ...] = SETTINGS, max_tokens: int = 200,
    seed: int = 0,
) -> tuple[list[Text], list[dict[str, Any]]]:  # fmt: skip
    """Each prompt answered once per (temperature, top_p), prompts split evenly across the settings so every
    setting sees different prompts. Returns the texts and their rows (for generated.jsonl: text + meta)."""
    from danlu.synth.teacher import Sampling

    texts: list[Text] = []
    rows: list[dict[str, Any]] = []
    for k, (temperature, top_p) in enumerate(settings):
        chunk = prompts[k :: len(settings)]
        if not chunk:
            continue
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + 1000 * k)
        replies = teacher.chat([[{"role": "user", "content": p}] for p in chunk], sampling)
        for prompt, reply in zip(chunk, replies):
            if reply.finish_reason == "too_long" or not reply.text.strip():
                continue
            meta = {"generator": teacher.name, "temperature": temperature, "top_p": top_p, "prompt": prompt}
            texts.append(Text(reply.text.strip(), MACHINE, f"{teacher.name} T={temperature} top_p={top_p}"))
            rows.append({"text": reply.text.strip(), "meta": meta})
    if not texts:
        raise DanluError(f"{teacher.name}: generated no usable text from {len(prompts)} prompts")
    return texts, rows
