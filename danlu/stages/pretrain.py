"""Pretraining: next-token prediction over packed token shards. The data is `TokenRows`, the loss cross-entropy.

Sizes follow one knob when the recipe leaves them open (nanochat's idea): `model.depth` sets width and heads,
the learning rate scales with 1/sqrt(width), and the step count follows a token budget of `tokens_per_param`
tokens per parameter (Chinchilla's ~20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu import DanluError
from danlu.config import from_dict
from danlu.eval.bpb import bits_per_byte, token_bytes
from danlu.io import update_meta_metrics
from danlu.model import ModelConfig, Transformer
from danlu.pipeline import StageContext, heldout_limit
from danlu.stages.common import world_eval_folder, world_figures


@dataclass
class PretrainConfig:
    seq_len: int = 256
    tokens_per_param: float = 20.0  # sets train.steps when the recipe does not
    resume: str = "auto"  # auto: continue an unfinished run with the same settings; true; false
    samples: list[str] = field(default_factory=lambda: ["中国最高的山是", "The capital of France is"])
    eval_facts: int = 400  # held-out factual prompts scored at the end (0 = off)
    train: dict[str, Any] = field(default_factory=dict)


def build_model_config(recipe_model: dict[str, Any], vocab_size: int, seq_len: int) -> ModelConfig:
    fields = {"max_position_embeddings": max(seq_len, int(recipe_model.get("max_position_embeddings", 0)))}
    cfg = from_dict(ModelConfig, {**recipe_model, **fields, "vocab_size": vocab_size}, "model")
    return cfg


def pretrain(
    shard_dir: Path, tokenizer_dir: Path, out: Path, *, recipe: dict[str, Any], cfg: PretrainConfig,
    facts_path: Path | None = None, parent: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    from danlu.data.shards import TokenRows, load_index, tokenized_with
    from danlu.engine import Hooks, Trainer, init_distributed, resume_wanted, set_seed
    from danlu.stages.common import make_saver, train_config
    from danlu.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    index = load_index(shard_dir)
    if not tokenized_with(index, tokenizer_dir):
        raise DanluError(
            f"{shard_dir} was tokenized with a different tokenizer than {tokenizer_dir}; "
            "re-tokenize the data with this tokenizer (danlu data tokenize)"
        )
    model_cfg = build_model_config(recipe.get("model") or {}, tokenizer.padded_vocab_size(64), cfg.seq_len)
    tcfg = train_config(recipe, cfg.train, "pretrain")
    if "lr" not in (recipe.get("train") or {}) and "lr" not in cfg.train:
        tcfg.lr = round(3e-3 * math.sqrt(256 / model_cfg.hidden_size), 6)
    d = init_distributed(tcfg.device)
    if "steps" not in (recipe.get("train") or {}) and "steps" not in cfg.train:
        budget = cfg.tokens_per_param * model_cfg.num_params()
        tcfg.steps = max(1, int(budget / (tcfg.batch_size * tcfg.grad_accum * d.world_size * cfg.seq_len)))
    set_seed(tcfg.seed)
    model = Transformer(model_cfg)
    train_rows = TokenRows(
        shard_dir, "train", cfg.seq_len, tcfg.batch_size, rank=d.rank, world_size=d.world_size, seed=tcfg.seed
    )
    val_rows = TokenRows(
        shard_dir, "val", cfg.seq_len, 1, rank=d.rank, world_size=d.world_size, shuffle=False
    ) if "val" in index["splits"] else None  # fmt: skip
    tbytes = token_bytes(tokenizer, model_cfg.vocab_size)

    def evaluate(m: Transformer) -> dict[str, float]:
        return (
            bits_per_byte(m, val_rows.sequential(tcfg.eval_rows, batch_size=min(tcfg.batch_size, 16)), tbytes)
            if val_rows
            else {}
        )

    def sample(m: Transformer) -> list[str]:
        from danlu.generate import Generator, SamplingParams

        gen = Generator(m, tokenizer)
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in cfg.samples]
        outs = gen.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
        return [p + c.text for p, c in zip(cfg.samples, outs)]

    meta = {"stage": "pretrain", "parent": parent, "data": str(shard_dir), "model": model_cfg.to_dict()}
    hooks = Hooks(
        save_model=make_saver(model_cfg, tokenizer, meta, chat=False), evaluate=evaluate, sample=sample
    )
    trainer = Trainer(
        tcfg, model, train_rows, lambda m, b: (m(b["input_ids"], b["targets"]), {}), out, hooks,
        flops_per_token=model_cfg.flops_per_token(cfg.seq_len), stage="pretrain",
    )  # fmt: skip
    if resume_wanted(out, cfg.resume, tcfg, "pretrain"):
        trainer.resume()
    if d.main:
        print(
            f"[danlu] pretrain: {model_cfg.num_params() / 1e6:.2f}M parameters (depth {model_cfg.num_hidden_layers}, "
            f"width {model_cfg.hidden_size}), {tcfg.steps} steps × {tcfg.batch_size * tcfg.grad_accum * d.world_size} "
            f"rows × {cfg.seq_len} tokens, lr {tcfg.lr:g}, {trainer.device} {str(trainer.dtype).removeprefix('torch.')}"
        )
    first_eval = next((h for h in trainer.history if h.get("event") == "eval"), None)
    metrics = trainer.fit()
    evals = [h for h in trainer.history if h.get("event") == "eval"]
    result: dict[str, Any] = {
        "params": model_cfg.num_params(),
        "steps": trainer.step,
        "train_loss": metrics.get("loss"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "mfu": metrics.get("mfu"),
    }
    if evals:
        result["val_bpb_start"] = (first_eval or evals[0]).get("val_bpb")
        result["val_bpb_end"] = evals[-1].get("val_bpb")
        result["val_loss_end"] = evals[-1].get("val_loss")
    if d.main:
        update_meta_metrics(out, result)
    world = world_eval_folder(facts_path)
    limit = heldout_limit(recipe, cfg.eval_facts)
    if d.main and world is not None and limit is not None:
        # held-out factual completions by the run's one evaluator, kept in out/heldout.json (summary: evaluation)
        facts = world_figures(trainer.raw_model, tokenizer, world, ["facts_base"], out, limit=limit,
                              dtype=trainer.dtype, compile=tcfg.compile)  # fmt: skip
        result["heldout"] = {"after": facts}
        fig = facts["facts_base"]
        print(f"[danlu] pretrain: held-out dev factual completions {fig['value']:.3f} (n={fig['n']})")
    return result


def read_config(section: dict[str, Any]) -> PretrainConfig:
    return from_dict(PretrainConfig, section, "pretrain")


def run_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = read_config(ctx.cfg)
    facts = ctx.run_dir / "world" / "eval" / "facts_base.jsonl"
    return pretrain(
        ctx.input("tokens"), ctx.input("tokenizer"), ctx.out, recipe=ctx.recipe, cfg=cfg,
        facts_path=facts if ctx.has("world") else None,
    )  # fmt: skip
