"""Supervised fine-tuning: a pretrained model learns to answer, on dialogs rendered by the chat template.

Data: conversations (OpenAI / ShareGPT / Alpaca, danlu.data.formats) → `Tokenizer.render_chat` ids and the
assistant mask → targets that are IGNORE_INDEX except on assistant tokens (each turn's <|im_end|> included), so
the model learns to produce answers, not questions.

Rows: several dialogs are packed into one row of `seq_len` tokens with `segment_ids`, so attention never crosses
from one dialog into another and positions restart per dialog: the same computation as one dialog per row, with
far less padding (dialogs here are ~60 tokens, rows 256). Packing is first-fit over a few open rows, in a seeded
shuffled order that changes each epoch; it is deterministic, and the position is saved for exact resume.

Long dialogs (`long_dialogs`), a dialog longer than a row: `truncate` (default) keeps the system prompt and the
latest exchanges that fit (the oldest turns go; if not even the last exchange fits, the longest prefix ending with
an answer); `split` cuts it into several rows that together train every exchange, each row starting with the system
prompt and up to `split_history` earlier exchanges as untrained context; `skip` drops it; `error` stops with its
file:line. Before training one line says what happened (counts, share of assistant tokens trained on) with a
warning below 90%; the counts and the share are in the stage's metrics.

Forgetting: `replay` is the share of rows taken from the run's pretraining token shards (plain next-token loss);
held-out pretraining bits-per-byte is measured before and after SFT so the cost of fine-tuning is visible.
At the end the world corpus' held-out chat sets (dev split) are scored by the one evaluator, danlu.eval.world, and
kept in the checkpoint's heldout.json, where the eval stage finds them instead of computing them again.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from danlu import DanluError
from danlu.config import from_dict
from danlu.io import update_meta_metrics
from danlu.model import IGNORE_INDEX
from danlu.pipeline import StageContext, heldout_limit

CHAT_EVALS = ("facts_chat", "arithmetic_chat", "translation", "tools")  # world sets scored at the end


@dataclass
class SFTConfig:
    data: list[str] | None = None  # conversation files/folders; default: the world corpus' sft.jsonl
    seq_len: int = 0  # row length; 0 = the parent model's context
    pack: bool = True  # several dialogs per row (segment_ids) instead of one padded dialog per row
    long_dialogs: Literal["truncate", "split", "skip", "error"] = "truncate"
    split_history: int = 2  # split: earlier exchanges each row repeats as (untrained) context
    columns: str | None = (
        None  # field mapping for other datasets: "prompt=question,response=answer" (Columns)
    )
    encoding: str | None = (
        None  # text encoding of the data files; None: detected (UTF-8/16 with BOM, GB18030)
    )
    on_error: Literal["error", "skip"] = "error"  # bad conversations: stop at the first, or skip and count
    val_dialogs: int = 200  # held out from the data for the validation loss
    replay: float = 0.1  # share of rows that are pretraining text (needs the run's token shards)
    epochs: float = 2.0  # sets train.steps when the recipe does not
    eval_limit: int = (
        400  # rows per held-out chat set, dev split (0: none; -1: all; with an eval stage: its limit)
    )
    bpb_rows: int = 64  # held-out pretraining rows for bits-per-byte before/after (0 = off)
    resume: str = "auto"
    samples: list[str] = field(
        default_factory=lambda: ["中国最高的山是什么？", "What is the capital of France?"]
    )
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(
        default_factory=dict
    )  # an adapter instead of all weights (danlu.adapters.PeftSpec)


# ───────────────────────── dialogs → examples ─────────────────────────


@dataclass
class Example:
    """One tokenized dialog: inputs and targets are shifted by one (len(ids) - 1 positions)."""

    input_ids: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def make_example(ids: list[int], mask: list[int]) -> Example:
    return Example(ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])])


def fit_dialog(ids: list[int], mask: list[int], limit: int, im_end: int) -> int:
    """Tokens of the longest prefix of at most `limit` tokens that ends with a complete assistant turn (0: none)."""
    best = 0
    for e in range(min(limit, len(ids)), 0, -1):
        if ids[e - 1] == im_end and mask[e - 1]:
            best = e
            break
    return best


LONG_SHARE_WARNING = 0.9  # warn when less than this share of the assistant tokens is trained on


@dataclass
class EncodeStats:
    """What the long-dialog policy did, for the start-up line, the warning, the metrics and the report."""

    dialogs: int = 0  # dialogs read
    kept: int = 0  # dialogs with at least one example
    truncated: int = 0
    split: int = 0  # dialogs cut into several rows
    split_rows: int = 0  # the rows those dialogs became
    skipped_long: int = 0  # dialogs with nothing that fits
    tokens: int = 0
    assistant_tokens: int = 0  # assistant tokens trained on
    assistant_tokens_total: int = 0  # assistant tokens of the dialogs as written
    examples_where: list[str] = field(default_factory=list)  # a few dialogs the policy changed

    @property
    def kept_share(self) -> float:
        return self.assistant_tokens / max(1, self.assistant_tokens_total)

    def metrics(self) -> dict[str, Any]:
        return {"dialogs": self.kept, "dialogs_read": self.dialogs, "dialogs_truncated": self.truncated,
                "dialogs_split": self.split, "dialogs_split_rows": self.split_rows,
                "dialogs_skipped_too_long": self.skipped_long, "dialog_tokens": self.tokens,
                "assistant_tokens": self.assistant_tokens, "assistant_tokens_total": self.assistant_tokens_total,
                "assistant_tokens_kept_share": round(self.kept_share, 4)}  # fmt: skip

    def summary(self, seq_len: int, policy: str) -> str:
        """One line saying what the policy did; a warning when much of the answers is not trained on."""
        line = (f"{self.dialogs:,} dialogs, seq_len {seq_len}, long dialogs: {policy} — {self.truncated:,} "
                f"truncated, {self.split:,} split into {self.split_rows:,} rows, {self.skipped_long:,} skipped; "
                f"{self.kept_share:.1%} of assistant tokens trained on")  # fmt: skip
        if self.kept_share < LONG_SHARE_WARNING:
            line += (
                f"\n[danlu] sft: WARNING: only {self.kept_share:.0%} of the answers' tokens fit in seq_len {seq_len} "
                f"(e.g. {', '.join(self.examples_where[:3])}); raise sft.seq_len (up to the model's context), or "
                "set sft.long_dialogs=split to train every turn with its recent history"
            )
        return line


def _exchanges(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(system messages, exchanges): each exchange is a user turn and the assistant/tool turns that answer it."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    groups: list[list[dict[str, Any]]] = []
    for m in messages[len(system) :]:
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return system, groups


def _render(tokenizer: Any, conv: Any, context: list[list[dict[str, Any]]], trained: list[list[dict[str, Any]]],
            system: list[dict[str, Any]]) -> tuple[list[int], list[int]]:  # fmt: skip
    """ids and mask of system + context exchanges + trained exchanges, the context's answers masked out (they are
    history the model reads, trained on in the row where they were new)."""
    msgs = system + [m for g in context + trained for m in g]
    ids, mask = tokenizer.render_chat(msgs, tools=conv.tools)
    if context:
        head = tokenizer.render_chat(system + [m for g in context for m in g], tools=conv.tools)[0]
        n = len(head) if ids[: len(head)] == head else 0  # a template that is not prefix-stable: train on all
        mask = [0] * n + list(mask[n:])
    return ids, mask


def _keep_last(tokenizer: Any, conv: Any, limit: int) -> tuple[list[int], list[int]] | None:
    """`truncate`: the system prompt and the latest exchanges that fit (the oldest turns are dropped)."""
    system, groups = _exchanges(conv.messages)
    for start in range(1, len(groups)):
        ids, mask = _render(tokenizer, conv, [], groups[start:], system)
        if len(ids) <= limit:
            return ids, mask
    return None


def _split(tokenizer: Any, conv: Any, limit: int, history: int) -> list[tuple[list[int], list[int]]]:
    """`split`: consecutive rows that together train every exchange that fits alone; each row starts with the system
    prompt and up to `history` earlier exchanges as context (as many as fit in half the row)."""
    system, groups = _exchanges(conv.messages)
    rows: list[tuple[list[int], list[int]]] = []
    i = 0
    while i < len(groups):
        ctx: list[list[dict[str, Any]]] = []
        for h in range(1, history + 1):  # most recent history first, while it fits in half the row
            if i - h < 0:
                break
            cand = groups[i - h : i]
            if len(_render(tokenizer, conv, [], cand, system)[0]) > limit // 2:
                break
            ctx = cand
        best = None
        while best is None:
            j = i + 1
            ids, mask = _render(tokenizer, conv, ctx, groups[i:j], system)
            if len(ids) <= limit:
                best = (ids, mask, j)
                while j < len(groups):
                    ids, mask = _render(tokenizer, conv, ctx, groups[i : j + 1], system)
                    if len(ids) > limit:
                        break
                    j += 1
                    best = (ids, mask, j)
            elif ctx:
                ctx = ctx[1:]  # less history, then try again
            else:
                break
        if best is None:  # this exchange alone does not fit: it is lost
            i += 1
            continue
        rows.append(best[:2])
        i = best[2]
    return rows


def encode_conversations(
    convs: list[Any], tokenizer: Any, seq_len: int, policy: str = "truncate", stats: EncodeStats | None = None,
    history: int = 2,
) -> list[Example]:  # fmt: skip
    """Renders each conversation with the chat template and applies the long-dialog policy (see module doc)."""
    if policy not in ("truncate", "split", "skip", "error"):
        raise DanluError(f"sft.long_dialogs must be truncate, split, skip or error, got {policy!r}")
    stats = stats if stats is not None else EncodeStats()
    out = []
    limit = seq_len + 1  # a row of seq_len positions holds a dialog of seq_len + 1 tokens
    for conv in convs:
        ids, mask = tokenizer.render_chat(conv.messages, tools=conv.tools)
        stats.dialogs += 1
        stats.assistant_tokens_total += sum(mask[1:])
        pieces = [(ids, mask)]
        if len(ids) > limit:
            if policy == "error":
                raise DanluError(
                    f"{conv.where}: the dialog has {len(ids)} tokens, longer than seq_len {seq_len} + 1; "
                    "set sft.long_dialogs to truncate, split or skip, or raise sft.seq_len"
                )
            if len(stats.examples_where) < 5:
                stats.examples_where.append(f"{conv.where} ({len(ids)} tokens)")
            if policy == "split":
                pieces = _split(tokenizer, conv, limit, history)
                if len(pieces) > 1:
                    stats.split += 1
                    stats.split_rows += len(pieces)
            elif policy == "truncate":
                last = _keep_last(tokenizer, conv, limit)
                if last is None:  # not even the last exchange fits: the longest prefix ending with an answer
                    keep = fit_dialog(ids, mask, limit, tokenizer.end_of_turn_id)
                    last = (ids[:keep], mask[:keep]) if keep >= 2 else None
                pieces = [last] if last is not None else []
                stats.truncated += bool(pieces)
            else:
                pieces = []
        kept = False
        for p_ids, p_mask in pieces:
            ex = make_example(p_ids, p_mask)
            n_trained = sum(t != IGNORE_INDEX for t in ex.targets)
            if not n_trained:
                continue
            kept = True
            stats.tokens += len(ex)
            stats.assistant_tokens += n_trained
            out.append(ex)
        stats.kept += kept
        stats.skipped_long += not kept
    return out


# ───────────────────────── packing ─────────────────────────


def pack(
    lengths: list[int], order: np.ndarray | list[int], seq_len: int, open_rows: int = 8
) -> list[list[int]]:
    """Groups examples (by index, in `order`) into rows of at most `seq_len` tokens: first fit among a few open
    rows; when none fits, the fullest open row is closed. Deterministic and close to full (~95%+ here)."""
    rows: list[list[int]] = []
    opened: list[tuple[int, list[int]]] = []  # (used, members)
    for i in order:
        n = lengths[int(i)]
        for k, (used, members) in enumerate(opened):
            if used + n <= seq_len:
                members.append(int(i))
                opened[k] = (used + n, members)
                break
        else:
            if len(opened) >= open_rows:
                k = max(range(len(opened)), key=lambda j: opened[j][0])
                rows.append(opened.pop(k)[1])
            opened.append((n, [int(i)]))
    rows.extend(m for _, m in opened)
    return rows


def collate(
    examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows of packed examples → input_ids, targets and segment_ids (padding is its own segment, never scored)."""
    b = len(rows)
    x = torch.full((b, seq_len), pad_id, dtype=torch.long)
    y = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((b, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for s, i in enumerate(members):
            ex = examples[i]
            n = len(ex)
            x[r, pos : pos + n] = torch.tensor(ex.input_ids)
            y[r, pos : pos + n] = torch.tensor(ex.targets)
            seg[r, pos : pos + n] = s
            pos += n
        seg[r, pos:] = len(members)
    return {"input_ids": x, "targets": y, "segment_ids": seg}


class SFTRows:
    """The SFT data source: packed dialog rows, reshuffled every epoch, with an optional share of pretraining
    rows (`replay`) mixed into every batch. Each distributed rank takes its slice of every global batch."""

    def __init__(
        self, examples: list[Example], seq_len: int, batch_size: int, *, pad_id: int, seed: int = 0,
        packed: bool = True, shuffle: bool = True, replay: Any = None, replay_share: float = 0.0,
        rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        if not examples:
            raise DanluError("no SFT dialogs to train on")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.pad_id, self.seed, self.packed, self.shuffle = pad_id, seed, packed, shuffle
        self.replay, self.replay_share = replay, replay_share if replay is not None else 0.0
        self.rank, self.world_size = rank, world_size
        self.lengths = [len(e) for e in examples]
        if max(self.lengths) > seq_len:
            raise DanluError(f"an SFT example of {max(self.lengths)} tokens exceeds seq_len {seq_len}")
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if not self.packed:
            return [[int(i)] for i in order]
        rows = pack(self.lengths, order, self.seq_len)
        if self.shuffle:  # closing order follows length; shuffle rows so batches mix short and long dialogs
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
            rows = [rows[i] for i in perm]
        return rows

    @property
    def rows_per_epoch(self) -> int:
        return len(self._rows)

    def fill(self) -> float:
        """Share of row positions holding dialog tokens (1.0 = no padding)."""
        return sum(self.lengths) / max(1, len(self._rows) * self.seq_len)

    def _replay_count(self, batch_index: int, global_batch: int) -> int:
        share = self.replay_share
        return math.floor((batch_index + 1) * global_batch * share) - math.floor(
            batch_index * global_batch * share
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        global_batch = self.batch_size * self.world_size
        n_replay = self._replay_count(self.batches, global_batch)
        n_sft = global_batch - n_replay
        self.batches += 1
        picked: list[list[int]] = []
        while len(picked) < n_sft:
            if self.pos >= len(self._rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._rows = self._epoch_rows(self.epoch)
            take = min(n_sft - len(picked), len(self._rows) - self.pos)
            picked += self._rows[self.pos : self.pos + take]
            self.pos += take
        batch = collate(self.examples, picked, self.seq_len, self.pad_id)
        if (
            not self.packed
        ):  # one right-padded dialog per row: causal attention alone keeps it apart (soft prompts
            del batch["segment_ids"]  # take no segments)
        if n_replay:
            rows = [self.replay.next_batch() for _ in range(n_replay)]
            batch["input_ids"] = torch.cat([batch["input_ids"], *(r["input_ids"] for r in rows)])
            batch["targets"] = torch.cat([batch["targets"], *(r["targets"] for r in rows)])
            if "segment_ids" in batch:
                batch["segment_ids"] = torch.cat(
                    [batch["segment_ids"], torch.zeros(n_replay, self.seq_len, dtype=torch.long)]
                )
        lo = self.rank * self.batch_size
        return {k: v[lo : lo + self.batch_size] for k, v in batch.items()}

    def sequential(self, batch_size: int = 16) -> Any:
        for i in range(0, len(self._rows), batch_size):
            batch = collate(self.examples, self._rows[i : i + batch_size], self.seq_len, self.pad_id)
            if not self.packed:
                del batch["segment_ids"]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        from danlu.data.position import batch_state

        state = {"epoch": self.epoch, "pos": self.pos, "batches": self.batches, "seed": self.seed,
                 "examples": len(self.examples), **batch_state(self.batch_size, self.world_size)}  # fmt: skip
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved position. Every rank packs the epoch's rows alike and the position counts rows and
        batches of the one global order (the replay rows too: every rank reads them all), so under the same global
        batch another world size reshards exactly; another global batch is refused (`check_global_batch`)."""
        from danlu.data.position import check_global_batch

        if state.get("examples") != len(self.examples) or state.get("seed") != self.seed:
            raise DanluError(
                f"the checkpoint's data position belongs to other SFT data ({state.get('examples')} dialogs, seed "
                f"{state.get('seed')}; now {len(self.examples)} dialogs, seed {self.seed})"
            )
        check_global_batch(state, self.batch_size, self.world_size, "SFT data", rank=self.rank)
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state["batches"])
        self._rows = self._epoch_rows(self.epoch)
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return model(batch["input_ids"], batch["targets"], segment_ids=batch.get("segment_ids")), {}


@torch.no_grad()
def dialog_loss(model: Any, rows: SFTRows, batch_size: int = 16) -> float:
    """Mean loss per assistant token over the held-out dialogs."""
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for b in rows.sequential(batch_size):
        y = b["targets"].to(device)
        seg = b.get("segment_ids")
        per = model(
            b["input_ids"].to(device),
            y,
            segment_ids=None if seg is None else seg.to(device),
            reduction="none",
        )
        valid = y != IGNORE_INDEX
        total += per.float()[valid].sum().item()
        count += int(valid.sum())
    return total / max(1, count)


# ───────────────────────── held-out evaluations ─────────────────────────


def heldout_evals(
    model: Any, tokenizer: Any, eval_dir: Path, out: Path, *, limit: int, dtype: Any, split: str = "dev",
    compile: str = "auto",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The chat checkpoint's held-out figures from the one evaluator (danlu.eval.world), kept in its store
    (`out/heldout.json`) so that the eval stage reads them instead of computing them again."""
    from danlu.eval.results import without_examples
    from danlu.eval.store import FigureStore
    from danlu.eval.world import evaluate_world

    figures = evaluate_world(model, tokenizer, list(CHAT_EVALS), data=eval_dir, split=split, limit=limit,
                             dtype=dtype, store=FigureStore(out), compile=compile)  # fmt: skip
    for name, f in figures.items():
        print(f"[danlu] sft: held-out {name} ({split}) {f['value']:.3f} (95% CI {f['ci95'][0]:.3f}–"
              f"{f['ci95'][1]:.3f}, n {f['n']})")  # fmt: skip
    return {name: without_examples(f) for name, f in figures.items()}


# ───────────────────────── the stage ─────────────────────────


def _load_dialogs(
    paths: list[Path], cfg: SFTConfig, tokenizer: Any, seq_len: int, say: bool = True
) -> tuple[list[Example], dict[str, Any]]:
    """The dialogs as training examples; `say`: print what was skipped and cut (rank 0 only under torchrun)."""
    from danlu.data.formats import ReadStats, read_conversations

    rstats = ReadStats()
    convs = read_conversations(
        paths, on_error=cfg.on_error, stats=rstats, columns=cfg.columns, encoding=cfg.encoding
    )
    estats = EncodeStats()
    examples = encode_conversations(convs, tokenizer, seq_len, cfg.long_dialogs, estats, cfg.split_history)
    if not examples:
        raise DanluError(
            f"none of the {len(convs)} dialogs fits in seq_len {seq_len} (e.g. {', '.join(estats.examples_where[:3])})"
        )
    if say:
        for reason, msg in rstats.first_skipped.items():
            print(f"[danlu] sft: skipped {rstats.skipped[reason]} conversation(s) ({reason}), e.g. {msg}")
        print(f"[danlu] sft: {estats.summary(seq_len, cfg.long_dialogs)}")
    info = {**rstats.as_metrics("data_"), **estats.metrics(), "examples": len(examples)}
    return examples, info


def no_replay_warning(tokens_dir: Path | None, share: float) -> str:
    """Fine-tuning on dialogs alone moves a pretrained model away from what it knew; mixing a share of its
    pretraining text into every batch (replay) is the usual remedy, so its absence is said, with the fix."""
    why = "no token shards given (--tokens)" if tokens_dir is None else "sft.replay=0"
    return (
        f"[danlu] sft: WARNING: no pretraining replay ({why}): fine-tuning on dialogs alone is likely to make the "
        "model forget pretraining knowledge. Add `--tokens DIR` (shards from `danlu data tokenize` with this "
        "model's tokenizer) and sft.replay=0.1 to mix 10% pretraining rows into every batch"
    )


DEFAULT_MAX_SEQ_LEN = 2048  # rows when sft.seq_len is 0: the model's context, but not an imported model's 32k


def add_chat_template(ckpt: Any) -> None:
    """A base model from elsewhere with no chat template (GPT-2's lone <|endoftext|>) learns ChatML: its tokens are
    added to the tokenizer and the embedding grows, new rows starting as the mean embedding. Says so."""
    added = ckpt.tokenizer.add_chat_tokens()
    if not added:
        return
    rows = ckpt.config.vocab_size
    if ckpt.tokenizer.vocab_size > rows:  # Qwen keeps spare rows; others grow to a multiple of 64
        rows = ckpt.tokenizer.padded_vocab_size(64)
        ckpt.model.resize_token_embeddings(rows)
    print(f"[danlu] sft: {ckpt.path} has no chat template; added ChatML ({added} new tokens, embedding "
          f"{rows} rows)", file=sys.stderr)  # fmt: skip


def sft(
    parent: Path, data: list[Path], out: Path, *, recipe: dict[str, Any], cfg: SFTConfig,
    tokens_dir: Path | None = None, eval_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tunes the checkpoint `parent` on conversation files into the chat checkpoint `out`; returns metrics."""
    from danlu.data.shards import TokenRows, load_index, tokenized_with
    from danlu.engine import Hooks, Trainer, init_distributed, resume_wanted, set_seed
    from danlu.eval.bpb import bits_per_byte, token_bytes
    from danlu.stages.common import attach_peft, make_saver, parent_checkpoint, train_config

    ckpt = parent_checkpoint(parent)
    tcfg = train_config(recipe, cfg.train, "sft")
    adapter = attach_peft(ckpt, cfg.peft, "sft", parent, seed=tcfg.seed)
    if adapter is not None and not getattr(ckpt.model, "supports_packing", True):
        cfg.pack = False  # a soft prompt precedes each dialog: one dialog per row
    model, tokenizer, model_cfg = ckpt.model, ckpt.tokenizer, ckpt.config
    add_chat_template(ckpt)
    if cfg.pack and not getattr(model, "supports_packing", True):
        raise DanluError(f"{parent}: {ckpt.backend} model cannot pack dialogs into rows; set sft.pack=false")
    context = int(model_cfg.max_position_embeddings)
    if (
        adapter is not None and not adapter.is_lora
    ):  # a soft prompt's virtual tokens take positions before the text
        context -= int(adapter.config.num_virtual_tokens)
    seq_len = cfg.seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
    if seq_len > context:
        raise DanluError(f"sft.seq_len {seq_len} exceeds the context of {parent} ({context} tokens)")
    d = init_distributed(tcfg.device)
    set_seed(tcfg.seed)
    examples, info = _load_dialogs(data, cfg, tokenizer, seq_len, say=d.main)
    n_val = min(cfg.val_dialogs, len(examples) // 10)
    perm = np.random.default_rng([tcfg.seed, 7]).permutation(len(examples))
    val_ex = [examples[i] for i in perm[:n_val]]
    train_ex = [examples[i] for i in perm[n_val:]]

    replay = val_tokens = None
    if tokens_dir is not None and (cfg.replay > 0 or cfg.bpb_rows):
        index = load_index(tokens_dir)
        if not tokenized_with(index, parent):
            raise DanluError(f"{tokens_dir} was tokenized with another tokenizer than {parent}'s")
        if cfg.replay > 0:
            replay = TokenRows(tokens_dir, "train", seq_len, 1, seed=tcfg.seed + 1)
        if cfg.bpb_rows and "val" in index["splits"]:
            val_tokens = TokenRows(tokens_dir, "val", seq_len, 1, shuffle=False)
    if not 0.0 <= cfg.replay < 1.0:
        raise DanluError(f"sft.replay must be in [0, 1), got {cfg.replay}")
    if replay is None and d.main:
        print(no_replay_warning(tokens_dir, cfg.replay), file=sys.stderr)
    train_rows = SFTRows(
        train_ex, seq_len, tcfg.batch_size, pad_id=tokenizer.pad_id, seed=tcfg.seed, packed=cfg.pack,
        replay=replay, replay_share=cfg.replay, rank=d.rank, world_size=d.world_size,
    )  # fmt: skip
    val_rows = (
        SFTRows(val_ex, seq_len, 1, pad_id=tokenizer.pad_id, packed=cfg.pack, shuffle=False)
        if val_ex
        else None
    )
    explicit_steps = "steps" in (recipe.get("train") or {}) or "steps" in cfg.train
    if not explicit_steps:
        per_step = tcfg.batch_size * tcfg.grad_accum * d.world_size * (1 - cfg.replay)
        tcfg.steps = max(1, math.ceil(cfg.epochs * train_rows.rows_per_epoch / per_step))
    if "lr" not in (recipe.get("train") or {}) and "lr" not in cfg.train:
        tcfg.lr = 1e-3
    if "warmup_steps" not in (recipe.get("train") or {}) and "warmup_steps" not in cfg.train:
        tcfg.warmup_steps = max(1, tcfg.steps // 20)  # a short warmup: the model is trained already
    tbytes = token_bytes(tokenizer, model_cfg.vocab_size)

    def pretrain_bpb(m: Any) -> dict[str, float]:
        return (
            bits_per_byte(m, val_tokens.sequential(cfg.bpb_rows, batch_size=16), tbytes) if val_tokens else {}
        )

    def evaluate(m: Any) -> dict[str, float]:
        return {"val_loss": dialog_loss(m, val_rows)} if val_rows else {}

    def sample(m: Any) -> list[str]:
        from danlu.generate import Generator, SamplingParams

        prompts = [tokenizer.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
                   for q in cfg.samples]  # fmt: skip
        outs = Generator(m, tokenizer).generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
        return [f"{q} → {c.text}" for q, c in zip(cfg.samples, outs)]

    meta = {
        "stage": "sft",
        "parent": str(parent),
        "data": [str(p) for p in data],
        "model": model_cfg.to_dict(),
    }
    hooks = Hooks(
        save_model=make_saver(model_cfg, tokenizer, meta, chat=True, adapter=adapter),
        evaluate=evaluate,
        sample=sample,
    )
    trainer = Trainer(
        tcfg,
        model,
        train_rows,
        sft_loss,
        out,
        hooks,
        flops_per_token=model_cfg.flops_per_token(seq_len),
        stage="sft",
    )
    result: dict[str, Any] = {**info, "seq_len": seq_len, "packed": cfg.pack, "pack_fill": round(train_rows.fill(), 4),
                              "rows_per_epoch": train_rows.rows_per_epoch, "replay": cfg.replay}  # fmt: skip
    if val_tokens is not None and d.main:
        trainer.raw_model.eval()
        with torch.no_grad(), trainer.autocast():
            result["pretrain_val_bpb_before"] = pretrain_bpb(trainer.raw_model).get("val_bpb")
        trainer.raw_model.train()
    if resume_wanted(out, cfg.resume, tcfg, "sft"):
        trainer.resume()
    if d.main:
        print(
            f"[danlu] sft: {len(train_ex):,} examples ({info['dialogs_truncated']} dialogs truncated, "
            f"{info['dialogs_split']} split, {info['dialogs_skipped_too_long']} too long skipped), {len(val_ex)} "
            f"held out; {tcfg.steps} steps × "
            f"{tcfg.batch_size * tcfg.grad_accum * d.world_size} rows × {seq_len} tokens "
            f"({'packed, fill ' + format(train_rows.fill(), '.0%') if cfg.pack else 'one dialog per row'}, "
            f"replay {cfg.replay:.0%}), lr {tcfg.lr:g}"
        )
    first_eval = next((h for h in trainer.history if h.get("event") == "eval"), None)
    metrics = trainer.fit()
    evals = [h for h in trainer.history if h.get("event") == "eval"]
    result.update(
        {
            "steps": trainer.step,
            "train_loss": metrics.get("loss"),
            "tokens_per_s": metrics.get("tokens_per_s"),
        }
    )
    if evals:
        result["val_loss_start"] = (first_eval or evals[0]).get("val_loss")
        result["val_loss_end"] = evals[-1].get("val_loss")
    if d.main:
        m = trainer.raw_model.eval()
        with torch.no_grad(), trainer.autocast():
            if val_tokens is not None:
                result["pretrain_val_bpb_after"] = pretrain_bpb(m).get("val_bpb")
        update_meta_metrics(out, result)
        if eval_dir is not None and eval_dir.is_dir() and cfg.eval_limit:
            result["heldout"] = heldout_evals(m, tokenizer, eval_dir, out, limit=max(0, cfg.eval_limit),
                                              dtype=trainer.dtype, compile=tcfg.compile)  # fmt: skip
    return result


def read_config(section: dict[str, Any]) -> SFTConfig:
    return from_dict(SFTConfig, section, "sft")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    from danlu.files import expand_inputs

    cfg = read_config(ctx.cfg)
    limit = heldout_limit(ctx.recipe, cfg.eval_limit)  # the eval stage's rows when the run has one
    cfg.eval_limit = 0 if limit is None else (limit or -1)
    if cfg.data:
        data = expand_inputs(cfg.data, suffixes=(".jsonl", ".json", ".parquet", ".csv", ".tsv"))
    else:
        data = [ctx.input("world") / "sft.jsonl"]
    return sft(
        ctx.input("pretrain"), data, ctx.out, recipe=ctx.recipe, cfg=cfg,
        tokens_dir=ctx.input("tokens") if ctx.has("tokens") else None,
        eval_dir=ctx.run_dir / "world" / "eval" if ctx.has("world") else None,
    )  # fmt: skip
