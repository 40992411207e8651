"""GGUF export: llama.cpp (llama-cpp-python) loads each family's export, tokenizes exactly as the tokenizers library
does, and decodes greedily exactly as transformers does, in f32 and f16; quantized exports stay within a stated
NLL of f32; bad inputs are refused before anything is written.

The family models are tiny and learn a short bilingual document by heart (150 steps, a second or two each). Why not
random weights: their top-2 logit gaps along a greedy path go down to a few thousandths, and llama.cpp's f16 path
(weights *and* activations rounded to f16 in every matmul) moves logits by ~0.002-0.006 here, so a random model's
f16 greedy output matches transformers only by luck. After memorizing, the smallest gap on these paths is 0.2-5
nats, 70× or more the f16 error, and identical tokens is a fair requirement. The quantized-NLL model is trained on
templated sentences instead, so that held-out text means something to it.
"""

from __future__ import annotations

import errno
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from danlu import DanluError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPTS = ["北京有一座很高的山,", "The bridge in Paris is"]
PROBES = [
    "中国最高的山是珠穆朗玛峰。长江很长。",
    "The highest mountain in China is Mount Everest.",
    "12345 3.14 0.5% 1000000 2026年11月21日",
    "emoji 🙂🎉👍🏽 and 中文混合English words",
    "tabs\t\tand\nnewlines\n\n\n  multiple   spaces  \r\n end",
    "it's don't we'll I'M YOU'RE",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    '<tool_call>{"name": "calc"}</tool_call><|endoftext|>',
    "   leading and trailing   ",
    "",
]


def corpus(n: int, seed: int) -> list[str]:
    """Templated bilingual sentences (zh, en, digits, emoji); different seeds give different sentences."""
    rng = random.Random(seed)
    cities = [
        ("北京", "Beijing"),
        ("东京", "Tokyo"),
        ("巴黎", "Paris"),
        ("伦敦", "London"),
        ("上海", "Shanghai"),
    ]
    things = [("山", "mountain"), ("河", "river"), ("湖", "lake"), ("桥", "bridge"), ("塔", "tower")]
    out = []
    for i in range(n):
        (cz, ce), (tz, te) = rng.choice(cities), rng.choice(things)
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        out.append(
            [
                f"{cz}有一座很高的{tz},高{a}米。",
                f"The {te} in {ce} is {a} meters long, and it's {b} years old.",
                f"{a} + {b} = {a + b}. 今天是2026年{b % 12 + 1}月{b % 28 + 1}日。",
                f"user: 你好, {ce}! assistant: Hello 🙂 I'm here;\t{cz}的{tz}很美。\n",
            ][i % 4]
        )
    return out


TRAIN = corpus(320, seed=0)
# What the family models learn by heart, in this order: greedy decoding then follows it with wide margins.
DOC = [
    "北京有一座很高的山,高8848米,比东京的塔高得多。",
    "The bridge in Paris is 312 meters long, and it's 135 years old.",
    "user: 你好! assistant: Hello 🙂 I'm here;\t上海的河很美。\n",
    "3 + 4 = 7. 12 × 12 = 144. 今天是2026年11月21日,星期六。",
    "The tower in Tokyo is 333 meters tall; the lake in London is small.",
]
STEPS = 150
HELD_OUT = [s for s in corpus(24, seed=12345) if s not in TRAIN][:12]


