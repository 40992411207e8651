"""Sampling with a KV cache: streaming for one prompt, batched for many (evaluation, RL rollouts, the server).

Only the last position's logits are computed after a prompt and caches are preallocated; that is where our speed
over a plain `transformers.generate` loop comes from. Many generations decode together in a `SlotBatch`: a cache
of a fixed number of rows (slots) and a fixed length, each row at its own position, so the batch keeps its shapes
while rows join and leave between steps and one `torch.compile` of the model's `decode_rows` serves every step.
`Generator.generate` (evaluation, RL rollouts) and `danlu serve` (continuous batching, danlu.serve.engine) decode
through it; a `Row` holds one generation's sampling, stop and streaming state, the same for every path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._inductor.config as inductor_config

from danlu import DanluError
from danlu.compiler import is_compiler_error
from danlu.model import Transformer
from danlu.prefix_cache import BLOCK, PrefixCache


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
    ids = logits.argmax(dim=-1) if params.temperature <= 0 else _draw(logits, params, [gen] * logits.size(0))
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _draw(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator | None]) -> torch.Tensor:
    """Token ids (B,) drawn from fp32 logits (B, V) under temperature, top-k and top-p, row b with one uniform number
    from `gens[b]`: inverse-CDF sampling, all rows in one cumulative sum and one search. A row's draw depends on its
    logits and its own generator only, never on the rows beside it; `torch.multinomial` per row, the way before,
    took ~0.1 ms a row at a 4k vocabulary, as long as the model's whole step for 128 rollout rows."""
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
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in gens])
    # the first token whose cumulative probability exceeds u; tokens of probability 0 (cut by top-k/top-p) add an
    # empty interval, so they are never drawn; the clamp only guards against u × total rounding up to the total
    ids = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_(max=cdf.size(-1) - 1)


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


PREFILL_CHUNK = 512  # prompt positions a batch prefill takes at a time: its attention scores are rows × heads × 512²


def cache_length(tokens: int, context: int) -> int:
    """The KV cache a one-row generation of `tokens` positions gets when compiled: the next power of two (at least
    256), at most the context. A compiled decode step is specialized to its cache length (a length-generic graph
    measured ~25% slower per token), so a server meets a handful of lengths, each compiled once."""
    return min(context, max(256, 1 << max(0, tokens - 1).bit_length()))


def slot_count(rows: int, most: int) -> int:
    """The slots a batch of `rows` generations gets: the next power of 4 (1, 4, 16, 64 …), at most `most` (but at
    least `rows`). Few counts mean few re-layouts of the cache as rows join (the batch graph's shapes are dynamic,
    so a count costs no compilation); an idle slot costs some compute, and a batch sheds them when half its slots
    are idle (`SlotBatch.advance`)."""
    slots = 1
    while slots < rows:
        slots *= 4
    return max(rows, min(slots, most))


