"""Generative evaluation: greedy, batched completions scored by whether they contain an accepted answer."""

from __future__ import annotations

from typing import Any

from danlu.generate import Generator, SamplingParams


def normalize(text: str) -> str:
    return "".join(text.lower().split())


def contains_answer(completion: str, answers: list[str]) -> bool:
    got = normalize(completion)
    return any(normalize(a) and normalize(a) in got for a in answers)


def completion_accuracy(
    generator: Generator, rows: list[dict[str, Any]], *, chat: bool = False, max_tokens: int = 24,
    batch_size: int = 32, keep_examples: int = 6,
) -> dict[str, Any]:  # fmt: skip
    """Share of rows whose greedy completion contains one of `answers` (or `answer`); per language too.

    Rows are {prompt, answer(s), lang} for a base model, or {messages, answer(s), lang} with chat=True.
    """
    tok = generator.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if not chat:
        params.stop = ["\n"]
    correct = 0
    by_lang: dict[str, list[int]] = {}
    examples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if chat:
            prompts = [tok.render_chat(r["messages"], add_generation_prompt=True)[0] for r in chunk]
        else:
            prompts = [[tok.bos_id, *tok.encode(r["prompt"])] for r in chunk]
        for row, comp in zip(chunk, generator.generate(prompts, params)):
            answers = row.get("answers") or [row["answer"]]
            ok = contains_answer(comp.text, answers)
            correct += ok
            lang = row.get("lang", "all")
            by_lang.setdefault(lang, [0, 0])
            by_lang[lang][0] += ok
            by_lang[lang][1] += 1
            if len(examples) < keep_examples:
                shown = row.get("prompt") or row["messages"][-1]["content"]
                examples.append({"prompt": shown, "completion": comp.text, "answer": answers[0], "correct": bool(ok)})
    n = max(1, len(rows))
    out: dict[str, Any] = {"accuracy": round(correct / n, 4), "n": len(rows), "examples": examples}
    for lang, (c, t) in sorted(by_lang.items()):
        out[f"accuracy_{lang}"] = round(c / max(1, t), 4)
    return out
