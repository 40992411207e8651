"""A teacher loaded into this process: a danlu checkpoint or any HF causal-LM folder, decoding in batches.

Why in process: with no server to run, a user's own chat model (or a bigger checkpoint on a GPU) writes data in
one command, and a round of requests is one batched generation (danlu.generate.Generator) instead of one
sequence at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.synth.teacher import Reply, Sampling, template_prefix


class LocalTeacher:
    def __init__(self, path: str | Path, *, batch_size: int = 16, device: str = "cpu") -> None:
        from danlu.generate import Generator
        from danlu.io import load_checkpoint

        if not Path(path).exists():
            raise DanluError(
                f"teacher {path}: no such checkpoint folder (or give an http(s):// URL of an API)"
            )
        if batch_size < 1:
            raise DanluError(f"--batch-size {batch_size}: must be at least 1")
        ckpt = load_checkpoint(path, device=device, quiet=True)
        if not ckpt.is_chat:
            raise DanluError(f"teacher {path}: a base model (not a chat model); a teacher must follow "
                             "instructions: give an SFT checkpoint or an instruct model")  # fmt: skip
        self.name = str(Path(path))
        self.tokenizer = ckpt.tokenizer
        self.generator = Generator(ckpt.model, ckpt.tokenizer)
        self.context = self.generator.context
        self.batch_size = batch_size

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Reply]:
        from danlu.generate import SamplingParams

        out: list[Reply | None] = [None] * len(prompts)
        fits = [i for i, p in enumerate(prompts) if 0 < len(p) < self.context - 1]
        for i in set(range(len(prompts))) - set(fits):
            out[i] = Reply("", "too_long")
        for b in range(0, len(fits), self.batch_size):
            rows = fits[b : b + self.batch_size]
            params = SamplingParams(
                max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                seed=None if sampling.seed is None else sampling.seed + b, stop=list(sampling.stop),
            )  # fmt: skip
            for i, c in zip(rows, self.generator.generate([prompts[i] for i in rows], params)):
                out[i] = Reply(c.text, c.finish_reason)
        return [r for r in out if r is not None]

    def chat(self, conversations: list[list[dict[str, Any]]], sampling: Sampling) -> list[Reply]:
        ids = [self.tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations]
        return self._generate(ids, sampling)

    def complete(self, prompts: list[str], sampling: Sampling) -> list[Reply]:
        return self._generate([self.tokenizer.encode(p) for p in prompts], sampling)

    def chat_template_prefix(self, system: str | None = None) -> str | None:
        return template_prefix(self.tokenizer, system)
