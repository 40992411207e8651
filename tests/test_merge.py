"""danlu merge: mergekit's YAML schema, each method against an independently written formula, the refusals, and
mergekit's own output where mergekit is installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SAMPLE_TEXT, make_checkpoint

from danlu import DanluError
from danlu.io import load_checkpoint, load_weights, write_weights
from danlu.merge import merge
from danlu.merge.methods import mask_generator

# ───────────────────────── independent formulas (numpy, element by element where it matters) ─────────────────


def np_ties(base, xs, weights, densities, lam=1.0):
    """TIES-merging as the paper describes it: trim each task vector to its top-density magnitudes, elect the sign of
    the summed weighted vectors per entry, average (by weight) the entries that agree with it."""
    base = base.astype(np.float64)
    scaled = []
    for x, w, d in zip(xs, weights, densities):
        delta = x.astype(np.float64) - base
        flat = np.abs(delta).ravel()
        k = max(1, int(d * flat.size))
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
        scaled.append(w * np.where(keep.reshape(delta.shape), delta, 0.0))
    out = base.copy()
    for idx in np.ndindex(base.shape):
        vals = [s[idx] for s in scaled]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = sum(v for v in vals if np.sign(v) == sign)
        den = sum(w for v, w in zip(vals, weights) if np.sign(v) == sign) or 1.0
        out[idx] += lam * num / den
    return out


def np_dare(base, xs, weights, masks, ties: bool):
    """DARE: drop entries of each task vector by its mask, rescale it to its old L1 norm, add (TIES-elected) up."""
    base = base.astype(np.float64)
    scaled = []
    for x, w, m in zip(xs, weights, masks):
        delta = x.astype(np.float64) - base
        kept = delta * m
        scaled.append(w * kept * (np.abs(delta).sum() / np.abs(kept).sum()))
    if not ties:
        return base + sum(scaled)
    stack = np.stack(scaled)
    sign = np.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == sign
    return base + (stack * agree).sum(0)


def np_slerp(t, a, b):
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).reshape(a.shape)


def np_model_stock(base, xs):
    base = base.astype(np.float64).ravel()
    offs = [x.astype(np.float64).ravel() - base for x in xs]
    cos = [offs[i] @ offs[j] / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
           for i in range(len(offs)) for j in range(i + 1, len(offs))]  # fmt: skip
    c, k = float(np.mean(cos)), len(xs)
    t = k * c / (1 + (k - 1) * c)
    return (t * np.mean([x.astype(np.float64).ravel() for x in xs], 0) + (1 - t) * base).reshape(xs[0].shape)


# ───────────────────────── checkpoints: a base and three "fine-tunes" of it ─────────────────────────


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    paths = {n: make_checkpoint(root / n, tiny_tokenizer, depth=2, seed=0) for n in ("base", "a", "b", "c")}
    base = load_weights(paths["base"])
    for i, n in enumerate(("a", "b", "c")):
        g = torch.Generator().manual_seed(10 + i)
        write_weights(paths[n], {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return paths


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_weights(path).items()}


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


NAME = "model.layers.1.mlp.up_proj.weight"


def test_linear_one_zero_is_bit_exact_and_loads_in_transformers(family, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}},
                                                {"model": str(family["b"]), "parameters": {"weight": 0.0}}]}  # fmt: skip
    out = merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out").out
    a, m = load_weights(family["a"]), load_weights(out)
    assert set(a) == set(m) and all(torch.equal(a[k], m[k]) for k in a)
    meta = json.loads((out / "danlu.json").read_text())
    assert meta["stage"] == "merge" and meta["merge"]["method"] == "linear" and meta["chat"] is True
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == cfg
    ck = load_checkpoint(out, quiet=True)
    assert (
        ck.is_chat
        and ck.tokenizer.vocab_size == load_checkpoint(family["a"], quiet=True).tokenizer.vocab_size
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, load_checkpoint(family["a"], quiet=True).model(ids), atol=1e-5)


def test_linear_weighted_average(family, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 3}},
                                                {"model": str(family["b"]), "parameters": {"weight": 1}}]}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out").out)
    a, b = tensors(family["a"]), tensors(family["b"])
    assert np.allclose(out[NAME], 0.75 * a[NAME] + 0.25 * b[NAME], atol=1e-6)


def test_task_arithmetic(family, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "parameters": {"lambda": 0.8},
           "models": [{"model": str(family["a"]), "parameters": {"weight": 0.7}},
                      {"model": str(family["b"]), "parameters": {"weight": 0.4}}]}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out").out)
    s, a, b = (tensors(family[n])[NAME] for n in ("base", "a", "b"))
    assert np.allclose(out[NAME], s + 0.8 * (0.7 * (a - s) + 0.4 * (b - s)), atol=1e-6)


def test_ties(family, tmp_path):
    cfg = {"merge_method": "ties", "base_model": str(family["base"]),
           "models": [{"model": str(family[n]), "parameters": {"weight": w, "density": d}}
                      for n, w, d in (("a", 0.6, 0.5), ("b", 0.5, 0.3), ("c", 0.4, 0.7))]}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out").out)
    t = {n: tensors(family[n]) for n in ("base", "a", "b", "c")}
    name = "model.layers.0.self_attn.q_proj.weight"
    want = np_ties(t["base"][name], [t[n][name] for n in "abc"], [0.6, 0.5, 0.4], [0.5, 0.3, 0.7])
    assert np.allclose(out[name], want, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_seeded_masks(family, tmp_path, method):
    cfg = {"merge_method": method, "base_model": str(family["base"]),
           "models": [{"model": str(family[n]), "parameters": {"weight": w, "density": 0.4}}
                      for n, w in (("a", 0.6), ("b", 0.5))]}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out", seed=7).out)
    t = {n: tensors(family[n]) for n in ("base", "a", "b")}
    shape = t["base"][NAME].shape
    # model order in the config: a (index 0), b (1), then the base appended (2)
    masks = [
        torch.bernoulli(torch.full(shape, 0.4), generator=mask_generator(7, NAME, i)).numpy() for i in (0, 1)
    ]
    assert 0.3 < masks[0].mean() < 0.5 and not np.array_equal(masks[0], masks[1])
    want = np_dare(
        t["base"][NAME], [t["a"][NAME], t["b"][NAME]], [0.6, 0.5], masks, ties=method == "dare_ties"
    )
    assert np.allclose(out[NAME], want, atol=1e-5)
    again = tensors(merge(cfg, tmp_path / "again", seed=7).out)
    other = tensors(merge(cfg, tmp_path / "other", seed=8).out)
    assert np.array_equal(again[NAME], out[NAME]) and not np.allclose(other[NAME], out[NAME])


def test_slerp_with_filtered_gradient(family, tmp_path):
    """mergekit's classic SLERP config: slices form, t per filter as a gradient over the layers."""
    cfg = {"slices": [{"sources": [{"model": str(family["a"]), "layer_range": [0, 2]},
                                   {"model": str(family["b"]), "layer_range": [0, 2]}]}],
           "merge_method": "slerp", "base_model": str(family["a"]),
           "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]}, "dtype": "float32"}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out").out)
    a, b = tensors(family["a"]), tensors(family["b"])
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert np.allclose(out[q0], a[q0], atol=1e-6) and np.allclose(
        out[q1], b[q1], atol=1e-6
    )  # t = 0 and t = 1
    assert np.allclose(out[NAME], np_slerp(0.3, a[NAME], b[NAME]), atol=1e-6)
    emb = "model.embed_tokens.weight"  # outside the layers: position 0 of a gradient, here the plain 0.3
    assert np.allclose(out[emb], np_slerp(0.3, a[emb], b[emb]), atol=1e-6)


