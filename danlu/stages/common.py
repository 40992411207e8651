"""What every training stage shares: its engine settings from the recipe, the parent checkpoint, the save hook.

A recipe's top-level `train:` section holds engine settings for all stages, above each stage's built-in defaults;
a stage's own `train:` overrides them; top-level `seed`, `device`, `dtype` and `compile` apply everywhere. So
`danlu run tiny device=cuda` moves every stage (`train_config` writes the rule down once).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from danlu import DanluError
from danlu.config import deep_merge, from_dict
from danlu.engine import TrainConfig, launch_world_size, resolve_batch
from danlu.io import save_model_dir
from danlu.model import IGNORE_INDEX, ModelConfig

GLOBAL_ENGINE_KEYS = ("seed", "device", "dtype", "compile")


def train_config(
    recipe: dict[str, Any],
    stage_train: dict[str, Any] | None,
    where: str,
    defaults: dict[str, Any] | None = None,
) -> TrainConfig:
    """A stage's engine settings (`engine_settings`) with the batch resolved for this launch's world size: the
    result's `batch_size` is per process (`engine.resolve_batch`), so every stage's data source gets it. The batch
    follows the precedence rule too: `global_batch_size` beats a `batch_size` of its own section or below, a stage's
    own `batch_size` beats a recipe-wide `global_batch_size`."""
    cfg = engine_settings(recipe, stage_train, where, defaults)
    stage_train = stage_train or {}
    setting = "train.global_batch_size"
    if "global_batch_size" in stage_train:
        setting = f"{where}.train.global_batch_size"
    elif cfg.global_batch_size and "batch_size" in stage_train:
        cfg.global_batch_size = 0  # the stage's own per-process batch has the last word
    return resolve_batch(cfg, launch_world_size(), setting)


def engine_settings(
    recipe: dict[str, Any],
    stage_train: dict[str, Any] | None,
    where: str,
    defaults: dict[str, Any] | None = None,
) -> TrainConfig:
    """A stage's engine settings, by the one precedence rule every stage follows (highest first):

    1. the stage's own `train:` section (`dpo.train.lr=…`);
    2. the recipe's top-level `train:` section, and its top-level `seed`/`device`/`dtype`/`compile`
       (the top-level key beats `train:`'s: `danlu run tiny device=cuda` moves every stage);
    3. the stage's built-in defaults (`defaults`: DPO's smaller lr, GRPO's one rollout per micro-batch);
    4. the engine's defaults (TrainConfig).

    So `train.lr=…` reaches every stage that does not set its own lr, and a stage section always has the last word.
    `danlu run` reads every stage's settings this way before the first stage runs (runner.check_recipe)."""
    recipe_train = dict(recipe.get("train") or {})
    for key in GLOBAL_ENGINE_KEYS:
        if key in recipe:
            recipe_train[key] = recipe[key]
    merged = deep_merge(deep_merge(defaults or {}, recipe_train), stage_train or {})
    return from_dict(TrainConfig, merged, f"{where}.train")


def make_saver(
    model_cfg: ModelConfig, tokenizer: Any, meta: dict[str, Any], *, chat: bool, adapter: Any = None
) -> Any:
    """The engine's save hook: writes the HF-format model folder with danlu.json describing the stage, or, when an
    adapter trains (`attach_peft`), only the adapter in peft's format: never a copy of the frozen base."""

    def save(state_dict: dict[str, torch.Tensor], folder: Path, step_meta: dict[str, Any]) -> None:
        if adapter is not None:
            adapter.save(folder, state_dict, {**meta, **step_meta, "chat": chat})
            return
        save_model_dir(folder, state_dict, model_cfg, tokenizer, {**meta, **step_meta}, chat=chat)

    return save


def attach_peft(ckpt: Any, section: dict[str, Any] | None, stage: str, parent: str | Path, *,
                chat: bool = True, seed: int = 0) -> Any:  # fmt: skip
    """The stage's `peft:` section applied to its parent checkpoint: a new adapter attached to `ckpt.model` (which
    a soft prompt replaces by its wrapper) with the base frozen, initialized from the stage's `seed` (the same on
    every rank); None when the section asks for none."""
    from danlu.adapters import attach, peft_spec

    spec = peft_spec(section, f"{stage}.peft")
    if not spec.enabled:
        return None
    if chat and not ckpt.tokenizer.has_chat_template:
        raise DanluError(f"{stage}.peft: {parent} has no chat template, and an adapter cannot add the chat tokens "
                         "to its base (that changes the embedding every other adapter of the base relies on); "
                         f"fine-tune it fully first (without {stage}.peft) or start from a base with a template")  # fmt: skip
    return attach(ckpt, spec, parent, f"{stage}.peft", quiet=os.environ.get("RANK", "0") != "0", seed=seed)


def parent_checkpoint(path: str | Path, device: str = "cpu") -> Any:
    """The checkpoint a stage starts from; an adapter folder comes merged into its base (a LoRA-family adapter is
    a weight delta, so training goes on from base + delta as one model)."""
    from danlu.adapters import merge
    from danlu.io import load_checkpoint

    if not Path(path).exists():
        raise DanluError(f"--from {path}: no such checkpoint folder")
    ckpt = load_checkpoint(path, device=device)
    if (ckpt.meta or {}).get("adapter"):
        merge(ckpt)
    return ckpt


def rl_stage_inputs(ctx: Any, cfg: Any, data_name: str, eval_name: str) -> tuple[Path, str, str | None]:
    """Parent checkpoint, training data and held-out data of a reward/DPO/PPO/GRPO stage in a run: the section's
    `model`, `data` and `eval_data` when given, else the run's SFT checkpoint and the world corpus' files."""

    def world_file(name: str) -> str | None:
        path = ctx.run_dir / "world" / name
        return str(path) if ctx.has("world") and path.exists() else None

    data = cfg.data or world_file(data_name)
    if data is None:
        raise DanluError(f"{ctx.name}: no `data:` given and no world corpus in this run")
    parent = Path(cfg.model) if cfg.model else ctx.input("sft")
    return parent, data, cfg.eval_data or world_file(eval_name)


def packs_rows(model: Any) -> bool:
    """Whether `model` (or the one a DDP wrapper holds) takes rows packed several to a row (`segment_ids`), as
    `token_logps(pack=True)` sends them."""
    return bool(getattr(getattr(model, "module", model), "supports_packing", False))


def token_logps(
    model: Any, input_ids: torch.Tensor, targets: torch.Tensor, pack: bool = False
) -> torch.Tensor:
    """log p(target) per position (B, T), 0 where the target is IGNORE_INDEX (the model's own fused CE).

    `pack`: the rows go through the model packed (`RowPacking`), several to a row, and come back in their own
    places, the same numbers: for right-padded rows of very different lengths (RL rollouts, about half of whose
    positions are padding), that halves the forward and backward. Only for a model with `segment_ids`
    (`packs_rows`)."""
    if not pack:
        return -model(input_ids, targets, reduction="none")
    layout = RowPacking(targets)
    ids, tgt = layout.pack(input_ids, 0), layout.pack(targets, IGNORE_INDEX)
    return layout.unpack(-model(ids, tgt, segment_ids=layout.segment_ids, reduction="none"))


class RowPacking:
    """Right-padded rows (B, T) laid out several to a row of T positions, longest first, each into the first row
    with room (first-fit decreasing), each its own segment; `unpack` puts per-position values back where they were.
    A row's length is up to its last scored target: positions after it score nothing and, attention being causal,
    change nothing before it."""

    def __init__(self, targets: torch.Tensor) -> None:
        b, t = targets.shape
        scored = targets != IGNORE_INDEX
        last = torch.where(scored, torch.arange(t, device=targets.device), -1).max(dim=1).values
        lengths = (last + 1).clamp(min=1).tolist()
        fill: list[int] = []  # positions taken in each packed row
        members: list[int] = []  # sequences in each packed row (the next one's segment id)
        src, dst, seg_at = [], [], []
        for i in sorted(range(b), key=lambda i: (-lengths[i], i)):
            n = lengths[i]
            row = next((r for r, used in enumerate(fill) if used + n <= t), len(fill))
            if row == len(fill):
                fill.append(0)
                members.append(0)
            src.append(torch.arange(n) + i * t)
            dst.append(torch.arange(n) + row * t + fill[row])
            seg_at.append(torch.full((n,), members[row]))
            fill[row] += n
            members[row] += 1
        device = targets.device
        self.shape, self.rows = (b, t), len(fill)
        src_at, dst_at = torch.cat(src), torch.cat(dst)  # built on the CPU: no copy back from the device
        # a row's tail (no sequence there) is a segment of its own, never scored
        segments = torch.tensor(members).repeat_interleave(t)
        segments[dst_at] = torch.cat(seg_at)
        self.src, self.dst = src_at.to(device), dst_at.to(device)
        self.segment_ids = segments.view(self.rows, t).to(device)

    def pack(self, x: torch.Tensor, fill: int) -> torch.Tensor:
        """(B, T) → (rows, T), the positions of no row holding `fill`."""
        out = x.new_full((self.rows * self.shape[1],), fill)
        return out.index_copy(0, self.dst, x.reshape(-1).index_select(0, self.src)).view(self.rows, -1)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, T) → (B, T), zero at the positions no row held; differentiable."""
        out = y.new_zeros(self.shape[0] * self.shape[1])
        return out.index_copy(0, self.src, y.reshape(-1).index_select(0, self.dst)).view(self.shape)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return token_logps(model, batch["input_ids"], batch["targets"]).sum(-1)


@torch.no_grad()
def cached_logps(model: Any, batches: Any, autocast: Any, batch_size: int = 16) -> list[float]:
    """Summed completion log-probs of every pair's chosen then rejected, in pair order: [c_0 … c_n, r_0 … r_n]."""
    device = model.lm_head.weight.device
    chosen, rejected = [], []
    model.eval()
    for b in batches.sequential(batch_size):
        with autocast():
            lp = sequence_logps(model, {k: v.to(device) for k, v in b.items()})
        c, r = lp.float().chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    return chosen + rejected


