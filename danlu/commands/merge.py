"""Merges models' weights from a mergekit YAML config: `danlu merge CONFIG.yaml --out DIR`.

Methods: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, model_stock, with mergekit's parameters
(weight, density, t, normalize, rescale, lambda, int8_mask, filter_wise; gradients and filters), base_model, dtype,
out_dtype, tokenizer_source. Inputs are danlu checkpoints or Hugging Face folders sharing one tokenizer and shape.

Example config (TIES):
  merge_method: ties
  base_model: runs/tiny/pretrain/model
  models:
    - model: runs/zh/sft/model
      parameters: {weight: 0.5, density: 0.5}
    - model: runs/en/sft/model
      parameters: {weight: 0.5, density: 0.5}
  dtype: float32
"""

from __future__ import annotations

import argparse

HELP = "merge model weights from a mergekit YAML config (linear, slerp, ties, dare, task arithmetic, model stock)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "config", nargs="?", help="mergekit-schema YAML file (its models may be LoRA adapter folders)"
    )
    p.add_argument("--out", required=True, help="output model (or adapter) folder")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("LoRA adapters (peft's add_weighted_adapter), instead of a config")
    g.add_argument("--adapters", help="adapter folders of one base, comma-separated: A,B[,C]")
    g.add_argument("--weights", help="one weight per adapter, comma-separated (default 1 each)")
    g.add_argument(
        "--method",
        default="cat",
        help="peft's combination: cat (exact), svd, linear, ties, ties_svd, "
        "dare_ties, dare_linear, dare_ties_svd, dare_linear_svd, magnitude_prune(_svd) (default cat)",
    )
    g.add_argument("--density", type=float, help="share of entries kept (ties, dare, magnitude_prune)")
    g.add_argument(
        "--svd-rank", type=int, help="rank of the *svd combinations (default: the largest input rank)"
    )
    g.add_argument("--base", help="the adapters' base, when they name copies of it")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from danlu import DanluError
    from danlu.merge import lora as lora_merge
    from danlu.merge import merge

    t0 = time.time()
    if args.adapters:
        if args.config:
            raise DanluError("give either a merge config or --adapters, not both")
        weights = None
        if args.weights:
            try:
                weights = [float(w) for w in args.weights.split(",")]
            except ValueError:
                raise DanluError(
                    f"--weights {args.weights!r}: expected numbers separated by commas"
                ) from None
        ares = lora_merge.merge_adapters([a for a in args.adapters.split(",") if a], args.out, method=args.method,
                                         weights=weights, density=args.density, svd_rank=args.svd_rank,
                                         base=args.base, seed=args.seed, force=args.force)  # fmt: skip
        print(f"{lora_merge.describe(ares)} ({time.time() - t0:.1f}s)")
        return 0
    if not args.config:
        raise DanluError("danlu merge: give a mergekit YAML config, or --adapters A,B for LoRA adapters")
    raw, root = lora_merge.read_yaml(args.config), Path(args.config).resolve().parent
    if lora_merge.is_adapter_config(raw, root):
        ares = lora_merge.merge_adapters_config(raw, args.out, seed=args.seed, force=args.force, where=args.config,
                                                root=root)  # fmt: skip
        print(f"{lora_merge.describe(ares)} ({time.time() - t0:.1f}s)")
        return 0
    res = merge(args.config, args.out, seed=args.seed, force=args.force)
    print(f"[danlu] merge: {res.method} of {', '.join(res.models)} → {res.out} "
          f"({res.tensors} tensors, {res.parameters / 1e6:.1f}M parameters, {time.time() - t0:.1f}s)")  # fmt: skip
    return 0
