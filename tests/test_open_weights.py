"""Open weights in: Llama-family folders written by transformers run on the native model with transformers' own
logits and greedy tokens; fine-tuned results load back in transformers; sharded, bf16 and bad folders behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.generate import Generator, SamplingParams
from danlu.io import export_hf, load_checkpoint, weight_files

transformers = pytest.importorskip("transformers")

VOCAB = 448  # the tiny tokenizer's 400 tokens, padded to a multiple of 64


def _family_configs() -> dict[str, object]:
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return {
        "llama": transformers.LlamaConfig(**common, tie_word_embeddings=True),
        "llama3": transformers.LlamaConfig(
            **{**common, "max_position_embeddings": 512},
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),  # fmt: skip
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False),
    }


def make_hf_folder(
    folder: Path, family: str, tokenizer, *, dtype: torch.dtype = torch.float32, shard: str | None = None
) -> Path:
    """A randomly initialized transformers model of `family` saved as a HF folder with a tokenizer beside it.

    All weights (biases and norms too) are perturbed so every parameter matters to the logits."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_family_configs()[family])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save(folder)
    return folder


def hf_reference(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_native_model_matches_transformers(tmp_path: Path, tiny_tokenizer, family: str) -> None:
    folder = make_hf_folder(tmp_path / family, family, tiny_tokenizer)
    ckpt = load_checkpoint(folder)
    assert ckpt.backend == "native" and ckpt.config.model_type == ("llama" if family == "llama3" else family)
    theirs = hf_reference(folder)
    # longer than llama3's original context of 64, so the scaled frequencies matter
    ids = [
        ckpt.tokenizer.bos_id,
        *ckpt.tokenizer.encode("中国最高的山是珠穆朗玛峰。The capital of Japan is Tokyo. " * 3),
    ]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), theirs(x).logits, atol=1e-4, rtol=0)
        hf_greedy = theirs.generate(  # the prompt starts with bos = pad: say it is not padding
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            suppress_tokens=list(range(ckpt.tokenizer.vocab_size, VOCAB)),  # padding rows
        )
    ours = Generator(ckpt.model, ckpt.tokenizer).generate(
        [ids], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    )[0]
    assert ours.token_ids == hf_greedy[0, len(ids) :].tolist()


def test_sharded_bf16_folder_loads_and_saves_in_its_own_dtype(tmp_path: Path, tiny_tokenizer) -> None:
    folder = make_hf_folder(tmp_path / "q", "qwen2", tiny_tokenizer, dtype=torch.bfloat16, shard="100KB")
    assert len(weight_files(folder)) > 1  # really sharded, with an index
    ckpt = load_checkpoint(folder)
    assert ckpt.config.torch_dtype == "bfloat16" and ckpt.model.lm_head.weight.dtype == torch.float32
    theirs = hf_reference(folder)
    x = torch.tensor([[ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode("Hello, 世界")]])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), theirs(x).logits, atol=1e-4, rtol=0)
    out = export_hf(folder, tmp_path / "copy")  # default: the parent's dtype
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Qwen2ForCausalLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    again = hf_reference(out)
    with torch.no_grad():
        torch.testing.assert_close(
            again(x).logits, theirs(x).logits, atol=0, rtol=0
        )  # bf16 → fp32 → bf16 exact
    fp32 = export_hf(folder, tmp_path / "fp32", dtype="float32")
    assert json.loads((fp32 / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(DanluError, match="already exists"):
        export_hf(folder, tmp_path / "fp32")


def test_fine_tuned_import_loads_in_transformers(tmp_path: Path, tiny_tokenizer) -> None:
    """A few SFT steps on an imported Llama-3-style model: the result is still that family for transformers."""
    from danlu.cli import main

    folder = make_hf_folder(tmp_path / "base", "llama3", tiny_tokenizer)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(10) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "sft"
    code = main(["sft", "--from", str(folder), "--data", str(data), "--out", str(out), "sft.train.steps=3",
                 "sft.train.batch_size=2", "sft.eval_limit=0", "sft.bpb_rows=0", "sft.seq_len=64", "sft.train.compile='off'", "sft.train.progress=false"])  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is False
    theirs = hf_reference(out)
    ours = load_checkpoint(out)
    before = load_checkpoint(folder)
    x = torch.tensor([[ours.tokenizer.bos_id, *ours.tokenizer.encode("3 + 2 = ?")]])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), theirs(x).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(ours.model(x), before.model(x))  # it trained


def test_bad_folders_fail_with_one_clear_message(tmp_path: Path, tiny_tokenizer) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DanluError, match="no config.json"):
        load_checkpoint(empty)
    folder = make_hf_folder(tmp_path / "m", "llama", tiny_tokenizer)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(DanluError, match="never unpickles"):
        load_checkpoint(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(DanluError, match="no weights"):
        load_checkpoint(folder)
    odd = make_hf_folder(tmp_path / "odd", "llama", tiny_tokenizer)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(
        json.dumps({**config, "model_type": "no-such-family", "architectures": ["X"]})
    )
    with pytest.raises(DanluError, match="no-such-family"):
        load_checkpoint(odd)
    small = make_hf_folder(tmp_path / "small", "llama", tiny_tokenizer)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(DanluError, match="missing: model.layers.2"):
        load_checkpoint(small)


def test_hub_id_offline_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DanluError, match="Offline") as e:
        load_checkpoint("nobody-here/tiny-model")
    assert "\n" not in str(e.value)


