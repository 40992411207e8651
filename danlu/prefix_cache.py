"""Keys and values of prompt prefixes already prefilled, so that a prompt sharing one computes only the rest.

A server's requests share long prefixes: the system prompt with today's date and the built-in tools (~65 of the 84
tokens of a short question to the tiny model), and every turn of a conversation repeats the turns before it.
Prefilling a prompt is most of a joining request's cost (a third of the server's worker time at 16 streaming
clients, BENCHMARKS.md thirteenth session). `PrefixCache` keeps the keys/values of prompts' whole blocks of `block`
tokens, each block keyed by all the tokens up to its end (exact: a dict compares the token tuples), least recently
used first out once the cache holds `budget_bytes`. `Generator._prefill` takes the longest cached run of blocks a
prompt starts with and computes the rest, from that position, against it; what it computed goes in.

Valid only while the model's weights stay as they are: a server's generator keeps one; RL rollouts, whose policy
changes between calls, must not (they share identical prompts within one call instead, see `Generator._prefill`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 16  # tokens per cached block: small enough to catch a short shared prefix, large enough to keep few entries


class PrefixCache:
    """Prompt blocks' keys/values, per layer (kv heads, `block`, head dim), keyed by the prompt's tokens up to the
    block's end; LRU within `budget_bytes`. Not thread-safe: the generator's one thread uses it."""

    def __init__(self, budget_bytes: int = 64 << 20, block: int = BLOCK) -> None:
        self.budget_bytes, self.block = budget_bytes, block
        self._blocks: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self._block_bytes = 0
        self._dtype: torch.dtype | None = None
        self.tokens_asked = self.tokens_reused = 0  # prompt tokens looked up, and found

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def match(self, ids: list[int], dtype: torch.dtype) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The cached blocks `ids` starts with, in order, leaving at least its last token to compute (its logits are
        needed). Blocks cached under another dtype (autocast switched) are dropped."""
        if dtype != self._dtype:
            self.clear()
            self._dtype = dtype
        found = []
        for end in range(self.block, len(ids), self.block):
            key = tuple(ids[:end])
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            found.append(entry)
        self.tokens_asked += len(ids)
        self.tokens_reused += len(found) * self.block
        return found

    def add(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], row: int, start: int) -> None:
        """Caches the whole blocks of `ids` from position `start` (a block boundary: what `match` found) on, read
        from row `row` of a prefill cache (`keys`/`values`: per layer (rows, kv heads, length, head dim))."""
        if self.budget_bytes <= 0:
            return
        for end in range(start + self.block, len(ids) + 1, self.block):
            key = tuple(ids[:end])
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            entry = ([k[row, :, end - self.block : end].clone() for k in keys],
                     [v[row, :, end - self.block : end].clone() for v in values])  # fmt: skip
            self._block_bytes = sum(t.nbytes for t in entry[0] + entry[1])
            self._blocks[key] = entry
        while self._blocks and len(self._blocks) * self._block_bytes > self.budget_bytes:
            self._blocks.popitem(last=False)
