"""What the RL stages share (GRPO, PPO, DPO's judged pairs): sampling rollouts with the policy, scoring them with a
checking function or a reward model, and greedy held-out accuracy. Shared pieces live here so that no stage imports
another stage."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError


def rollout_seed(seed: int) -> int:
    """The sampling seed of a run's first rollout row; row r of the run (counted over its global batches: draw × group
    size + sample) samples with this + r, whatever the world size and whichever rows share its generate call."""
    digest = hashlib.blake2b(f"danlu rollouts {seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # 62 bits: rows and rounds add to it within a 64-bit seed


def rollouts_compiled(compile: str, steps: int, device: str) -> bool:
    """Whether a stage's rollouts decode with compiled steps (`train.compile`: on, off, or auto). Auto: where a
    compiler works and the stage has 20 steps or more: the batch graph compiles once (10–20 s on a 2-core CPU) and
    then takes about half the eager decode time of GRPO's 128 rows in bf16, ~1 s a step at the tiny shape
    (benchmarks/rollout_generate.py, BENCHMARKS.md tenth session); a short run would not earn its compilation back."""
    from danlu.compiler import resolve_compile
    from danlu.engine import resolve_device

    return resolve_compile(compile, resolve_device(device), pays=steps >= 20)


def check_rollout_parallel(stage: str, parallel: str, world_size: int) -> None:
    """Refuses FSDP for a stage that samples rollouts: each rank samples its own prompts with the whole policy for as
    many decode steps as its samples need, while FSDP2 keeps the policy in shards that every rank must gather
    together, step for step."""
    if parallel == "fsdp" and world_size > 1:
        raise DanluError(
            f"{stage}: train.parallel=fsdp on {world_size} processes: {stage} samples rollouts with the whole policy "
            f"on every rank, and FSDP2 keeps it in shards; use train.parallel=ddp for {stage} (each rank holds the "
            "whole model; rewards, DPO, SFT and pretraining take fsdp)"
        )


class Rollouts:
    """The RL data source: samples with the current policy, scores, and returns training tensors."""

    def __init__(
        self, prompts: list[Any], tokenizer: Any, policy: Any, ref: Any | None, reward: Any, *, group_size: int,
        prompts_per_step: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
        step_reward: float = 0.0, credit: str = "answer", rank: int = 0, world_size: int = 1, tools: bool = False,
        tool_rounds: int = 1, compile: bool = False,
    ) -> None:  # fmt: skip
        self.prompts, self.tok, self.policy, self.ref, self.reward = prompts, tokenizer, policy, ref, reward
        self.rank, self.world_size = (
            rank,
            world_size,
        )  # each rank rolls out its own prompts of the global batch
        self.group_size, self.per_step = group_size, prompts_per_step
        self.max_new_tokens, self.temperature, self.top_p, self.seed = (
            max_new_tokens,
            temperature,
            top_p,
            seed,
        )
        if credit not in ("answer", "steps"):
            raise DanluError(f"grpo.credit: {credit!r}; expected answer or steps")
        self.step_reward, self.credit = step_reward, credit
        self.tools, self.tool_rounds = tools, tool_rounds  # execute the completions' tool calls (episodes.py)
        self.position = 0
        self.autocast: Any = None  # set to the trainer's autocast once the trainer exists
        # decode with compiled steps (`rollouts_compiled`), where the policy has them (not a transformers-backed one)
        self.compile = compile and bool(getattr(policy, "supports_compiled_decode", False))
        self._generator: Any = (
            None  # one Generator for the whole stage: its compiled graphs serve every rollout
        )
        self.encoded = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in prompts]

    def _draws(self, position: int) -> list[int]:
        """This rank's draws of rollout `position`: indices into the run's sequence of prompts drawn, global batch
        after global batch. Rank r takes the r-th `prompts_per_step` of the global batch of prompts_per_step ×
        world_size, so N processes roll out N times the prompts of one, and together the draws one process with
        N times the prompts per step makes."""
        start = (position * self.world_size + self.rank) * self.per_step
        return list(range(start, start + self.per_step))

    def _prompt_of(self, draw: int) -> int:
        """The prompt of a draw: a window of the epoch-shuffled order of all prompts."""
        n = len(self.prompts)
        order = list(range(n))
        random.Random(self.seed * 1_000_003 + draw // n).shuffle(order)
        return order[draw % n]

    def _prompt_indices(self, position: int) -> list[int]:
        """This rank's prompts of rollout `position` (see `_draws`)."""
        return [self._prompt_of(k) for k in self._draws(position)]

    @torch.no_grad()
    def sample(self, position: int) -> tuple[list[int], list[Any]]:
        """This rank's episodes of rollout `position` (danlu.stages.episodes): group_size per prompt.

        One batched generate, each row seeded by its index in the run (`rollout_seed`): its samples do not depend on
        the rows beside it, so N processes sample what one process with the same global batch samples."""
        from danlu.generate import Generator, SamplingParams
        from danlu.stages.episodes import run_episodes

        draws = self._draws(position)
        idx = [self._prompt_of(k) for k in draws for _ in range(self.group_size)]
        params = SamplingParams(
            max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=rollout_seed(self.seed) + draws[0] * self.group_size,  # this rank's first row of the run
        )  # fmt: skip
        was_training = self.policy.training
        if self._generator is None:
            self._generator = Generator(self.policy, self.tok, compile=self.compile)
        self.policy.eval()
        with self.autocast():
            episodes = run_episodes(
                self._generator, [self.prompts[i] for i in idx], [self.encoded[i] for i in idx],
                params, tools=self.tools, tool_rounds=self.tool_rounds,
            )  # fmt: skip
        self.policy.train(was_training)
        return idx, episodes

    def score(self, rows: list[Any], episodes: list[Any]) -> list[float]:
        """The checking (or reward-model) score of each final answer; with tools on, `rewards.tool_use_reward`
        decides what the calls earn; step credit only for answers worked without a call."""
        from danlu.rewards import step_credit, tool_use_reward

        scores = self.reward(rows, [e.text for e in episodes])
        if self.tools:
            scores = [tool_use_reward(p.tool, e.calls, e.malformed, s, p.answers)
                      for s, p, e in zip(scores, rows, episodes)]  # fmt: skip
        if self.step_reward:
            scores = [s + (0.0 if e.calls else self.step_reward * step_credit(e.text, p.steps))
                      for s, p, e in zip(scores, rows, episodes)]  # fmt: skip
        return scores

    def next_batch(self) -> dict[str, torch.Tensor]:
        from danlu.data.preference import rows_from_sequences
        from danlu.losses import group_advantages

        idx, episodes = self.sample(self.position)
        self.position += 1
        rows = [self.prompts[i] for i in idx]
        rewards = torch.tensor(self.score(rows, episodes))
        batch = rows_from_sequences([(e.ids, e.mask) for e in episodes], self.tok.pad_id)
        if self.group_size < 2:  # no group to compare with (PPO's rollouts): the caller sets advantages
            batch["advantages"] = torch.zeros_like(rewards)
        elif self.credit == "steps":
            batch["advantages"] = self._step_advantages(idx, episodes, rewards, batch["targets"].size(1))
        else:
            batch["advantages"] = group_advantages(rewards, self.group_size)
        batch["rewards"] = rewards
        batch["completion_tokens"] = torch.tensor([float(e.sampled) for e in episodes])
        batch["tool_calls"] = torch.tensor([float(len(e.calls)) for e in episodes])
        if self.ref is not None:
            from danlu.stages.common import packs_rows, token_logps

            device = self.ref.lm_head.weight.device
            x, y = batch["input_ids"].to(device), batch["targets"].to(device)
            with torch.no_grad(), self.autocast():  # rollouts are half padding: pack them
                batch["ref_logps"] = token_logps(self.ref, x, y, pack=packs_rows(self.ref)).float().cpu()
        return batch

    def _step_advantages(self, idx: list[int], episodes: list[Any], scores: torch.Tensor, length: int) -> Any:
        """Per-token advantages (B, length) aligned with the targets: one reward per expected step of the prompt
        (`rewards.step_marks`) on the token that completes it, and the answer's score on the episode's last trained
        token. Episodes that called a tool get the answer's score only (their steps are not worked by hand)."""
        from danlu.losses import step_advantages
        from danlu.rewards import step_marks

        slots = 1 + max(len(self.prompts[i].steps or []) for i in idx)
        rewards, ends = torch.zeros(len(idx), slots), torch.zeros(len(idx), slots, dtype=torch.long)
        for row, (i, ep, score) in enumerate(zip(idx, episodes, scores.tolist())):
            start = ep.prompt_len - 1  # the target index of the first completion token
            if not ep.calls:
                # Character offset → token: the decoded length after each token (ids decode left to right).
                ids = ep.ids[ep.prompt_len :]
                decoded = [
                    len(self.tok.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))
                ]
                for s, (offset, right) in enumerate(step_marks(ep.text, self.prompts[i].steps or [])):
                    token = next((k for k, end in enumerate(decoded) if end >= offset), len(ids) - 1)
                    rewards[row, s], ends[row, s] = right, start + token
            rewards[row, -1], ends[row, -1] = score, ep.last_target
        return step_advantages(rewards, ends, self.group_size, length)

    def state_dict(self) -> dict[str, Any]:
        from danlu.data.position import batch_state

        return {
            "position": self.position,
            "prompts": len(self.prompts),
            **batch_state(self.per_step, self.world_size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at the saved rollout; on another world size with the same prompts per step over all processes
        it reshards exactly: draws count over the run's global batches and each row samples with the seed of its
        index in the run (`rollout_seed`), whichever rank rolls it out."""
        from danlu.data.position import resumed_position

        self.position = resumed_position(state, "prompts", len(self.prompts), self.world_size, "rollout",
                                         batch=self.per_step, rank=self.rank, setting="prompts_per_step",
                                         per_process=True)  # fmt: skip


@torch.no_grad()
def answer_accuracy(
    model: Any, tokenizer: Any, prompts: list[Any], reward: Any, max_tokens: int, batch_size: int = 64,
    compile: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Greedy answers to held-out prompts, scored by the checking reward: the before/after number of RL. `compile`:
    the stage's `train.compile` (danlu.compiler.compile_decoding)."""
    from danlu.compiler import compile_decoding
    from danlu.generate import Generator, SamplingParams

    gen = Generator(model, tokenizer, compile=compile_decoding(compile, model, len(prompts)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    scores, examples = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in chunk]
        texts = [c.text for c in gen.generate(ids, params)]
        scores += reward(chunk, texts)
        examples += [
            {"prompt": p.messages[-1]["content"], "completion": t, "answer": p.answers[:1]}
            for p, t in zip(chunk, texts)
        ]
    return {"accuracy": round(sum(scores) / max(1, len(scores)), 4), "examples": examples[:4]}


def read_prompts(data: str | Path, kinds: list[str], limit: int | None) -> list[Any]:
    """RL prompts, keeping only the listed `kind`s: the world's rl.jsonl mixes facts the SFT model already
    answers (every sample scores 1, so every advantage is 0 and the rollout teaches nothing) with arithmetic."""
    from danlu.data.preference import parse_rl_prompt, read_rl_prompts, records_with_lines
    from danlu.files import expand_inputs

    if not kinds:
        return read_rl_prompts(data, limit)
    files = expand_inputs([data])
    out = []
    for f in files:
        for where, rec in records_with_lines(f):
            if rec.get("kind") in kinds:
                out.append(parse_rl_prompt(rec, where))
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise DanluError(
            f"{data}: no RL prompts of kind {', '.join(kinds)} (grpo.kinds); check the `kind` field"
        )
    return out


def prompt_kinds(prompts: list[Any]) -> dict[str, int]:
    """How many prompts need each tool (`none` for answers worked without one): the mix RL trains on."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.tool or "none"] = counts.get(p.tool or "none", 0) + 1
    return counts


def make_scorer(spec: str, tokenizer: Any) -> Any:
    return Scorer(spec, tokenizer)


class Scorer:
    """Rewards for (prompt, completion) rows: a checking function by name, or a reward model folder."""

    def __init__(self, spec: str, tokenizer: Any) -> None:
        from danlu.rewards import REWARD_FUNCTIONS, check_same_tokenizer, is_reward_model, load_reward_model

        self.spec, self.model, self.tokenizer = spec, None, tokenizer
        if spec in REWARD_FUNCTIONS:
            return
        if not is_reward_model(spec):
            raise DanluError(
                f"reward {spec!r}: neither a reward function ({', '.join(REWARD_FUNCTIONS)}) nor a reward model folder"
            )
        self.model, rm_tok = load_reward_model(spec)
        check_same_tokenizer(tokenizer, rm_tok, "reward model", "the policy", spec)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, prompts: list[Any], completions: list[str]) -> list[float]:
        from danlu.rewards import RewardModelScorer, compute_rewards, get_reward_fn

        if self.model is not None:
            convs = [[*p.messages, {"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
            scores = RewardModelScorer(self.model, self.tokenizer).score(convs)
            for s, p in zip(scores, prompts):
                if not math.isfinite(s):
                    raise DanluError(
                        f"reward model {self.spec} returned {s} (prompt {p.where}); training stopped"
                    )
            return scores
        names = [p.reward or self.spec for p in prompts]
        fns = [get_reward_fn(n) for n in names]
        return compute_rewards(
            fns, completions, [p.answers for p in prompts], [p.where for p in prompts], names
        )