def gpt2_folder(folder: Path) -> Path:
    """A tiny GPT-2 with a GPT-2-style tokenizer (plain byte-level BPE, only <|endoftext|>, no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.conftest import SAMPLE_TEXT

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tk.train_from_iterator(SAMPLE_TEXT, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_gpt2_runs_through_transformers_and_learns_chatml(tmp_path: Path) -> None:
    """Another family: loads on the transformers path, generates like transformers, and SFT of this base model
    without a chat template adds ChatML (tokens, embedding rows) and saves a folder transformers loads."""
    from danlu.cli import main

    folder = gpt2_folder(tmp_path / "gpt2")
    ckpt = load_checkpoint(folder)
    assert ckpt.backend == "transformers" and not ckpt.tokenizer.has_chat_template
    theirs = hf_reference(folder)
    ids = ckpt.tokenizer.encode("The capital of Japan is")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), theirs(x).logits, atol=1e-5, rtol=0)
        hf_greedy = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)  # fmt: skip
    ours = Generator(ckpt.model, ckpt.tokenizer).generate([ids], SamplingParams(max_tokens=12, temperature=0,
                                                                                stop_token_ids=[]))[0]  # fmt: skip
    assert ours.token_ids == hf_greedy[0, len(ids) :].tolist()

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(10) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "sft"
    code = main(["sft", "--from", str(folder), "--data", str(data), "--out", str(out), "sft.train.steps=3",
                 "sft.train.batch_size=2", "sft.eval_limit=0", "sft.bpb_rows=0", "sft.seq_len=64",
                 "sft.train.compile='off'", "sft.train.progress=false"])  # fmt: skip
    assert code == 0
    tuned = load_checkpoint(out)
    assert tuned.backend == "transformers" and tuned.tokenizer.has_chat_template and tuned.is_chat
    assert tuned.config.vocab_size == 384 and tuned.tokenizer.token_to_id("<|im_end|>") is not None
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    convo = [{"role": "user", "content": "1 + 2 = ?"}]
    rendered = hf_tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n1 + 2 = ?<|im_end|>\n<|im_start|>assistant\n"
    again = hf_reference(out)
    chat_ids = tuned.tokenizer.render_chat(convo, add_generation_prompt=True)[0]
    y = torch.tensor([chat_ids])
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(y), again(y).logits, atol=1e-5, rtol=0)


def test_chinese_gpt2_with_a_bert_vocab_txt_generates_and_learns_chatml(tmp_path: Path) -> None:
    """uer/gpt2-chinese-cluecorpussmall's layout: a GPT-2 whose tokenizer is a BERT WordPiece vocab.txt (no
    tokenizer.json; config.json names BertTokenizer). danlu loads it through transformers, generates, fine-tunes."""
    from danlu.cli import main

    folder = tmp_path / "gpt2-zh"
    folder.mkdir()
    chars = sorted(set("中国最高的山是珠穆朗玛峰日本首都东京你好谢谢一二三四五六七八九十加等于"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *"0123456789+=?，。"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  tokenizer_class="BertTokenizer")  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    ckpt = load_checkpoint(folder)
    assert ckpt.backend == "transformers" and not ckpt.tokenizer.has_chat_template
    ids = ckpt.tokenizer.encode("中国最高的山是")
    assert ckpt.tokenizer.decode(ids).replace(" ", "") == "中国最高的山是"
    out = Generator(ckpt.model, ckpt.tokenizer).generate([ids], SamplingParams(max_tokens=6, temperature=0))[
        0
    ]
    assert out.token_ids and all(t < len(vocab) for t in out.token_ids)

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}加{b}等于？"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(5) for b in range(5)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    tuned_dir = tmp_path / "sft"
    code = main(["sft", "--from", str(folder), "--data", str(data), "--out", str(tuned_dir), "sft.train.steps=2",
                 "sft.train.batch_size=2", "sft.eval_limit=0", "sft.bpb_rows=0", "sft.seq_len=64",
                 "sft.train.compile='off'", "sft.train.progress=false"])  # fmt: skip
    assert code == 0
    tuned = load_checkpoint(tuned_dir)
    assert tuned.tokenizer.has_chat_template and tuned.config.vocab_size >= len(vocab) + 2
    prompt = tuned.tokenizer.render_chat(
        [{"role": "user", "content": "一加二等于？"}], add_generation_prompt=True
    )[0]
    assert tuned.tokenizer.decode(prompt).startswith("<|im_start|>")
    theirs = hf_reference(tuned_dir)
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(torch.tensor([prompt])), theirs(torch.tensor([prompt])).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
