"""Preference pairs from a model's own samples, judged by a reward: a checking function or a reward model.

Written pairs set a right answer against a made-up wrong one, and a model fine-tuned on right answers already ranks
those correctly (the world's held-out written pairs: 0.99+ for the SFT model), so DPO on them has little to move.
The mistakes the model itself makes are what it has to unlearn: sample a few answers per prompt, score them, and
pair a best-scoring answer with a worst-scoring one (rejection-sampled pairs, as in RSO and online DPO with a
verifier). Only answers that ended by themselves take part: a cut-off answer would be scored as if it had ended.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from danlu.data.preference import PreferencePair, RLPrompt


@torch.no_grad()
def judged_pairs(
    model: Any, tokenizer: Any, prompts: list[RLPrompt], judge: Any, *, samples: int, max_tokens: int, seed: int,
    prompts_per_batch: int = 32, compile: str = "auto",
) -> tuple[list[PreferencePair], dict[str, float]]:  # fmt: skip
    """(pairs, stats): `samples` answers per prompt at temperature 1; a pair where the prompt's rewards differ.
    `compile`: DPO's `train.compile` (danlu.compiler.compile_decoding)."""
    from danlu.compiler import compile_decoding
    from danlu.generate import Generator, SamplingParams

    gen = Generator(model, tokenizer, compile=compile_decoding(compile, model, len(prompts) * samples))
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    rewards: list[float] = []
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start : start + prompts_per_batch]
        ids = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in chunk]
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed * 7_919 + start)
        outs = gen.generate([i for i in ids for _ in range(samples)], params)
        scores = judge([p for p in chunk for _ in range(samples)], [c.text for c in outs])
        rewards += scores
        for j, p in enumerate(chunk):
            group = list(zip(scores[j * samples : (j + 1) * samples], outs[j * samples : (j + 1) * samples]))
            picked = best_and_worst(group, rng)
            if picked is not None:
                (best, chosen), (worst, rejected) = picked
                where = f"{p.where} (sampled, reward {best:g} vs {worst:g})"
                pairs.append(PreferencePair(p.messages, [_answer(chosen)], [_answer(rejected)], where=where))
    stats = {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "mean_reward": round(sum(rewards) / max(1, len(rewards)), 4),
    }
    return pairs, stats


def best_and_worst(
    group: list[tuple[float, Any]], rng: random.Random
) -> tuple[tuple[float, str], ...] | None:
    """((best reward, its text), (worst reward, its text)) among a prompt's finished, non-empty completions, ties
    broken at random; None when fewer than two rewards differ (all equally right or wrong: nothing to prefer)."""
    finished = [(s, c.text) for s, c in group if c.finish_reason == "stop" and c.text.strip()]
    if not finished:
        return None
    best, worst = max(s for s, _ in finished), min(s for s, _ in finished)
    if best == worst:
        return None
    return (
        (best, rng.choice([t for s, t in finished if s == best])),
        (worst, rng.choice([t for s, t in finished if s == worst])),
    )


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_pairs(pairs: list[PreferencePair], path: Path) -> None:
    """The pairs as preference JSONL (prompt/chosen/rejected messages), so a user can read what DPO learned from."""
    from danlu.files import write_jsonl_atomic

    write_jsonl_atomic(
        path,
        ({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": p.where} for p in pairs),
    )
