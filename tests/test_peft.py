"""Parameter-efficient tuning: adapters danlu trains are peft's files (peft loads them and gives danlu's logits),
peft's files load in danlu, merging equals the adapter forward, resume is exact, bad input gets one clear error,
and one server serves several adapters on one base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.adapters import PeftSpec, attach, load_adapter_checkpoint, merge
from danlu.io import load_checkpoint
from tests.conftest import make_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

X = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A 2-layer native chat model (Llama names, GQA)."""
    return make_checkpoint(tmp_path_factory.mktemp("base") / "base", tiny_tokenizer, depth=2)


def _train_a_little(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Stands in for training: every trainable tensor moves (LoRA's B starts at zero, so an untrained adapter
    would be the identity and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _adapter(base: Path, out: Path, method: str, seed: int = 1, scale: float = 0.05, **kw) -> torch.Tensor:
    """Attaches `method` to the base, moves it, saves the adapter folder; returns danlu's logits of X."""
    ckpt = load_checkpoint(base)
    adapter = attach(ckpt, PeftSpec(method=method, **kw), base, "test.peft", quiet=True)
    _train_a_little(ckpt.model, seed, scale)
    adapter.save(out, None, {"stage": "test"})
    with torch.no_grad():
        return ckpt.model.eval()(X)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "rslora"])
def test_peft_loads_danlus_lora_family_adapters_with_the_same_logits(
    base: Path, tmp_path: Path, method: str
) -> None:
    ours = _adapter(base, tmp_path / "ad", method, r=4)
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "danlu.json",
    ]  # never a copy of the base
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base.resolve())
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == (method == "rslora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=X).logits, ours, atol=1e-4, rtol=0)
        assert (ours - load_checkpoint(base).model(X)).abs().max() > 1e-2  # the adapter does something
    again = load_checkpoint(tmp_path / "ad")  # danlu reads it back as base + adapter
    assert again.meta["adapter"]["method"] == method and again.is_chat
    with torch.no_grad():
        torch.testing.assert_close(again.model(X), ours, atol=1e-5, rtol=0)


def test_lora_on_the_transformers_backed_model(tmp_path: Path) -> None:
    """GPT-2 (Conv1D layers, transformers path): peft's keys come out, and peft on GPT-2 agrees."""
    from tests.test_open_weights import gpt2_folder

    folder = gpt2_folder(tmp_path / "gpt2")
    ours = _adapter(folder, tmp_path / "ad", "lora", r=4)
    keys = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert set(keys) == {"c_attn", "c_proj", "c_fc"}
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "ad"
    )
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=X).logits, ours, atol=1e-4, rtol=0)


def test_danlu_loads_an_adapter_peft_wrote(base: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    pm = peft.get_peft_model(hf, cfg)
    _train_a_little(pm)
    pm.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = pm.eval()(input_ids=X).logits
        got = load_checkpoint(tmp_path / "theirs").model(X)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_the_adapter_forward(base: Path, tmp_path: Path, method: str, capsys) -> None:
    from danlu.cli import main

    ours = _adapter(base, tmp_path / "ad", method, r=4)
    merged = merge(load_checkpoint(tmp_path / "ad"))
    assert not any("lora" in k for k in merged.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.model(X), ours, atol=1e-5, rtol=0)
    assert (
        main(["export", str(tmp_path / "ad"), "--merge", "--format", "hf", "--out", str(tmp_path / "hf")])
        == 0
    )
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(X).logits
    torch.testing.assert_close(exported, ours, atol=1e-5, rtol=0)
    assert main(["export", str(tmp_path / "ad"), "--format", "hf", "--out", str(tmp_path / "hf2")]) != 0
    assert "an adapter folder (peft's format); add --merge" in capsys.readouterr().err


class _Rows:
    """A deterministic data source: batch k is a seeded random draw, the position is k."""

    def __init__(self) -> None:
        self.k = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.k)
        self.k += 1
        ids = torch.randint(0, 300, (2, 17), generator=g)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        return {"k": self.k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.k = state["k"]


def _adapter_trainer(base: Path, out: Path, spec: PeftSpec, **kw):
    from danlu.engine import Hooks, TrainConfig, Trainer
    from danlu.stages.common import make_saver

    torch.manual_seed(0)
    ckpt = load_checkpoint(base)
    adapter = attach(ckpt, spec, base, "test.peft", quiet=True)
    cfg = TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, dtype="fp32", device="cpu", log_every=1,
                      eval_every=0, progress=False, compile="off", **kw)  # fmt: skip
    saver = make_saver(ckpt.config, ckpt.tokenizer, {"stage": "test"}, chat=True, adapter=adapter)
    return Trainer(cfg, ckpt.model, _Rows(), lambda m, b: (m(b["input_ids"], b["targets"]), {}), out,
                   Hooks(save_model=saver), stage="sft")  # fmt: skip


