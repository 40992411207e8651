"""Sampling with a KV cache: streaming for one prompt, batched for many (evaluation, RL rollouts).

Only the last position's logits are computed after the prompt, the cache is preallocated once per call, and
finished rows leave a batch; that is where our speed over a plain `transformers.generate` loop comes from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from danlu import DanluError
from danlu.compiler import compiler_available, is_compiler_error
from danlu.model import Transformer


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the text
    stop_token_ids: list[int] | None = None  # default: the tokenizer's stop ids (<|endoftext|>, <|im_end|>)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)  # log p of each generated token under the model

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


def sample_next(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) → (token ids (B,), their log-probabilities under the unmodified model distribution)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 0:
        ids = logits.argmax(dim=-1)
    else:
        scaled = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(scaled, min(params.top_k, scaled.size(-1)), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
            probs = torch.softmax(sorted_logits, dim=-1)
            cut = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
        ids = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen).squeeze(-1)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class _StopStrings:
    """Finds stop strings in growing text and says how much text is safe to emit (no partial stop string)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string at or after `start - hold`, or -1."""
        best = -1
        for s in self.stops:
            i = text.find(s, max(0, start - len(s)))
            if i >= 0 and (best < 0 or i < best):
                best = i
        return best


def resolve_compile(mode: str, device: torch.device | str) -> bool:
    """`auto`: compile where it can work (`compiler.compiler_available`)."""
    if mode not in ("auto", "on", "off"):
        raise DanluError(f"compile must be auto, on or off, not {mode!r}")
    return mode == "on" or (mode == "auto" and compiler_available(torch.device(device)))


def cache_length(tokens: int, context: int) -> int:
    """The KV cache a one-row generation of `tokens` positions gets when compiled: the next power of two (at least
    256), at most the context. A compiled decode step is specialized to its cache length (a length-generic graph
    measured ~25% slower per token), so a server meets a handful of lengths, each compiled once."""
    return min(context, max(256, 1 << max(0, tokens - 1).bit_length()))


class Generator:
    """Drives one model; not thread-safe (a server runs it from one worker thread).

    `compile=True` decodes single prompts (`stream`, and `generate` of one prompt) with `torch.compile` of the
    model's static-shape `decode_step`: ~3× faster per token than eager at the tiny shape on a CPU, ~2× at 26–81M
    parameters (BENCHMARKS.md), after a compilation of
    10–20 s per cache length the first time a process meets it. That pays off in a server or a long chat, not in a
    one-off command. If compilation fails (no C++ compiler, an unsupported op), the generator says so once and
    decodes eagerly. Batches (evaluation, RL rollouts) stay eager: rows leave a batch as they finish, so its
    shapes change at every step."""

    def __init__(self, model: Transformer, tokenizer: Any, compile: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        self._decode = None
        if compile and not getattr(model, "supports_compiled_decode", False):
            print("[danlu] generate: this model runs through transformers; decoding without torch.compile",
                  file=sys.stderr)  # fmt: skip
            compile = False
        if compile:  # on a CPU the C++ wrapper drops the Python call per kernel: another ~15% per token
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self._decode = torch.compile(model.decode_step, fullgraph=True, dynamic=False, options=options)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles the decode step for every cache length this model's context allows (`cache_length`), so that no
        request of a server waits for the compiler."""
        for length in sorted(
            {cache_length(1 << k, self.context) for k in range(self.context.bit_length() + 1)}
        ):
            if self._decode is None:  # not asked for, or the compiler failed
                return
            self._step(0, self.model.new_cache(1, length))  # position 0 of an empty cache: a real step

    def _check(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise DanluError("empty prompt")
        if len(prompt_ids) >= self.context:
            raise DanluError(
                f"the prompt has {len(prompt_ids)} tokens, but the model's context is {self.context} tokens "
                "(shorten the prompt or the conversation)"
            )

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return gen

    def _logits(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        x = self.model.hidden_states(ids, cache=cache)
        return self._mask_padding(self.model.lm_head(x[:, -1]))

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.size(-1) > self.tokenizer.vocab_size:  # embedding rows padded past the vocabulary
            logits[:, self.tokenizer.vocab_size :] = float("-inf")
        return logits

    def _step(self, token: int, cache: Any) -> torch.Tensor:
        """Logits after one more token of a single-row generation; compiled where asked for."""
        ids = torch.tensor([[token]], device=self.device)
        if self._decode is None:
            return self._logits(ids, cache)
        pos = torch.tensor([cache.pos], device=self.device)
        try:
            logits = self._decode(ids, pos, cache.k, cache.v)
        except Exception as error:  # a compiler failure costs speed, never the answer
            if not is_compiler_error(error):
                raise
            print(f"[danlu] generate: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                  "decoding without it", file=sys.stderr)  # fmt: skip
            self._decode = None
            return self._logits(ids, cache)
        cache.pos += 1
        return self._mask_padding(logits)

    @torch.inference_mode()
    def stream(
        self, prompt_ids: list[int], params: SamplingParams, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[str | Completion]:
        """Yields text deltas as they are complete, then one final `Completion`."""
        self._check(prompt_ids)
        stop_ids = set(
            params.stop_token_ids if params.stop_token_ids is not None else self.tokenizer.stop_ids
        )
        budget = min(params.max_tokens, self.context - len(prompt_ids))
        gen = self._generator(params.seed)
        needed = len(prompt_ids) + budget
        cache = self.model.new_cache(1, cache_length(needed, self.context) if self._decode else needed)
        logits = self._logits(torch.tensor([prompt_ids], device=self.device), cache)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        stops = _StopStrings(params.stop)
        text, sent, out_ids, logprobs = "", 0, [], []
        finish, hit = "length", -1
        for _ in range(budget):
            if cancelled is not None and cancelled():
                finish = "cancelled"
                break
            tok, lp = sample_next(logits, params, gen)
            t = int(tok.item())
            if t in stop_ids:
                finish = "stop"
                break
            out_ids.append(t)
            logprobs.append(float(lp.item()))
            before = len(text)
            text += decoder.step(t)
            hit = stops.find(text, before) if stops.stops else -1
            if hit >= 0:
                text, finish = text[:hit], "stop"
                break
            safe = len(text) - stops.hold if stops.stops else len(text)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if len(out_ids) < budget:
                logits = self._step(t, cache)
        if hit < 0:
            text += decoder.flush()
        if len(text) > sent:
            yield text[sent:]
        yield Completion(
            text, out_ids, "length" if finish == "cancelled" else finish, len(prompt_ids), logprobs
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Batched sampling: prompts are left-padded into one KV cache; finished rows leave the batch."""
        if not prompts:
            return []
        if len(prompts) == 1 and self._decode is not None:
            return [next(c for c in self.stream(prompts[0], params) if isinstance(c, Completion))]
        for p in prompts:
            self._check(p)
        stop_ids = set(
            params.stop_token_ids if params.stop_token_ids is not None else self.tokenizer.stop_ids
        )
        longest = max(len(p) for p in prompts)
        budget = min(params.max_tokens, self.context - longest)
        pad_id = self.tokenizer.pad_id
        pad = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=self.device)
        gen = self._generator(params.seed)
        cache = self.model.new_cache(len(prompts), longest + budget, pad=pad)
        logits = self._logits(ids, cache)
        active = list(range(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        stops = _StopStrings(params.stop)
        for step in range(budget):
            toks, lp = sample_next(logits, params, gen)
            keep = []
            for row, (t, logprob) in enumerate(zip(toks.tolist(), lp.tolist())):
                i = active[row]
                if t in stop_ids:
                    finish[i] = "stop"
                    continue
                out[i].append(t)
                lps[i].append(logprob)
                if stops.stops and stops.find(self.tokenizer.decode(out[i][-32:]), 0) >= 0:
                    finish[i] = "stop"
                    continue
                keep.append(row)
            if not keep or step == budget - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.reorder(index)
                toks = toks[index]
                active = [active[r] for r in keep]
            logits = self._logits(toks.unsqueeze(1), cache)
        results = []
        for i, p in enumerate(prompts):
            text = self.tokenizer.decode(out[i], skip_special_tokens=True)
            if stops.stops:
                cut = stops.find(text, 0)
                if cut >= 0:
                    text = text[:cut]
            results.append(Completion(text, out[i], finish[i], len(p), lps[i]))
        return results