class Row:
    """One generation in progress: its sampling params and random generator, stop ids and strings, the tokens and
    the text streamed so far. `Generator.stream`, `Generator.generate` and the server's batch all end a text through
    it, so they stop, cut and stream identically. `tag` is the caller's handle (the server's job)."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, tokenizer: Any, context: int, gen: torch.Generator,
        tag: Any = None,
    ) -> None:  # fmt: skip
        self.prompt_ids, self.params, self.gen, self.tag = prompt_ids, params, gen, tag
        self.stop_ids = set(
            params.stop_token_ids if params.stop_token_ids is not None else tokenizer.stop_ids
        )
        self.budget = min(params.max_tokens, context - len(prompt_ids))
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = _StopStrings(params.stop)
        self.text, self.sent = "", 0
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish: str | None = None if self.budget > 0 else "length"  # None while it runs
        self._hit = -1
        self._closed = False

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def needed(self) -> int:
        """Cache positions this generation can fill: its prompt and its token budget."""
        return len(self.prompt_ids) + self.budget

    @property
    def position(self) -> int:
        """Where the last sampled token goes into the cache (the next decode step feeds it)."""
        return len(self.prompt_ids) + len(self.token_ids) - 1

    def push(self, token: int, logprob: float) -> str:
        """Takes the next sampled token; returns the text now safe to show (no partial stop string) and marks the
        row finished on a stop id, a stop string or the end of its budget."""
        if token in self.stop_ids:
            self.finish = "stop"
            return ""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        before = len(self.text)
        self.text += self.decoder.step(token)
        if self.stops.stops:
            self._hit = self.stops.find(self.text, before)
            if self._hit >= 0:
                self.text, self.finish = self.text[: self._hit], "stop"
                return ""
        if len(self.token_ids) >= self.budget:
            self.finish = "length"
        safe = len(self.text) - self.stops.hold if self.stops.stops else len(self.text)
        if safe <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : safe], safe
        return delta

    def cancel(self) -> None:
        """The consumer went away: the row ends now (its Completion says "length", as a cut-off answer)."""
        self.finish = self.finish or "cancelled"

    def close(self) -> tuple[str, Completion]:
        """The text not yet shown (held back for stop strings, or flushed from the decoder), and the Completion."""
        if not self._closed:
            self._closed = True
            if self._hit < 0:
                self.text += self.decoder.flush()
        tail, self.sent = self.text[self.sent :], len(self.text)
        finish = "length" if self.finish in (None, "cancelled") else self.finish
        return tail, Completion(self.text, self.token_ids, finish, len(self.prompt_ids), self.logprobs)


class SlotBatch:
    """Generations decoded together, one token each per `advance`, in one KV cache of `slots` rows × `length`
    positions. Each row sits at its own position; a free slot computes garbage at position 0 that nothing reads.
    Rows join with `admit` (their prompts prefilled together by the batch graph, then copied into free slots) and
    leave when they finish or are `drop`ped, between steps, so the shapes of a step change only when the cache is
    re-laid: when the rows or a row's length outgrow it, or the rows fall to a quarter of the slots (`slot_count`,
    `cache_length`). Not thread-safe: one thread drives it (a server's worker, a `generate` call)."""

    def __init__(self, generator: Generator, most: int = 64) -> None:
        self.generator = generator
        self.most = max(1, most)
        self.rows: list[Row | None] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    @property
    def active(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    def __len__(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def room(self) -> int:
        """How many more rows may join now."""
        return self.most - len(self)

    def _fit(self, joining: list[Row], shrink: int = 4) -> None:
        """Re-lays the cache (live rows packed into the first slots) when the rows outgrow it or fall to
        1/`shrink` of its slots; a no-op otherwise."""
        live = self.active
        count = len(live) + len(joining)
        slots = slot_count(count, self.most)
        needed = max((r.needed for r in live + joining), default=1)
        grow = slots > len(self.rows) or needed > self.length
        if not grow and not (count <= len(self.rows) // shrink and slots < len(self.rows)):
            return
        g = self.generator
        cache = g.model.new_cache(slots, max(cache_length(needed, g.context), needed))
        if live:
            index = torch.tensor([i for i, r in enumerate(self.rows) if r is not None], device=g.device)
            keep = min(self.length, cache.max_len)
            for new, old in zip(cache.k + cache.v, self.keys + self.values):
                new[: len(live), :, :keep] = old.index_select(0, index)[:, :, :keep]
        self.keys, self.values, self.length = cache.k, cache.v, cache.max_len
        self.rows = live + [None] * (slots - len(live))

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> list[tuple[Row, str]]:
        """Prefills the rows' prompts (together, through the batch graph: `Generator._prefill`), samples each row's
        first token and gives each unfinished row a slot. Returns (row, text delta) per row; more rows than `room`
        is a caller's error."""
        rows = [r for r in rows if not r.done]
        if not rows:
            return []
        if len(rows) > self.room:
            raise DanluError(f"SlotBatch: {len(rows)} rows joining, room for {self.room}")
        g = self.generator
        self._fit(rows)
        logits, prefill = g._prefill([r.prompt_ids for r in rows])
        free = [i for i, r in enumerate(self.rows) if r is None]
        out = []
        for i, (row, (token, logprob)) in enumerate(zip(rows, _sample_rows(logits, rows))):
            out.append((row, row.push(token, logprob)))
            if row.done:
                continue
            slot, n = free.pop(0), len(row.prompt_ids)
            self.rows[slot] = row
            for new, old in zip(self.keys + self.values, prefill.k + prefill.v):
                new[slot, :, :n] = old[i, :, :n]
        return out

    @torch.inference_mode()
    def advance(self) -> list[tuple[Row, str]]:
        """One decode step of every row: feeds each row's last token at its position, samples the next. Returns
        (row, text delta) per row; finished rows leave their slots."""
        g = self.generator
        # every slot costs time, and a new shape costs nothing (the batch graph is dynamic)
        self._fit([], shrink=2)
        live = [(i, r) for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return []
        tokens, positions = [0] * len(self.rows), [0] * len(self.rows)
        for i, r in live:
            tokens[i], positions[i] = r.token_ids[-1], r.position
        logits = g._decode_rows(tokens, positions, self.keys, self.values)
        index = [i for i, _ in live]
        rows = [r for _, r in live]
        picked = logits if len(index) == len(self.rows) else logits[torch.tensor(index, device=g.device)]
        out = []
        for (slot, row), (token, logprob) in zip(live, _sample_rows(picked, rows)):
            out.append((row, row.push(token, logprob)))
            if row.done:
                self.rows[slot] = None
        return out

    def drop(self, row: Row) -> None:
        """Frees a row's slot before the next step (a cancelled request)."""
        for i, r in enumerate(self.rows):
            if r is row:
                self.rows[i] = None


def _sample_rows(logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, float]]:
    """(token, log-probability) per row of `logits` (rows × V), each row with its own params and generator: greedy
    rows in one argmax, sampled rows drawn together per sampling setting, each from its own generator, as it would
    be alone."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = logits.argmax(dim=-1)
    settings: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            settings.setdefault((row.params.temperature, row.params.top_k, row.params.top_p), []).append(i)
    for members in settings.values():
        index = torch.tensor(members, device=logits.device)
        drawn = _draw(logits.index_select(0, index), rows[members[0]].params, [rows[i].gen for i in members])
        ids.index_copy_(0, index, drawn)
    lps = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return list(zip(ids.tolist(), lps.tolist()))


class Generator:
    """Drives one model; not thread-safe (a server runs it from one worker thread).

    `compile=True` decodes with `torch.compile` of the model's decode steps: `decode_step` for one row (`stream`,
    and a batch of one), static-shape, one graph per cache length (`cache_length`), ~3× faster per token than eager
    at the tiny shape on a CPU; and `decode_rows` for a `SlotBatch` of several rows (`generate`, the server), one
    graph with dynamic shapes that serves every slot count and cache length (as fast as a graph per shape, measured
    at 4–128 rows, BENCHMARKS.md tenth session) and, at 128 rows in bf16, 3.3× eager (7.9 against 26 ms a step,
    2 CPU cores). Each graph compiles the first
    time a process meets it (10–20 s on a 2-core CPU, seconds when inductor's on-disk cache has it). That pays off
    in a server, a long chat or many batches (RL rollouts), not in a one-off command. If compilation fails (no C++
    compiler, an unsupported op), the generator says so once and decodes eagerly.
    Models without `decode_rows` (transformers-backed, ensembles, soft prompts) decode batches eagerly with a
    shrinking cache (`cache.reorder`).

    `frozen_weights=True` promises that the weights stay as they are while the generator lives (a server): the
    batch graph then takes them as constants (inductor's freezing), which on a CPU packs each weight once for the
    matrix kernels instead of at every product. Small products are where that packing weighed: batched calls of 16
    rows 1.26× (1 thread) to 1.50× (2 threads) faster at the tiny shape, 1.19× at depth 12, for a packed copy of the
    weights in memory (BENCHMARKS.md, twelfth session). A policy trained between calls (RL rollouts) must not set it:
    its graph would go on decoding with the old weights. A `prefix_cache` (danlu.prefix_cache) rests on the same
    promise: prompts that start like an earlier one (a server's system prompt, a conversation's earlier turns)
    prefill only the rest."""

    def __init__(
        self, model: Transformer, tokenizer: Any, compile: bool = False, frozen_weights: bool = False,
        prefix_cache: PrefixCache | None = None,
    ) -> None:  # fmt: skip
        self.model = model.eval()
        self.prefix_cache = prefix_cache
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        self.batches = bool(getattr(model, "supports_compiled_decode", False))  # has `decode_rows`
        self._decode = None
        self._decode_step = None
        self._freeze = frozen_weights and self.device.type == "cpu"  # measured on a CPU only
        if compile and not self.batches:
            print("[danlu] generate: this model has no static-shape decode step (transformers-backed, ensemble "
                  "or soft prompts); decoding without torch.compile", file=sys.stderr)  # fmt: skip
            compile = False
        if compile:  # on a CPU the C++ wrapper drops the Python call per kernel: another ~15% per token
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            rows = model.decode_rows
            if self._freeze:

                def rows(*args: Any) -> torch.Tensor:
                    return model.decode_rows(*args)

                # a code object of this generator's own: dynamo keeps its graphs per code object, so a plain graph
                # compiled earlier would serve this generator, and this frozen one a later model at the same address
                rows.__code__ = rows.__code__.replace(co_name=f"frozen_decode_rows_{id(self)}")
            self._decode = torch.compile(rows, fullgraph=True, dynamic=True, options=options)
            self._decode_step = torch.compile(
                model.decode_step, fullgraph=True, dynamic=False, options=options
            )

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles the one-row decode step for every cache length this model's context allows (`cache_length`),
        the batch step (one graph for all shapes) and the prefill of one and of several prompts, so that no request
        of a server waits for the compiler."""
        lengths = sorted({cache_length(1 << k, self.context) for k in range(self.context.bit_length() + 1)})
        for length in lengths:
            if self._decode_step is None:  # not asked for, or the compiler failed
                return
            cache = self.model.new_cache(1, length)  # position 0 of an empty row: a real step
            self._decode_rows([0], [0], cache.k, cache.v)
        rows, at = 4, 8  # no size of 0 or 1, and none equal to another: dynamo keeps every size symbolic
        cache = self.model.new_cache(rows, lengths[0])
        self._decode_rows([0] * rows, [at] * rows, cache.k, cache.v)
        self._prefill([[0] * 5])  # a request joining alone
        self._prefill([[0] * 6, [0] * 3, [0] * 2])  # several at once, of different lengths
        if self.prefix_cache is not None:  # and after a cached prefix (the cache then longer than the rest)
            self._prefill([[1] * (2 * BLOCK + 3)])
            self._prefill([[1] * (2 * BLOCK + 7)])
            self._prefill([[1] * (2 * BLOCK + 7), [1] * (BLOCK + 5)])
            self.prefix_cache.clear()

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

    def row(
        self, prompt_ids: list[int], params: SamplingParams, seed_offset: int = 0, tag: Any = None
    ) -> Row:
        """A checked generation for `SlotBatch`: its own random generator, seeded `params.seed + seed_offset`."""
        self._check(prompt_ids)
        seed = None if params.seed is None else (params.seed + seed_offset) % 2**64
        return Row(list(prompt_ids), params, self.tokenizer, self.context, self._generator(seed), tag)

    def _logits(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        x = self.model.hidden_states(ids, cache=cache)
        return self._mask_padding(self.model.lm_head(x[:, -1]))

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.size(-1) > self.tokenizer.vocab_size:  # embedding rows padded past the vocabulary
            logits[:, self.tokenizer.vocab_size :] = float("-inf")
        return logits

    def _compiler_failed(self, error: Exception) -> None:
        """A compiler failure costs speed, never the answer: says so once, then every step runs eagerly."""
        if not is_compiler_error(error):
            raise error
        print(f"[danlu] generate: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
              "decoding without it", file=sys.stderr)  # fmt: skip
        self._decode = self._decode_step = None

    def _decode_rows(
        self, tokens: list[int], positions: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> torch.Tensor:
        """Logits (rows, V) of a slot batch's step; compiled where asked for. Attention reads the cache only up to
        the furthest row (the batch graph's shapes are dynamic, so this costs no compilation)."""
        token = torch.tensor(tokens, device=self.device).view(-1, 1)
        pos = torch.tensor(positions, device=self.device)
        if len(tokens) == 1 and self._decode_step is not None:
            try:  # one row: the single-row step `stream` uses (same graphs), 1.3× `decode_rows` with one slot
                return self._mask_padding(self._decode_step(token, pos, keys, values))
            except Exception as error:
                self._compiler_failed(error)
        end = max(positions) + 1
        keys, values = [k.narrow(2, 0, end) for k in keys], [v.narrow(2, 0, end) for v in values]
        return self._rows(token, pos, keys, values)

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any]:
        """Logits (rows, V) after each prompt and the cache holding them, prompt i in row i from position 0
        (left-aligned). Identical prompts (a GRPO group's) are computed once; with a `prefix_cache` (a server), a
        prompt's cached leading blocks are copied in and only the rest is computed."""
        unique: dict[tuple[int, ...], int] = {}
        which = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        logits, cache = self._prefill_unique([list(p) for p in unique])
        if len(unique) < len(prompts):
            index = torch.tensor(which, device=self.device)
            logits = logits.index_select(0, index)
            cache.k = [k.index_select(0, index) for k in cache.k]
            cache.v = [v.index_select(0, index) for v in cache.v]
        return logits, cache

    def _prefill_unique(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any]:
        """`_prefill` of distinct prompts: through the batch graph (`decode_rows` with several tokens a row, compiled
        where asked for), each row from the end of its cached prefix, `PREFILL_CHUNK` positions at a time so that
        attention's scores stay small."""
        dtype = self.model.cache_dtype()
        found = [self.prefix_cache.match(p, dtype) if self.prefix_cache is not None else [] for p in prompts]
        starts = [len(blocks) * BLOCK for blocks in found]
        while True:  # a row's tokens sit at start + 0 … width-1: within the context, else that row starts at 0
            width = max(len(p) - s for p, s in zip(prompts, starts))
            # no chunk one position wide: that is the step's shape, and a prefill of it would compile another graph
            width += 1 if width % PREFILL_CHUNK == 1 else 0
            over = [i for i, s in enumerate(starts) if s and s + width > self.context]
            if not over:
                break
            for i in over:
                starts[i], found[i] = 0, []
        cache = self.model.new_cache(len(prompts), max(s + width for s in starts))
        for i, blocks in enumerate(found):
            for b, (keys, values) in enumerate(blocks):
                for new, old in zip(cache.k + cache.v, keys + values):
                    new[i, :, b * BLOCK : (b + 1) * BLOCK] = old
        rest = [p[s:] for p, s in zip(prompts, starts)]
        ids = torch.tensor([r + [self.tokenizer.pad_id] * (width - len(r)) for r in rest], device=self.device)
        lengths = torch.tensor([len(r) for r in rest], device=self.device)
        begin = torch.tensor(starts, device=self.device)
        logits: torch.Tensor | None = None
        for start in range(0, width, PREFILL_CHUNK):
            chunk = ids[:, start : start + PREFILL_CHUNK]
            ends = lengths - 1 - start  # each prompt's last token within this chunk, if it falls there
            out = self._rows(chunk, begin + start, cache.k, cache.v, last=ends.clamp(0, chunk.size(1) - 1))
            here = (ends >= 0) & (ends < chunk.size(1))
            logits = out if logits is None else torch.where(here.view(-1, 1), out, logits)
        if self.prefix_cache is not None:
            for i, (p, s) in enumerate(zip(prompts, starts)):
                self.prefix_cache.add(p, cache.k, cache.v, i, s)
        assert logits is not None
        return logits, cache

    def _rows(
        self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`decode_rows` through the batch graph where compiled (eagerly otherwise), padded logits masked."""
        if self._decode is not None:
            try:  # a few graphs at most (sizes of 1 are specialized, prefill or step, autocast on or off)
                # freezing is read while dynamo traces (it makes the parameters constants), not from compile options;
                # set off for the others too, so a global TORCHINDUCTOR_FREEZING never freezes a policy in training.
                # Floats (the norms' eps) are constants: traced as dynamic symbols, they made dynamo start over
                # once inductor could not turn them into tensors (~5 of the first graph's ~10 s, BENCHMARKS.md)
                with (
                    torch._dynamo.config.patch(recompile_limit=64, specialize_float=True),
                    inductor_config.patch(freezing=self._freeze),
                ):
                    return self._mask_padding(self._decode(tokens, pos, keys, values, last))
            except Exception as error:
                self._compiler_failed(error)
        return self._mask_padding(self.model.decode_rows(tokens, pos, keys, values, last))

    def _step(self, token: int, cache: Any) -> torch.Tensor:
        """Logits after one more token of a single-row generation; compiled where asked for."""
        ids = torch.tensor([[token]], device=self.device)
        if self._decode_step is not None:
            pos = torch.tensor([cache.pos], device=self.device)
            try:
                logits = self._decode_step(ids, pos, cache.k, cache.v)
            except Exception as error:
                self._compiler_failed(error)
            else:
                cache.pos += 1
                return self._mask_padding(logits)
        return self._logits(ids, cache)

    @torch.inference_mode()
    def stream(
        self, prompt_ids: list[int], params: SamplingParams, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[str | Completion]:
        """Yields text deltas as they are complete, then one final `Completion`."""
        row = self.row(prompt_ids, params)
        cache = self.model.new_cache(
            1, cache_length(row.needed, self.context) if self._decode_step else row.needed
        )
        logits = self._logits(torch.tensor([row.prompt_ids], device=self.device), cache)
        while not row.done:
            if cancelled is not None and cancelled():
                row.cancel()
                break
            tok, lp = sample_next(logits, params, row.gen)
            t = int(tok.item())
            delta = row.push(t, float(lp.item()))
            if delta:
                yield delta
            if not row.done:
                logits = self._step(t, cache)
        tail, completion = row.close()
        if tail:
            yield tail
        yield completion

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Batched sampling, one row per prompt, row i seeded `params.seed + i`. Through a `SlotBatch` (finished
        rows leave their slots, the shapes stay: compiled where asked for), or, for models without `decode_rows`,
        left-padded into one shrinking cache."""
        if not prompts:
            return []
        if not self.batches:
            return self._generate_eagerly(prompts, params)
        rows = [self.row(p, params, seed_offset=i) for i, p in enumerate(prompts)]
        batch = SlotBatch(self, most=len(rows))
        batch.admit(rows)
        while len(batch):
            batch.advance()
        return [r.close()[1] for r in rows]

    def _generate_eagerly(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Left-padded prompts in one cache; finished rows leave it (`cache.reorder`), so every step is smaller."""
        rows = [self.row(p, params, seed_offset=i) for i, p in enumerate(prompts)]
        longest = max(len(p) for p in prompts)
        budget = min(params.max_tokens, self.context - longest)
        for row in rows:  # all rows share the longest prompt's positions
            row.budget = min(row.budget, budget)
        pad = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        ids = torch.tensor(
            [[self.tokenizer.pad_id] * (longest - len(p)) + p for p in prompts], device=self.device
        )
        cache = self.model.new_cache(len(prompts), longest + budget, pad=pad)
        logits = self._logits(ids, cache)
        active = [r for r in rows if not r.done]
        while active:
            toks = []
            for row, (t, lp) in zip(active, _sample_rows(logits, active)):
                row.push(t, lp)
                toks.append(t)
            keep = [k for k, r in enumerate(active) if not r.done]
            if not keep:
                break
            if len(keep) < len(active):
                cache.reorder(torch.tensor(keep, device=self.device))
                active = [active[k] for k in keep]
                toks = [toks[k] for k in keep]
            logits = self._logits(torch.tensor(toks, device=self.device).unsqueeze(1), cache)
        return [r.close()[1] for r in rows]