def train_bpe(regex: str, specials: list[str], *, ignore_merges: bool, nfc: bool, user_defined: list[str]):
    """A byte-level BPE like Llama-3's or Qwen2's: the regex Split + ByteLevel, special tokens after the merges."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TRAIN + DOC, trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tk


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast, and does not stall when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizers_():
    from tokenizers import processors

    from danlu.export.vocab import LLAMA3_REGEX, QWEN2_REGEX

    llama3 = train_bpe(LLAMA3_REGEX, LLAMA3_SPECIALS, ignore_merges=True, nfc=False, user_defined=[])
    bos = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )  # fmt: skip
    qwen2 = train_bpe(
        QWEN2_REGEX, QWEN2_SPECIALS, ignore_merges=False, nfc=True, user_defined=["<tool_call>"]
    )
    return {"llama3": llama3, "qwen2": qwen2}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def train(
    model, docs: list[list[int]], steps: int, *, seq: int = 64, batch: int = 8, lr: float = 1e-2
) -> None:
    """AdamW on random windows of the concatenated documents (CPU, seeded)."""
    data = torch.tensor([i for d in docs for i in d])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def memorize(model, encode, start: int) -> None:
    """Trains until DOC is nearly memorized: its next-token margins are then nats wide, not hundredths."""
    train(model, [[start, *encode(s)] for s in DOC] * 20, STEPS, seq=64, batch=4, lr=3e-3)


FAMILIES = ("danlu", "llama3", "qwen2", "qwen3", "mistral")


def build_family(name: str, root: Path, toks: dict, tiny_tokenizer) -> Path:
    """A checkpoint folder as its own ecosystem writes it (transformers' save_pretrained, or danlu's)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = root / name
    if name == "danlu":  # danlu's own format and tokenizer: model_type llama, tied, ChatML, Qwen2 regex
        from tests.conftest import make_checkpoint

        make_checkpoint(folder, tiny_tokenizer, depth=1, context=256)
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        memorize(model, tiny_tokenizer.encode, tiny_tokenizer.bos_id)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip
    tok = toks["llama3" if name in ("llama3", "mistral") else "qwen2"]
    vocab = -(-tok.get_vocab_size() // 64) * 64
    if (
        name == "llama3"
    ):  # untied, Llama-3.1 rope scaling, bf16 weights in shards; q/k/v/o biases (permuted too)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, tie_word_embeddings=False, rope_theta=500000.0, attention_bias=True, **common,
            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
        )  # fmt: skip
        model_cls, save = transformers.LlamaForCausalLM, {"dtype": torch.bfloat16, "max_shard_size": "100KB"}
    elif name == "mistral":  # untied, float16 weights
        cfg = transformers.MistralConfig(
            vocab_size=vocab, tie_word_embeddings=False, sliding_window=None, **common
        )
        model_cls, save = transformers.MistralForCausalLM, {"dtype": torch.float16}
    elif name == "qwen2":  # q/k/v biases, tied
        cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **common)
        model_cls, save = transformers.Qwen2ForCausalLM, {}
    else:  # qwen3: q/k norms, head_dim 64 with hidden 128 and 4 heads, untied
        common.update(hidden_size=128, intermediate_size=256)
        cfg = transformers.Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, head_dim=64, **common)
        model_cls, save = transformers.Qwen3ForCausalLM, {}
    model = model_cls(cfg)
    bos = (
        tok.token_to_id("<|begin_of_text|>")
        if name in ("llama3", "mistral")
        else tok.token_to_id("<|endoftext|>")
    )
    memorize(model, lambda s: tok.encode(s, add_special_tokens=False).ids, bos)
    if "dtype" in save:
        model = model.to(save["dtype"])
    model.save_pretrained(
        folder, **({"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {})
    )
    tok.save(str(folder / "tokenizer.json"))
    if name in ("llama3", "mistral"):
        write_json(folder / "tokenizer_config.json",
                   {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE})  # fmt: skip
        eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
        write_json(folder / "generation_config.json",
                   {"bos_token_id": bos, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9})  # fmt: skip
    else:  # Qwen2 style: no BOS, template in chat_template.jinja, eos an int
        write_json(folder / "tokenizer_config.json",
                   {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "bos_token": None,
                    "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})  # fmt: skip
        (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
        write_json(folder / "generation_config.json", {"eos_token_id": tok.token_to_id("<|im_end|>")})
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizers_, tiny_tokenizer):
    """name → checkpoint folder, built on first use."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_family(name, root, tokenizers_, tiny_tokenizer)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exports(tmp_path_factory, families):
    """(family, quant) → exported .gguf path, exported on first use."""
    from danlu.export import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in cache:
            report = export_gguf(families(name), root / f"{name}-{quant}" / f"{name}-{quant}.gguf", quant)
            cache[(name, quant)] = report.path
        return cache[(name, quant)]

    return get


def hf_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def prompt_ids(folder: Path, text: str) -> list[int]:
    """The prompt after the token that separated training documents (BOS, or <|endoftext|> without one)."""
    tk = hf_tokenizer(folder)
    start = tk.token_to_id("<|begin_of_text|>")
    start = tk.token_to_id("<|endoftext|>") if start is None else start
    return [start, *tk.encode(text, add_special_tokens=False).ids]


class Llama:
    """llama_cpp.Llama with all logits kept, closed deterministically (its __del__ complains at exit).

    The KV cache is float32 (llama.cpp's default is float16) so that comparisons measure the export alone.
    """

    def __init__(self, path: Path, n_ctx: int = 256):
        llama_cpp = pytest.importorskip("llama_cpp")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, verbose=False, logits_all=True, seed=0,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
        )  # fmt: skip

    def __enter__(self):
        return self.llm

    def __exit__(self, *exc):
        self.llm.close()


def llama_greedy(path: Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n argmax tokens from llama.cpp (no sampler, no stop tokens) and the logits over the prompt."""
    with Llama(path) as llm:
        llm.reset()
        llm.eval(ids)
        prompt_logits = np.array(llm.scores[: len(ids)])
        out = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
    return out, prompt_logits


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray, float]:
    """n argmax tokens from transformers (full recompute per step), the prompt logits and the smallest top-2 gap."""
    seq, gaps = list(ids), []
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0].numpy()
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
    return seq[len(ids) :], prompt_logits, min(gaps)


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ── llama.cpp runs each family exactly as transformers does ──────────────────────────────────────────────────────
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_transformers(family, families, exports):
    pytest.importorskip("llama_cpp")
    folder = families(family)
    model = hf_model(folder)
    for prompt in PROMPTS:
        ids = prompt_ids(folder, prompt)
        want, want_logits, gap = hf_greedy(model, ids, 32)
        for quant in ("f32", "f16", "bf16") if family == "llama3" else ("f32", "f16"):
            got, got_logits = llama_greedy(exports(family, quant), ids, 32)
            err = float(np.abs(got_logits - want_logits).max())
            print(
                f"{family} {quant} {prompt!r}: smallest top-2 gap {gap:.2f}, prompt logits max |diff| {err:.4f}"
            )
            assert got == want, f"{family} {quant}: llama.cpp decoded {got}, transformers {want}"
            assert err < {"f32": 1e-3, "f16": 0.02, "bf16": 0.05}[quant], (
                f"{family} {quant}: logits differ by {err}"
            )


@pytest.mark.parametrize("family", ["danlu", "llama3", "qwen2"])
def test_tokenization_matches_tokenizers_library(family, families, exports):
    pytest.importorskip("llama_cpp")
    folder = families(family)
    tk = hf_tokenizer(folder)
    with Llama(exports(family, "f16")) as llm:
        for text in PROBES:
            want = tk.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == want, f"{family}: {text!r}: llama.cpp {got} != tokenizers {want}"
        assert (
            llm.tokenize(b"hi", add_bos=True, special=True)[0] == tk.encode("hi").ids[0]
        )  # BOS as configured


def test_gpt2_byte_level_pre_tokenizer(families, tmp_path):
    """GPT-2's lone ByteLevel(use_regex=True) pre-tokenizer is llama.cpp's "gpt-2" and splits text the same way."""
    pytest.importorskip("llama_cpp")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from danlu.export import export_gguf

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(TRAIN + DOC, trainer)
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    folder = tmp_path / "gpt2-tokenizer"
    shutil.copytree(families("qwen2"), folder)
    tk.save(str(folder / "tokenizer.json"))
    report = export_gguf(folder, tmp_path / "g.gguf", "f16")
    assert report.pre_tokenizer == "gpt-2"
    with Llama(report.path) as llm:
        for text in PROBES:
            want = tk.encode(text, add_special_tokens=False).ids
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, text


def test_rope_freqs_is_the_converters_llama3_tensor(families, exports):
    """rope_freqs.weight: the per-frequency divisors llama.cpp's converter computes from rope_scaling."""
    import gguf

    folder = families("llama3")
    reader = gguf.GGUFReader(exports("llama3", "f32"))
    got = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    dim, base, old = 16, 500000.0, rope["original_max_position_embeddings"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    want = []
    for i in range(0, dim, 2):  # the converter's loop, in plain floats
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            want.append(1.0)
        elif wavelen > old / low:
            want.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            want.append(1 / ((1 - smooth) / factor + smooth))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (
        got.dtype == np.float32 and 1.0 in want and factor in want and len(set(want)) > 2
    )  # all three regimes


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_metadata_hyperparameters_and_vocab(families, exports, tiny_tokenizer):
    import gguf

    T = gguf.TokenType
    kv, tensors = _fields(exports("qwen3", "f16"))
    rows = json.loads((families("qwen3") / "config.json").read_text())["vocab_size"]
    assert kv["general.architecture"] == "qwen3" and rows % 64 == 0
    expected = {"context_length": 256, "embedding_length": 128, "block_count": 2, "feed_forward_length": 256,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
                "attention.value_length": 64, "rope.freq_base": 10000.0, "vocab_size": rows}  # fmt: skip
    assert {k: kv[f"qwen3.{k}"] for k in expected} == expected
    assert kv["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["general.file_type"] == 1  # MOSTLY_F16
    assert "blk.0.attn_q_norm.weight" in tensors and "output.weight" in tensors  # untied
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert [int(d) for d in tensors["blk.0.attn_q.weight"].shape] == [128, 256]  # ne0 = hidden, ne1 = 4 × 64

    qwen = hf_tokenizer(families("qwen2"))
    kv, tensors = _fields(exports("qwen2", "f16"))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert "output.weight" not in tensors and "blk.1.attn_k.bias" in tensors  # tied; biases
    n = qwen.get_vocab_size()
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert (
        n % 64 and len(tokens) == len(types) == rows and tokens[n:] == [f"[PAD{i}]" for i in range(n, rows)]
    )
    assert set(types[n:]) == {T.UNUSED}
    assert types[qwen.token_to_id("<|im_end|>")] == T.CONTROL
    assert types[qwen.token_to_id("<tool_call>")] == T.USER_DEFINED  # a non-special added token
    assert tokens[qwen.token_to_id("Ġin")] == "Ġin" and types[qwen.token_to_id("Ġin")] == T.NORMAL
    assert kv["tokenizer.ggml.eos_token_id"] == qwen.token_to_id("<|im_end|>")
    assert kv["tokenizer.ggml.padding_token_id"] == qwen.token_to_id("<|endoftext|>")
    assert kv["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.bos_token_id" not in kv
    assert kv["tokenizer.chat_template"] == CHATML_TEMPLATE  # read from chat_template.jinja
    assert kv["tokenizer.ggml.merges"][0].count(" ") == 1

    llama3 = hf_tokenizer(families("llama3"))
    kv, tensors = _fields(exports("llama3", "f16"))
    assert {
        "rope_freqs.weight",
        "blk.1.attn_q.bias",
        "blk.1.attn_output.bias",
        "output.weight",
    } <= tensors.keys()
    assert (
        kv["tokenizer.ggml.pre"] == "llama-bpe" and kv["tokenizer.ggml.add_bos_token"] is True
    )  # post-processor
    assert kv["tokenizer.ggml.bos_token_id"] == llama3.token_to_id("<|begin_of_text|>")
    assert kv["tokenizer.ggml.eos_token_id"] == llama3.token_to_id("<|eot_id|>")
    assert kv["tokenizer.ggml.eot_token_id"] == llama3.token_to_id(
        "<|end_of_text|>"
    )  # generation_config's other
    assert kv["llama.rope.dimension_count"] == 16 and kv["llama.rope.freq_base"] == 500000.0
    assert kv["general.file_type"] == 1 and kv["general.name"] == "llama3"

    kv, tensors = _fields(exports("danlu", "f16"))
    assert kv["tokenizer.ggml.pre"] == "qwen2" and kv["general.architecture"] == "llama"
    assert kv["tokenizer.ggml.add_bos_token"] is False and "output.weight" not in tensors
    tool = tiny_tokenizer.token_to_id("<tool_call>")
    assert kv["tokenizer.ggml.token_type"][tool] == T.USER_DEFINED
    assert kv["tokenizer.ggml.token_type"][tiny_tokenizer.im_start_id] == T.CONTROL
    assert kv["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.im_end_id


# ── quantized exports ────────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizers_):
    """A 256-wide Llama (k-quant blocks of 256 fit every matrix), trained briefly so its NLL means something."""
    folder = tmp_path_factory.mktemp("wide")
    tok = tokenizers_["llama3"]
    cfg = transformers.LlamaConfig(
        vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    bos = tok.token_to_id("<|begin_of_text|>")
    train(model, [[bos, *tok.encode(s, add_special_tokens=False).ids] for s in TRAIN], 40)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    )
    return folder, model


def nll(path: Path, docs: list[list[int]]) -> float:
    """Total negative log-likelihood (nats) llama.cpp assigns to each document's tokens after the first."""
    total = 0.0
    with Llama(path) as llm:
        for ids in docs:
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
    return total


def test_quantized_nll_close_to_f32(wide, tmp_path):
    pytest.importorskip("llama_cpp")
    from danlu.export import export_gguf

    folder, model = wide
    tk = hf_tokenizer(folder)
    bos = tk.token_to_id("<|begin_of_text|>")
    docs = [[bos, *tk.encode(s, add_special_tokens=False).ids] for s in HELD_OUT]
    n_tokens = sum(len(d) - 1 for d in docs)
    n_bytes = sum(len(s.encode("utf-8")) for s in HELD_OUT)
    with torch.no_grad():
        hf = sum(float(model(torch.tensor([d]), labels=torch.tensor([d])).loss) * (len(d) - 1) for d in docs)
    reports = {
        q: export_gguf(folder, tmp_path / f"wide-{q}.gguf", q) for q in ("f32", "q8_0", "q4_0", "q4_k_m")
    }
    got = {q: nll(r.path, docs) for q, r in reports.items()}
    per_token = {q: v / n_tokens for q, v in got.items()}
    bpb = {q: v / math.log(2) / n_bytes for q, v in got.items()}
    print(
        f"\nheld-out: {len(docs)} sentences, {n_tokens} tokens, {n_bytes} bytes; transformers "
        f"{hf / n_tokens:.4f} nats/token"
    )
    for q in got:
        print(
            f"  {q:7s} {per_token[q]:.4f} nats/token, {bpb[q]:.4f} bits/byte, Δ vs f32 "
            f"{per_token[q] - per_token['f32']:+.4f} nats/token, {bpb[q] - bpb['f32']:+.4f} bpb, "
            f"{reports[q].bytes} bytes"
        )
    assert abs(per_token["f32"] - hf / n_tokens) < 2e-3  # f32 export = the checkpoint
    assert abs(per_token["q8_0"] - per_token["f32"]) < 0.01  # nats/token
    assert abs(per_token["q4_k_m"] - per_token["f32"]) < 0.05
    assert abs(per_token["q4_0"] - per_token["f32"]) < 0.1
    assert per_token["f32"] < 0.7 * math.log(
        640
    )  # the model learned something: the deltas measure real damage
    assert reports["q4_k_m"].bytes < reports["q8_0"].bytes < reports["f32"].bytes / 3
    # Every matrix takes the asked type or llama.cpp's deliberate Q4_K_M mix; nothing fell back for its shape.
    q4 = reports["q4_k_m"]
    assert q4.quantizer == "llama.cpp" and q4.tensor_types.get("Q4_K", 0) >= 10
    assert all("divisible" not in f.reason for f in q4.fallbacks), q4.fallbacks
    assert {f.type for f in q4.fallbacks} == {"Q6_K"} and "output.weight" in {f.name for f in q4.fallbacks}
    assert reports["q8_0"].fallbacks == [] and reports["q8_0"].tensor_types["Q8_0"] == 16


def test_k_quant_fallbacks_of_a_64_wide_model(families, tmp_path):
    """Rows of 64 (and 128) are not divisible by the 256-wide k-quant blocks: llama.cpp falls back, and says so."""
    pytest.importorskip("llama_cpp")
    from danlu.export import export_gguf

    report = export_gguf(families("qwen2"), tmp_path / "q.gguf", "q4_k_m")
    matrices = {f"blk.{i}.{n}.weight" for i in range(2)
                for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    assert {f.name for f in report.fallbacks} == matrices | {"token_embd.weight"}
    reasons = {f.name: f.reason for f in report.fallbacks}
    assert reasons["blk.0.attn_q.weight"] == "rows of 64 not divisible by 256 (Q4_K blocks)"
    assert reasons["blk.0.ffn_down.weight"] == "rows of 128 not divisible by 256 (Q4_K blocks)"
    assert "Q4_K" not in report.tensor_types and "rows of 64" in report.summary()


def test_q8_0_without_llama_cpp_is_bit_identical(families, tmp_path, monkeypatch):
    """gguf-py's numpy Q8_0 (used without llama-cpp-python) writes the very blocks llama.cpp's quantizer writes."""
    pytest.importorskip("llama_cpp")
    import gguf

    from danlu.export import export_gguf
    from danlu.export import gguf as export_module

    folder = families("mistral")
    native = export_gguf(folder, tmp_path / "native.gguf", "q8_0")
    monkeypatch.setattr(export_module, "_llama_cpp", lambda: None)
    numpy_ = export_gguf(folder, tmp_path / "numpy.gguf", "q8_0")
    assert (native.quantizer, numpy_.quantizer) == ("llama.cpp", "gguf")
    a = {t.name: t for t in gguf.GGUFReader(native.path).tensors}
    b = {t.name: t for t in gguf.GGUFReader(numpy_.path).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_k_quants_without_llama_cpp_say_how_to_install_it(families, tmp_path, monkeypatch):
    from danlu.export import export_gguf
    from danlu.export import gguf as export_module

    monkeypatch.setattr(export_module, "_llama_cpp", lambda: None)
    for quant in ("q4_k_m", "q4_0"):
        with pytest.raises(
            DanluError, match=rf"q4.gguf: {quant} needs llama.cpp's quantizer.*pip install llama-cpp-python"
        ):
            export_gguf(families("qwen2"), tmp_path / "q4.gguf", quant)
    assert _leftovers(tmp_path) == []


# ── refusals ─────────────────────────────────────────────────────────────────────────────────────────────────────
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_refuses_folders_it_cannot_export(tmp_path, families):
    from danlu.export import export_gguf

    out = tmp_path / "out"
    with pytest.raises(DanluError, match=r"no such checkpoint folder"):
        export_gguf(tmp_path / "absent", out / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DanluError, match=r"empty: not a checkpoint folder \(no config.json\)"):
        export_gguf(tmp_path / "empty", out / "m.gguf")

    src = families("qwen2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, noweights / f)
    with pytest.raises(DanluError, match=r"noweights: no weights \(expected model.safetensors"):
        export_gguf(noweights, out / "m.gguf")

    # A pickle whose loading would create a file: the exporter must refuse without ever unpickling it.
    import pickle

    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (noweights / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(DanluError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles") as e:
        export_gguf(noweights, out / "m.gguf")
    assert "save_pretrained" in str(e.value) and not marker.exists()

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(src, gpt2)
    write_json(gpt2 / "config.json", {**json.loads((src / "config.json").read_text()), "model_type": "gpt2"})
    with pytest.raises(
        DanluError, match=r"model_type 'gpt2' cannot be exported.*llama, mistral, qwen2, qwen3"
    ):
        export_gguf(gpt2, out / "m.gguf")
    classifier = tmp_path / "classifier"
    shutil.copytree(src, classifier)
    cfg = json.loads((src / "config.json").read_text())
    write_json(classifier / "config.json", {**cfg, "architectures": ["Qwen2ForSequenceClassification"]})
    with pytest.raises(DanluError, match=r"Qwen2ForSequenceClassification is not a causal language model"):
        export_gguf(classifier, out / "m.gguf")
    assert _leftovers(out) == []


def _with_tokenizer(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tk = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    edit(tk)
    write_json(dst / "tokenizer.json", tk)
    return dst


def test_refuses_tokenizers_llama_cpp_would_split_differently(tmp_path, families):
    from danlu.export import export_gguf

    src, out = families("qwen2"), tmp_path / "out"

    def other_regex(tk):
        tk["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,2}|\s+|[^\s]+"

    bad = _with_tokenizer(src, tmp_path / "regex", other_regex)
    with pytest.raises(DanluError, match=r"tokenizer.json: unknown pre-tokenizer regex '\\\\p\{N\}\{1,2\}"):
        export_gguf(bad, out / "m.gguf")

    def metaspace(tk):
        tk["pre_tokenizer"] = {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "always",
            "split": True,
        }

    bad = _with_tokenizer(src, tmp_path / "metaspace", metaspace)
    with pytest.raises(DanluError, match=r"pre-tokenizer Metaspace is not one llama.cpp implements"):
        export_gguf(bad, out / "m.gguf")

    def wordpiece(tk):
        tk["model"] = {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}

    bad = _with_tokenizer(src, tmp_path / "wordpiece", wordpiece)
    with pytest.raises(DanluError, match=r"tokenizer model is WordPiece; only byte-level BPE"):
        export_gguf(bad, out / "m.gguf")
    assert _leftovers(out) == []


def test_existing_output_needs_force(tmp_path, families):
    from danlu.export import export_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(DanluError, match=r"m.gguf: already exists \(pass force=True"):
        export_gguf(families("qwen2"), out, "f32")
    assert out.read_bytes() == b"keep me"
    report = export_gguf(families("qwen2"), out, "f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF" and report.bytes == out.stat().st_size


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"m.gguf: (?i:no space left on device)"),
        (
            OSError(errno.EIO, "Input/output error"),
            r"m.gguf: writing failed \(Input/output error\); no partial",
        ),
        (KeyboardInterrupt(), None),
    ],
)
def test_interrupted_export_leaves_no_partial_file(tmp_path, families, monkeypatch, error, message):
    import gguf

    from danlu.export import export_gguf

    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fail_later(self, tensor, *a, **k):
        if len(written) == 3:
            raise error
        written.append(tensor.nbytes)
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_later)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"the previous export")
    for quant in ("f16", "q8_0"):  # direct, and through the intermediate file llama.cpp quantizes
        written.clear()
        with pytest.raises(DanluError if message else KeyboardInterrupt, match=message):
            export_gguf(families("qwen2"), out / "m.gguf", quant, force=True)
        assert len(written) == 3 and _leftovers(out) == ["m.gguf"]
        assert (out / "m.gguf").read_bytes() == b"the previous export"


def test_quantizer_failure_names_llama_cpps_reason(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from danlu.export.gguf import _llama_quantize

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(
        DanluError, match=r"out.gguf: llama.cpp's quantizer failed \(q4_k_m, return code \d+\)"
    ) as e:
        _llama_quantize(llama_cpp, bad, tmp_path / "out.gguf", "q4_k_m")
    assert len(str(e.value)) > 80  # llama.cpp's own words (captured from its stderr) follow
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_quant_and_shape_mismatch(tmp_path, families):
    from danlu.export import export_gguf

    with pytest.raises(
        DanluError, match=r"quant 'q3' is not supported \(choose one of: f32, f16, bf16, q8_0"
    ):
        export_gguf(families("qwen2"), tmp_path / "m.gguf", "q3")
    bad = tmp_path / "heads"
    shutil.copytree(families("qwen2"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    write_json(bad / "config.json", {**cfg, "num_key_value_heads": 4})
    with pytest.raises(
        DanluError, match=r"k_proj.(weight|bias) has shape \[32(, 64)?\], config.json implies \[64"
    ):
        export_gguf(bad, tmp_path / "m.gguf")


# ── Ollama Modelfile and the command ─────────────────────────────────────────────────────────────────────────────
def test_modelfile_chatml_and_llama3(families, exports):
    chatml = (exports("qwen2", "f16").parent / "Modelfile").read_text(encoding="utf-8")
    assert chatml == (
        "# Written by `danlu export`\n"
        "FROM ./qwen2-f16.gguf\n"
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{- end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
    )
    llama3 = (exports("llama3", "f16").parent / "Modelfile").read_text(encoding="utf-8")
    assert llama3 == (
        "# Written by `danlu export`\n"
        "FROM ./llama3-f16.gguf\n"
        'TEMPLATE """{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
        '{{- end }}{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
        "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{- end }}{{- end }}<|start_header_id|>assistant"
        '<|end_header_id|>\n\n"""\n'
        'PARAMETER stop "<|eot_id|>"\n'
        'PARAMETER stop "<|end_of_text|>"\n'
        "PARAMETER temperature 0.6\n"
        "PARAMETER top_p 0.9\n"
    )
    danlu = (exports("danlu", "f16").parent / "Modelfile").read_text(encoding="utf-8")
    assert (
        "<|im_start|>{{ .Role }}" in danlu
        and 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"' in danlu
    )


def test_modelfile_written_by_someone_else_is_kept(tmp_path, families):
    from danlu.export import export_gguf

    (tmp_path / "Modelfile").write_text("FROM ./mine.gguf\n")
    report = export_gguf(families("qwen2"), tmp_path / "m.gguf", "f32")
    assert (tmp_path / "Modelfile").read_text() == "FROM ./mine.gguf\n"
    assert report.modelfile == tmp_path / "m.Modelfile" and "FROM ./m.gguf" in report.modelfile.read_text()


def test_cli_export(tmp_path, families, capsys, monkeypatch):
    from danlu.cli import main
    from danlu.commands import export as command
    from danlu.export.gguf import QUANTS

    assert command.QUANTS == QUANTS
    folder = families("qwen2")
    assert main(["export", str(folder), "--out", str(tmp_path), "--quant", "f32"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "qwen2-f32.gguf"
    assert path.is_file() and f"wrote {path}" in out and "arch qwen2" in out and "pre-tokenizer qwen2" in out
    assert (
        f"llama-cli -m {path} -cnv" in out
        and "ollama create qwen2-f32 -f Modelfile && ollama run qwen2-f32" in out
    )
    assert main(["export", str(folder), "--out", str(tmp_path), "--quant", "f32"]) == 2
    assert "already exists" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr(
        "danlu.io.export_hf", lambda *a, **k: calls.append((a, k)) or Path(k.get("out", a[1]))
    )
    assert (
        main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
        == 0
    )
    assert calls == [((str(folder), str(tmp_path / "hf")), {"dtype": "bfloat16", "force": False})]
    assert (
        main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "hf"), "--quant", "q8_0"]) == 2
    )