def test_model_stock(family, tmp_path):
    cfg = {"merge_method": "model_stock", "base_model": str(family["base"]),
           "models": [{"model": str(family[n])} for n in "abc"]}  # fmt: skip
    out = tensors(merge(cfg, tmp_path / "out").out)
    t = {n: tensors(family[n])[NAME] for n in ("base", "a", "b", "c")}
    assert np.allclose(out[NAME], np_model_stock(t["base"], [t[n] for n in "abc"]), atol=1e-6)


def test_out_dtype_bfloat16(family, tmp_path):
    cfg = {"merge_method": "linear", "out_dtype": "bfloat16",
           "models": [{"model": str(family["a"]), "parameters": {"weight": 1}}]}  # fmt: skip
    out = merge(cfg, tmp_path / "out").out
    w = load_weights(out)
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(w[NAME], load_weights(family["a"])[NAME].bfloat16())


# ───────────────────────── refusals: one clear message each ─────────────────────────


def _models(family, *names, **params):
    return [{"model": str(family[n]), "parameters": dict(params)} for n in names]


def test_refuses_different_tokenizers(family, tmp_path):
    from danlu.tokenizer import Tokenizer

    other_tok = Tokenizer.train([t.upper() + " extra words here" for t in SAMPLE_TEXT], vocab_size=420)
    other = make_checkpoint(tmp_path / "other", other_tok, depth=2)
    cfg = {"merge_method": "linear", "models": _models(family, "a", weight=0.5) + [
        {"model": str(other), "parameters": {"weight": 0.5}}]}  # fmt: skip
    with pytest.raises(DanluError, match=r"different tokenizers: token id \d+ is .* in .* but .* in "):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_different_shapes(family, tmp_path, tiny_tokenizer):
    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer

    cfg_model = ModelConfig(vocab_size=tiny_tokenizer.padded_vocab_size(64), depth=2, max_position_embeddings=128,
                            intermediate_size=128)  # fmt: skip
    wide = tmp_path / "narrow"
    save_model_dir(
        wide, Transformer(cfg_model).state_dict(), cfg_model, tiny_tokenizer, {"stage": "test"}, chat=True
    )
    cfg = {"merge_method": "linear", "models": _models(family, "a", weight=0.5) + [
        {"model": str(wide), "parameters": {"weight": 0.5}}]}  # fmt: skip
    with pytest.raises(
        DanluError, match=r"different shapes: tensor model\.layers\.0\.mlp\.\w+_proj\.weight is"
    ):
        merge(cfg, tmp_path / "out")
    deeper = make_checkpoint(tmp_path / "deep", tiny_tokenizer, depth=3)
    cfg["models"][1]["model"] = str(deeper)
    with pytest.raises(DanluError, match=r"tensor model\.layers\.2\.\S+ is in .*deep but not in"):
        merge(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"merge_method": "ties", "models": "AB"}, r"ties needs a base_model"),
        ({"merge_method": "slerp", "base_model": "base", "models": "AB", "parameters": {"t": 0.5}},
         r"slerp interpolates exactly two models .* got 3"),
        ({"merge_method": "linear", "models": "AB", "parameters": {"weight": 0.4, "normalize": False}},
         r"weights sum to 0\.8 .* make them sum to 1 or set normalize: true"),
        ({"merge_method": "linear", "models": "AB", "parameters": {"weight": 0}}, r"weights sum to 0 for tensor"),
        ({"merge_method": "linear", "models": "AB"}, r"missing parameter weight"),
        ({"merge_method": "linear", "models": "AB", "parameters": {"weight": "heavy"}}, r"weight must be a number"),
        ({"merge_method": "ties", "base_model": "base", "models": "AB", "parameters": {"weight": 1, "density": 1.5}},
         r"density 1\.5 .* must lie in \(0, 1\]"),
        ({"merge_method": "slerp", "base_model": "A", "models": "AB", "parameters": {"t": 2}}, r"t must lie in \[0, 1\]"),
        ({"merge_method": "frankenmerge", "models": "AB"}, r"merge_method 'frankenmerge' is not one of linear"),
        ({"merge_method": "linear", "models": "AB", "tokenizer_source": "union"}, r"union builds a new vocabulary"),
        ({"merge_method": "linear", "models": "AB", "modules": {}}, r"`modules:` is a mergekit feature"),
        ({"merge_method": "linear", "models": "AB", "typo_key": 1}, r"unknown key\(s\) typo_key"),
    ],
)  # fmt: skip
def test_refuses_bad_configs(family, tmp_path, cfg, message):
    names = {"A": "a", "B": "b", "base": "base"}
    cfg = dict(cfg)
    if isinstance(cfg.get("models"), str):
        cfg["models"] = [{"model": str(family[names[c]])} for c in cfg["models"]]
    if "base_model" in cfg:
        cfg["base_model"] = str(family[names[cfg["base_model"]]])
    with pytest.raises(DanluError, match=message):
        merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge(family, tmp_path, capsys):
    from danlu.cli import main

    cfg = {"merge_method": "model_stock", "base_model": str(family["base"]),
           "models": [{"model": str(family[n])} for n in "abc"]}  # fmt: skip
    path = write_yaml(tmp_path / "m.yaml", cfg)
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "model_stock" in capsys.readouterr().out
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


