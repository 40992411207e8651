"""Distillation on generated continuations: sequence-level KD and on-policy generalized KD (TRL's GKD).

Both cut a prompt from each distillation row (its first `prompt_tokens` tokens) and let a model write `new_tokens`
more; the scored positions of the new row are the generated tokens only (the prompt is context, as in both papers):

- **sequence** (Kim & Rush 2016): the *teacher* writes every continuation and the student learns them by
  cross-entropy. Kim & Rush decode the training set once by beam search; here each batch is decoded when it is drawn
  (as TRL's `seq_kd`), by sampling at `gen_temperature` (0: greedy, the beam of one): one decode per row in one
  epoch as theirs, fresh samples in later ones, no file, and each rank decodes its own rows.
- **on_policy** (Agarwal et al. 2024, TRL's `GKDTrainer`): with probability `lmbda` per batch the *student* samples
  the continuations (no gradient) and the loss is the generalized JSD(β) between teacher and student on the sampled
  tokens; the other batches are the data rows as they are (the off-policy loss on the data, every scored position:
  for plain text there is no prompt to leave out). λ = 0 is therefore exactly `mode: logits` with the same β.

Every continuation is generated to its full length (no stop token: a packed row runs on across document boundaries,
and the student may write a BOS and start a new document just as the data does), so every batch scores the same
number of tokens and the engine weights micro-batches exactly. The coin and the sampling seeds are drawn from the
run's seed and the number of batches served so far (part of the data position in the checkpoint), so a resumed run
draws and samples exactly what the uninterrupted one would. Under torchrun every rank takes the same coin, and each
row samples with the seed of its place in the global batch, so N processes sample what one process with N times the
batch samples; FSDP is refused for on_policy (the student would be sampled from shards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from danlu import DanluError
from danlu.model import IGNORE_INDEX


def continuation_rows(prompts: torch.Tensor, generated: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training row of prompt (B, P) + continuation (B, N): inputs are the first P + N - 1 tokens, targets the next
    token at each position, scored only where that token was generated (N per row)."""
    seq = torch.cat([prompts, generated.to(prompts.dtype)], dim=1)
    targets = seq[:, 1:].clone()
    targets[:, : prompts.size(1) - 1] = IGNORE_INDEX
    return {"input_ids": seq[:, :-1].contiguous(), "targets": targets}


def sampling_seed(seed: int, batch: int) -> int:
    """The sampling seed of the run's global batch `batch`: its row j samples with this + j (62 bits, so rows add
    to it within 64). From the run's seed and the batch count, so a resumed run samples what the uninterrupted one
    did, and rank r of N with B rows each samples its row i as row r·B + i of one process with N·B rows would."""
    return int(np.random.SeedSequence([seed, batch, 1]).generate_state(1, np.uint64)[0]) >> 2


def coin(seed: int, batch: int, share: float) -> bool:
    """True for the share `share` of batches whose continuations the model writes; the same on every rank."""
    return bool(share >= 1 or np.random.default_rng([seed, batch, 0]).random() < share)


class GeneratedRows:
    """A data source: the batches of `rows` (a PackedRows), of which the share `share` is replaced by continuations
    that `model` writes to each row's first `prompt_tokens` tokens (`continuation_rows`).

    `model` is the teacher (sequence KD, share 1) or the student being trained (on-policy KD); the engine's autocast
    (`autocast`, set once the Trainer exists) is used while it samples, and its train/eval mode is restored after."""

    def __init__(
        self, rows: Any, model: torch.nn.Module, tokenizer: Any, *, share: float, prompt_tokens: int,
        new_tokens: int, temperature: float, top_p: float, seed: int, rank: int = 0,
    ) -> None:  # fmt: skip
        self.rows, self.model, self.tok = rows, model, tokenizer
        self.share, self.prompt_tokens, self.new_tokens = share, prompt_tokens, new_tokens
        self.temperature, self.top_p, self.seed, self.rank = temperature, top_p, seed, rank
        self.batches = 0  # batches served: the coin and the seeds are drawn from it
        self.generated = 0  # of them, those whose continuations were generated (for the report)
        self.autocast: Callable[[], Any] = contextlib.nullcontext

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.rows.next_batch()
        n = self.batches
        self.batches += 1
        if not coin(self.seed, n, self.share):
            batch.pop("row", None)
            return batch
        self.generated += 1
        prompts = batch["input_ids"][:, : self.prompt_tokens]
        # this rank's first row of the global batch
        seed = sampling_seed(self.seed, n) + self.rank * len(prompts)
        return continuation_rows(prompts, self.generate(prompts, seed))

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, seed: int) -> torch.Tensor:
        """`new_tokens` tokens after each prompt (B, P), sampled by `model` with no stop token: (B, new_tokens)."""
        from danlu.generate import Generator, SamplingParams

        params = SamplingParams(max_tokens=self.new_tokens, temperature=self.temperature, top_p=self.top_p,
                                seed=seed, stop_token_ids=[])  # fmt: skip
        was_training = self.model.training
        try:
            with self.autocast():
                done = Generator(self.model, self.tok).generate(prompts.tolist(), params)
        finally:
            self.model.train(was_training)
        short = [len(c.token_ids) for c in done if len(c.token_ids) != self.new_tokens]
        if short:
            raise DanluError(f"distill: a continuation has {short[0]} tokens, not compress.distill.new_tokens="
                             f"{self.new_tokens} (the prompt and the continuation must fit the model's context)")  # fmt: skip
        return torch.tensor([c.token_ids for c in done], dtype=prompts.dtype)

    def sequential(self, batch_size: int = 16) -> Any:
        return self.rows.sequential(batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.state_dict(), "batches": self.batches, "generated": self.generated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batches" not in state:
            raise DanluError("distill: the checkpoint's data position has no generated-batch count (it was saved "
                             "by another distillation mode); resume with the mode it was trained with")  # fmt: skip
        self.rows.load_state_dict(state["rows"])
        self.batches, self.generated = int(state["batches"]), int(state.get("generated", 0))


def check_parallel(mode: str, parallel: str, world_size: int) -> None:
    """On-policy KD samples with the whole student on every rank, each for its own rows; FSDP2 keeps the student in
    shards that every rank must gather together, forward for forward."""
    if mode == "on_policy" and parallel == "fsdp" and world_size > 1:
        raise DanluError(
            f"compress.distill.mode=on_policy with train.parallel=fsdp on {world_size} processes: the student "
            "samples its continuations whole on every rank, and FSDP2 keeps it in shards; use train.parallel=ddp "
            "(mode logits takes fsdp and shards the teacher too; sequence takes it with a whole teacher per rank)"
        )
