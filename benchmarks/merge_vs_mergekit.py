"""danlu merge vs mergekit on the same inputs: equality of every output tensor, and time, side by side.

Builds a base checkpoint and three "fine-tunes" of it (base + Gaussian noise) at a given depth, merges them with every
method through mergekit's `run_merge` and through `danlu.merge.merge`, and prints per method: tensors, max |diff|,
bit-exact tensors, seconds each and the ratio. DARE runs with density 1 (no random mask: mergekit draws its masks from
the global RNG in visiting order, danlu from a per-tensor seed, so masked outputs are equal only in distribution).

mergekit must be importable, e.g. installed beside danlu without touching torch:
  pip install --no-deps --target /tmp/mkenv mergekit immutables sentencepiece protobuf
  PYTHONPATH=/tmp/mkenv python benchmarks/merge_vs_mergekit.py --depth 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument(
        "--dtype", default="float32", help="the merge's dtype (mergekit computes TIES/DARE in it)"
    )
    args = ap.parse_args()
    from _common import machine
    from conftest import SAMPLE_TEXT, make_checkpoint
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from danlu.io import load_weights, write_weights
    from danlu.merge import merge
    from danlu.tokenizer import Tokenizer

    root = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    tok = Tokenizer.train(SAMPLE_TEXT, vocab_size=400)
    f = {n: str(make_checkpoint(root / n, tok, depth=args.depth, seed=0)) for n in ("base", "a", "b", "c")}
    base = load_weights(Path(f["base"]))
    for i, n in enumerate("abc"):
        g = torch.Generator().manual_seed(10 + i)
        write_weights(Path(f[n]), {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    w = lambda n, **p: {"model": f[n], "parameters": p}  # noqa: E731
    cfgs = {
        "linear": {"models": [w("a", weight=0.7), w("b", weight=0.3)]},
        "slerp": {"base_model": f["a"], "models": [w("a"), w("b")],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.4}]}},
        "task_arithmetic": {"base_model": f["base"], "models": [w("a", weight=0.6), w("b", weight=0.5)]},
        "ties": {"base_model": f["base"], "models": [w("a", weight=0.6, density=0.5), w("b", weight=0.5, density=0.3),
                                                     w("c", weight=0.4, density=0.7)]},
        "dare_ties": {"base_model": f["base"], "models": [w("a", weight=0.6, density=1.0), w("b", weight=0.5, density=1.0)]},
        "dare_linear": {"base_model": f["base"], "models": [w("a", weight=0.6, density=1.0), w("b", weight=0.5, density=1.0)]},
        "model_stock": {"base_model": f["base"], "models": [w("a"), w("b"), w("c")]},
    }  # fmt: skip
    n_params = sum(v.numel() for v in base.values())
    print(f"machine: {machine()}")
    print(f"configuration: depth {args.depth}, {n_params / 1e6:.1f}M parameters per model, dtype {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"{'method':<16}{'tensors':>8}{'max|diff|':>12}{'bit-exact':>11}{'mergekit s':>12}{'danlu s':>9}{'ratio':>7}"
    )
    for method, extra in cfgs.items():
        cfg = {"merge_method": method, "dtype": args.dtype, **extra}
        t0 = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(cfg), str(root / f"mk-{method}"),
                  options=MergeOptions(copy_tokenizer=True, quiet=True))  # fmt: skip
        t_mk = time.perf_counter() - t0
        t0 = time.perf_counter()
        merge(cfg, root / f"dl-{method}", quiet=True)
        t_dl = time.perf_counter() - t0
        a, b = load_weights(root / f"dl-{method}"), load_weights(root / f"mk-{method}")
        assert set(a) == set(b), set(a) ^ set(b)
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        exact = sum(torch.equal(a[k], b[k]) for k in a)
        print(
            f"{method:<16}{len(a):>8}{diff:>12.3g}{exact:>8}/{len(a):<2}{t_mk:>12.2f}{t_dl:>9.2f}{t_mk / t_dl:>6.1f}×"
        )


if __name__ == "__main__":
    main()