# ───────────────────────── mergekit itself, where it is installed ─────────────────────────


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "model_stock"])
def test_equals_mergekit(family, tmp_path, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    f = {k: str(v) for k, v in family.items()}
    cfgs = {
        "linear": {"models": [{"model": f["a"], "parameters": {"weight": 0.7}}, {"model": f["b"], "parameters": {"weight": 0.2}}]},
        "slerp": {"base_model": f["a"], "models": [{"model": f["a"]}, {"model": f["b"]}],
                  "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}},
        "task_arithmetic": {"base_model": f["base"], "parameters": {"lambda": 0.9},
                            "models": [{"model": f[n], "parameters": {"weight": 0.5}} for n in "ab"]},
        "ties": {"base_model": f["base"], "models": [{"model": f[n], "parameters": {"weight": 0.5, "density": d}}
                                                     for n, d in (("a", 0.4), ("b", 0.6), ("c", 0.8))]},
        "dare_ties": {"base_model": f["base"], "models": [{"model": f[n], "parameters": {"weight": 0.5, "density": 1.0}}
                                                          for n in "ab"]},  # density 1: no random mask to align
        "model_stock": {"base_model": f["base"], "models": [{"model": f[n]} for n in "abc"]},
    }  # fmt: skip
    cfg = {"merge_method": method, "dtype": "float32", **cfgs[method]}
    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(tmp_path / "mk"),
        options=MergeOptions(copy_tokenizer=True),
    )
    ours, theirs = load_weights(merge(cfg, tmp_path / "ours").out), load_weights(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
