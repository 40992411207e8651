"""Merging LoRA adapters (danlu.merge.lora, through peft's add_weighted_adapter): the combinations against
independently computed deltas, the result loads in danlu and in peft with the same logits, the CLI and the YAML
form, and each refusal names the difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from danlu import DanluError
from danlu.adapters import PeftSpec, attach
from danlu.io import load_checkpoint, load_state_dict_file
from danlu.merge.lora import merge_adapters
from tests.conftest import make_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

X = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("base") / "base", tiny_tokenizer, depth=2)


def make_adapter(base: Path, out: Path, seed: int, method: str = "lora", r: int = 4) -> Path:
    """A LoRA adapter whose every factor moved (LoRA's B starts at zero: an untrained one proves nothing)."""
    ckpt = load_checkpoint(base, quiet=True)
    adapter = attach(ckpt, PeftSpec(method=method, r=r), base, "test.peft", quiet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ckpt.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapter.save(out, None, {"stage": "test", "chat": True})
    return out


@pytest.fixture(scope="module")
def pair(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return make_adapter(base, d / "a", 1), make_adapter(base, d / "b", 2)


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW = (α/r)·B·A per adapted layer, from the adapter's files alone (the independent formula)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    t = load_state_dict_file(folder / "adapter_model.safetensors")
    return {k.removesuffix(".lora_A.weight"): scale * t[k.replace("lora_A", "lora_B")].double() @ v.double()
            for k, v in t.items() if k.endswith("lora_A.weight")}  # fmt: skip


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(path, quiet=True).model(X)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, adapter).eval()(input_ids=X).logits


def test_cat_is_the_exact_weighted_sum_and_loads_in_danlu_and_peft(base, pair, tmp_path) -> None:
    a, b = pair
    res = merge_adapters([a, b], tmp_path / "m", method="cat", weights=[0.7, 0.3])
    assert res.rank == 8 and sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "danlu.json"]  # fmt: skip
    da, db, dm = deltas(a), deltas(b), deltas(tmp_path / "m")
    assert dm.keys() == da.keys()
    for k in dm:
        torch.testing.assert_close(dm[k], 0.7 * da[k] + 0.3 * db[k], atol=1e-6, rtol=1e-5)
    ours = logits(tmp_path / "m")
    torch.testing.assert_close(peft_logits(base, tmp_path / "m"), ours, atol=1e-4, rtol=0)
    assert (ours - logits(base)).abs().max() > 1e-2  # the merged adapter does something
    meta = json.loads((tmp_path / "m" / "danlu.json").read_text())
    assert meta["merge"]["method"] == "cat" and meta["merge"]["engine"] == "peft.add_weighted_adapter"
    assert load_checkpoint(tmp_path / "m", quiet=True).is_chat
    # svd keeps the same weighted sum when its rank holds both adapters' (4 + 4), and truncates below that
    merge_adapters([a, b], tmp_path / "svd", method="svd", weights=[0.7, 0.3], svd_rank=8)
    ds = deltas(tmp_path / "svd")
    for k in dm:
        torch.testing.assert_close(ds[k], dm[k], atol=1e-5, rtol=1e-4)


def test_linear_with_weights_one_zero_reproduces_the_first_adapter(pair, tmp_path) -> None:
    a, b = pair
    merge_adapters([a, b], tmp_path / "m", method="linear", weights=[1.0, 0.0])
    torch.testing.assert_close(logits(tmp_path / "m"), logits(a), atol=1e-5, rtol=0)


def test_dare_masks_follow_the_seed_and_ties_runs(base, pair, tmp_path) -> None:
    a, b = pair
    for name, seed in (("s0", 0), ("s0again", 0), ("s1", 1)):
        merge_adapters([a, b], tmp_path / name, method="dare_ties", density=0.5, seed=seed)
    t0, t0b, t1 = (
        load_state_dict_file(tmp_path / n / "adapter_model.safetensors") for n in ("s0", "s0again", "s1")
    )
    assert all(torch.equal(t0[k], t0b[k]) for k in t0)
    assert any(not torch.equal(t0[k], t1[k]) for k in t0)
    merge_adapters([a, b], tmp_path / "ties", method="ties", density=0.5)
    torch.testing.assert_close(
        peft_logits(base, tmp_path / "ties"), logits(tmp_path / "ties"), atol=1e-4, rtol=0
    )


def test_cli_flags_and_the_yaml_form_give_the_same_adapter(pair, tmp_path, capsys) -> None:
    from danlu.cli import main

    a, b = pair
    assert main(["merge", "--adapters", f"{a},{b}", "--weights", "0.5,0.5", "--method", "cat",
                 "--out", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert "rank 8" in capsys.readouterr().out
    cfg = tmp_path / "cfg" / "merge.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "cat",
                "models": [
                    {"model": str(a), "parameters": {"weight": 0.5}},
                    {"model": str(b), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    assert main(["merge", str(cfg), "--out", str(tmp_path / "yaml")]) == 0
    x = load_state_dict_file(tmp_path / "cli" / "adapter_model.safetensors")
    y = load_state_dict_file(tmp_path / "yaml" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    bad = tmp_path / "cfg" / "bad.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "models": [str(a), str(b)]}))
    assert main(["merge", str(bad), "--out", str(tmp_path / "bad")]) != 0
    assert "ties needs a density" in capsys.readouterr().err


def test_refusals_name_the_difference(base, pair, tmp_path, tiny_tokenizer) -> None:
    a, b = pair
    r8 = make_adapter(base, tmp_path / "r8", 3, r=8)
    with pytest.raises(DanluError, match=r"linear needs adapters of one rank.*r=4.*r=8"):
        merge_adapters([a, r8], tmp_path / "x", method="linear")
    assert merge_adapters([a, r8], tmp_path / "cat", method="cat").rank == 12  # cat takes any ranks
    other = make_checkpoint(tmp_path / "other", tiny_tokenizer, depth=1)
    on_other = make_adapter(other, tmp_path / "on_other", 4)
    with pytest.raises(DanluError, match=r"different bases.*num_hidden_layers 2 vs 1"):
        merge_adapters([a, on_other], tmp_path / "x", method="cat")
    twin = make_checkpoint(tmp_path / "twin", tiny_tokenizer, depth=2, seed=5)  # same shape, other weights
    on_twin = make_adapter(twin, tmp_path / "on_twin", 4)
    with pytest.raises(DanluError, match=r"different bases.*names base"):
        merge_adapters([a, on_twin], tmp_path / "x", method="cat")
    dora = make_adapter(base, tmp_path / "dora", 5, method="dora")
    with pytest.raises(DanluError, match="DoRA"):
        merge_adapters([a, dora], tmp_path / "x", method="cat")
    with pytest.raises(DanluError, match="density must lie in"):
        merge_adapters([a, b], tmp_path / "x", method="dare_linear", density=1.5)
    with pytest.raises(DanluError, match="2 weight.*3 adapters"):
        merge_adapters([a, b, r8], tmp_path / "x", method="cat", weights=[1, 1])
    with pytest.raises(DanluError, match="not one of peft's"):
        merge_adapters([a, b], tmp_path / "x", method="slerp")
    with pytest.raises(DanluError, match="not an adapter folder"):
        merge_adapters([a, base], tmp_path / "x", method="cat")
    assert not (tmp_path / "x").exists()