def test_adapter_resume_continues_bit_for_bit(base: Path, tmp_path: Path) -> None:
    # PiSSA: the saved file is the converted rank-2r LoRA, so resume must recover the factors and redo the same
    # initialization; dropout: the RNG must be restored too
    spec = PeftSpec(method="pissa", r=4, dropout=0.1)
    straight = _adapter_trainer(base, tmp_path / "a", spec)
    straight.fit()
    only = {n for n, p in straight.raw_model.named_parameters() if p.requires_grad}
    assert only and all("lora_" in n for n in only)  # only adapter parameters train
    interrupted = _adapter_trainer(base, tmp_path / "b", spec, save_every=3)
    real_loss = interrupted.loss_fn

    def crash_at_step_4(m, b):
        if interrupted.step == 4:
            raise KeyboardInterrupt
        return real_loss(m, b)

    interrupted.loss_fn = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = _adapter_trainer(base, tmp_path / "b", spec, save_every=3)
    resumed.resume()
    assert resumed.step == 3
    resumed.fit()
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sft_command_trains_only_an_adapter(base: Path, tmp_path: Path) -> None:
    from danlu.cli import main

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(8) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "sft"
    code = main(["sft", "--from", str(base), "--data", str(data), "--out", str(out), "--peft", "lora",
                 "sft.peft.r=4", "sft.peft.target_modules=[q_proj,v_proj]", "sft.train.steps=2",
                 "sft.train.batch_size=2", "sft.eval_limit=0", "sft.bpb_rows=0", "sft.seq_len=64",
                 "sft.train.compile='off'", "sft.train.progress=false"])  # fmt: skip
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    meta = json.loads((out / "danlu.json").read_text())
    assert (
        meta["stage"] == "sft"
        and meta["peft"]["method"] == "lora"
        and meta["base"]["shape"]["hidden_size"] == 128
    )
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"],
                                                                                      ["v_proj", "q_proj"])  # fmt: skip
    assert load_checkpoint(out).is_chat


# ───────────────────────── bad input: one clear message each ─────────────────────────


def test_target_modules_that_match_nothing_list_the_linear_layers(base: Path) -> None:
    ckpt = load_checkpoint(base)
    with pytest.raises(
        DanluError, match=r"sft\.peft\.target_modules: 'qproj'.*q_proj, k_proj, v_proj, o_proj"
    ):
        attach(ckpt, PeftSpec(method="lora", target_modules=["qproj"]), base, "sft.peft")


def test_rank_must_be_positive() -> None:
    from danlu.adapters import peft_spec

    with pytest.raises(DanluError, match=r"sft\.peft\.r: .*positive.*got 0"):
        peft_spec({"method": "lora", "r": 0}, "sft.peft")
    with pytest.raises(DanluError, match=r"sft\.peft\.method"):
        peft_spec({"method": "lorax"}, "sft.peft")


def test_adapter_for_another_base_or_tokenizer_is_refused(base: Path, tmp_path: Path, tiny_tokenizer) -> None:
    from danlu.tokenizer import Tokenizer
    from tests.conftest import SAMPLE_TEXT

    _adapter(base, tmp_path / "ad", "lora", r=4)
    wider = make_checkpoint(tmp_path / "wider", tiny_tokenizer, depth=3)
    with pytest.raises(DanluError, match=r"adapter for another base.*hidden_size 128 vs 192"):
        load_adapter_checkpoint(tmp_path / "ad", base=wider)
    other_tok = Tokenizer.train(list(reversed(SAMPLE_TEXT)), vocab_size=410)
    same_shape = make_checkpoint(tmp_path / "other-tok", other_tok, depth=2)
    with pytest.raises(DanluError, match="another tokenizer"):
        load_adapter_checkpoint(tmp_path / "ad", base=same_shape)


# ───────────────────────── serving several adapters on one base ─────────────────────────