class AdapterOff:
    """The policy with its LoRA-family adapter switched off, as a frozen reference model (peft's
    `disable_adapter()` on the injected layers): calls run the bare base and switch the adapter back on after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def supports_packing(self) -> bool:
        return bool(getattr(self.model, "supports_packing", False))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from danlu.adapters.lora import select_adapter

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        select_adapter(self.model, None)
        try:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        finally:
            select_adapter(self.model, "default")
            for p in trainable:  # peft's enable_adapters resets requires_grad: keep what trained training
                p.requires_grad_(True)

    def to(self, device: Any) -> AdapterOff:
        return self  # the policy's own weights: where the trainer puts them

    def eval(self) -> AdapterOff:
        return self


def base_reference(model: torch.nn.Module, adapter: Any, before: torch.nn.Module | None) -> Any:
    """The reference of an adapter run: the base without the adapter, sharing the policy's frozen weights
    (`before`, a frozen copy taken before attaching, for PiSSA, whose base is not the starting model)."""
    if before is not None:
        for p in before.parameters():
            p.requires_grad_(False)
        return before.eval()
    if adapter.is_lora:
        return AdapterOff(model)
    return model.base.eval()  # a soft prompt's PromptedLM: the base it wraps, frozen


def attach_with_reference(ckpt: Any, section: dict[str, Any] | None, stage: str, parent: str | Path,
                          reference: str | None, seed: int = 0) -> tuple[Any, Any]:  # fmt: skip
    """(adapter, reference) for a stage with a `peft:` section, else (None, the frozen reference as before):
    with an adapter and no `reference:` checkpoint, the reference is the base under the adapter."""
    from danlu.adapters import peft_spec
    from danlu.stages.common import attach_peft

    spec = peft_spec(section, f"{stage}.peft")
    if not spec.enabled:
        return None, load_reference(ckpt, reference)
    before = copy.deepcopy(ckpt.model) if spec.method == "pissa" and reference is None else None
    explicit = load_reference(ckpt, reference) if reference is not None else None
    adapter = attach_peft(ckpt, section, stage, parent, seed=seed)
    return adapter, explicit or base_reference(ckpt.model, adapter, before)


def load_reference(policy_ckpt: Any, reference: str | None) -> Any:
    """The frozen reference: a copy of the policy, or another checkpoint with the very same tokenizer."""
    from danlu.rewards import check_same_tokenizer
    from danlu.stages.common import parent_checkpoint

    if reference is None:
        ref = copy.deepcopy(policy_ckpt.model)
    else:
        other = parent_checkpoint(reference)
        check_same_tokenizer(
            policy_ckpt.tokenizer, other.tokenizer, "reference model", str(policy_ckpt.path), reference
        )
        if other.config.vocab_size != policy_ckpt.config.vocab_size:
            raise DanluError(
                f"reference model {reference}: vocab_size {other.config.vocab_size} differs from the policy's"
            )
        ref = other.model
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def world_eval_folder(eval_data: str | Path | None) -> Path | None:
    """The world's held-out folder when a stage's `eval_data` is one of its files (world/eval/*.jsonl), else None:
    then the stage's held-out figures come from danlu.eval.world, the one evaluator of the run."""
    if eval_data is None:
        return None
    folder = Path(eval_data).parent
    return folder if (folder / "facts_base.jsonl").is_file() else None


def world_figures(
    model: Any, tokenizer: Any, folder: Path, quantities: list[str], checkpoint: Path, *, limit: int | None,
    dtype: Any, compile: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Dev-split figures of `quantities` for the weights in `checkpoint` (stored in its heldout.json, so the eval
    stage reads them instead of computing them again); {} when `limit` is None (held-out scoring off). `compile` is
    the stage's `train.compile` (danlu.compiler.compile_decoding)."""
    from danlu.eval.store import FigureStore
    from danlu.eval.world import evaluate_quantities

    if limit is None:
        return {}
    return evaluate_quantities(model, tokenizer, quantities, data=folder, split="dev", limit=limit, dtype=dtype,
                               store=FigureStore(checkpoint), compile=compile)  # fmt: skip


def before_after_line(stage: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """One console line: each held-out quantity's value before → after, with its row count."""
    parts = [f"{q} {before[q]['value']:.3f} → {after[q]['value']:.3f} (n={after[q]['n']})"
             for q in after if q in before]  # fmt: skip
    return f"[danlu] {stage}: held-out dev " + ", ".join(parts)