def test_two_adapters_served_on_one_base_answer_differently(
    base: Path, tmp_path: Path, tiny_tokenizer
) -> None:
    import httpx

    from danlu.serve.adapters import load_base_with_adapters
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.server import BackgroundServer

    _adapter(
        base, tmp_path / "a", "lora", seed=1, scale=0.5, r=4
    )  # moved far enough to change greedy answers
    _adapter(base, tmp_path / "b", "dora", seed=2, scale=0.5, r=4)
    models = load_base_with_adapters(
        "base", str(base), [("alpha", str(tmp_path / "a")), ("beta", str(tmp_path / "b"))]
    )
    assert len({id(m.worker._worker) for m in models}) == 1  # one worker, one copy of the base
    app = create_app(models, ServeOptions(date_prompt=False, builtin_tools=False))
    body = {
        "messages": [{"role": "user", "content": "中国最高的山是什么?"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    try:
        with BackgroundServer(app) as url:
            cards = {c["id"]: c for c in httpx.get(url + "/v1/models").json()["data"]}
            assert (
                cards["alpha"]["parent"] == cards["beta"]["parent"] == "base"
                and cards["base"]["parent"] is None
            )
            answers = {}
            for name in (
                "base",
                "alpha",
                "beta",
                "alpha",
            ):  # alpha again: switching back gives alpha's answer
                r = httpx.post(url + "/v1/chat/completions", json={**body, "model": name}, timeout=60).json()
                assert r["model"] == name
                answers.setdefault(name, set()).add(r["choices"][0]["message"]["content"])
            # one bound for the base and its adapters: room taken through one name is gone for the others
            shared = models[0].worker._worker
            held = models[1].worker.reserve(shared.max_active + shared.max_queued)
            assert held is not None
            r = httpx.post(url + "/v1/chat/completions", json={**body, "model": "beta"}, timeout=60)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            held.release()
            r = httpx.post(url + "/v1/chat/completions", json={**body, "model": "beta"}, timeout=60)
            assert r.status_code == 200
    finally:
        models[0].worker.close()
    assert all(len(v) == 1 for v in answers.values())
    assert len({next(iter(v)) for v in answers.values()}) == 3  # each answers differently


def test_serving_an_adapter_for_another_base_is_refused_at_start_up(base: Path, tmp_path: Path,
                                                                    tiny_tokenizer) -> None:  # fmt: skip
    from danlu.serve.adapters import load_base_with_adapters

    _adapter(base, tmp_path / "a", "lora", r=4)
    other = make_checkpoint(tmp_path / "other", tiny_tokenizer, depth=1)
    with pytest.raises(DanluError, match=r"adapter for another base.*num_hidden_layers 2 vs 1"):
        load_base_with_adapters("other", str(other), [("alpha", str(tmp_path / "a"))])


# ───────────────────────── soft prompts (peft's P-tuning, prompt tuning, prefix tuning) ─────────────────────────


@pytest.mark.parametrize("kw", [{"method": "ptuning", "encoder": "mlp"}, {"method": "ptuning", "encoder": "lstm"},
                                {"method": "prompt"}, {"method": "prefix", "prefix_projection": True}],
                         ids=["ptuning-mlp", "ptuning-lstm", "prompt", "prefix"])  # fmt: skip
def test_soft_prompts_load_in_peft_and_generate_the_same_with_the_kv_cache(
    base: Path, tmp_path: Path, kw
) -> None:
    from danlu.generate import Generator, SamplingParams

    ours = _adapter(base, tmp_path / "ad", seed=3, scale=2.0, virtual_tokens=5, **kw)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["num_virtual_tokens"] == 5
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad"
    )
    with (
        torch.no_grad()
    ):  # peft's logits cover the virtual tokens too (P-tuning, prompt tuning): compare the text's
        torch.testing.assert_close(
            theirs.eval()(input_ids=X).logits[:, -X.size(1) :], ours, atol=1e-4, rtol=0
        )
    tuned = load_checkpoint(tmp_path / "ad")
    greedy = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    prompt = [5, 17, 42, 7]
    cached = Generator(tuned.model, tuned.tokenizer).generate([prompt], greedy)[0].token_ids
    seq = list(prompt)
    with torch.no_grad():  # no cache: the whole sequence again at every step
        for _ in range(8):
            seq.append(int(tuned.model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]
    batched = (
        Generator(tuned.model, tuned.tokenizer).generate([prompt, list(range(20, 30))], greedy)[0].token_ids
    )
    assert batched == cached  # left-padded next to a longer prompt: the padding sits after the virtual tokens
    with torch.no_grad():
        assert (tuned.model(X) - load_checkpoint(base).model(X)).abs().max() > 1e-2


def test_merging_a_soft_prompt_is_refused_with_the_reason(base: Path, tmp_path: Path) -> None:
    _adapter(base, tmp_path / "ad", "ptuning", virtual_tokens=4)
    with pytest.raises(DanluError, match="cannot be merged: its virtual tokens are inputs"):
        merge(load_checkpoint(tmp_path / "ad"))
