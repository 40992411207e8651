"""The transformers-backed model (`danlu.hf_model.HFCausalLM`) against transformers' own forward, loss, generate and
from_pretrained, on tiny random models of several families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from danlu import DanluError  # noqa: E402
from danlu.generate import Generator, SamplingParams  # noqa: E402
from danlu.hf_model import HFCausalLM  # noqa: E402
from danlu.model import IGNORE_INDEX  # noqa: E402
from tests.conftest import SAMPLE_TEXT  # noqa: E402

VOCAB = 320
CONTEXT = 128
# A large init spread makes random models' outputs depend strongly on what they attend to, so a leaking mask or a
# wrong position shows far above the tolerances, and greedy decoding does not repeat one token.
INIT = 0.2
# Packing needs a custom 4D mask taken as is, which transformers' models do from version 5 (masking_utils).
PACKING = int(transformers.__version__.split(".")[0]) >= 5


def _config(family: str, vocab: int = VOCAB):
    t = transformers
    common = {"vocab_size": vocab, "initializer_range": INIT, "bos_token_id": None, "eos_token_id": None}
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    if family == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **common)  # fmt: skip
    if family == "gpt_neox":  # untied output matrix named embed_out, partial rotary, parallel residual
        return t.GPTNeoXConfig(max_position_embeddings=CONTEXT, rotary_pct=0.5, **small, **common)
    if family == "llama":
        return t.LlamaConfig(max_position_embeddings=CONTEXT, num_key_value_heads=2, **small, **common)
    if family == "gemma2":  # soft-caps its logits after lm_head
        return t.Gemma2Config(max_position_embeddings=CONTEXT, num_key_value_heads=2, head_dim=16, **small,
                              **common)  # fmt: skip
    if family == "cohere":  # scales its logits after lm_head
        return t.CohereConfig(max_position_embeddings=CONTEXT, logit_scale=0.5, **small, **common)
    if family == "opt":  # learned positions with an offset of 2
        return t.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                           word_embed_proj_dim=64, max_position_embeddings=CONTEXT, dropout=0.0, **common)  # fmt: skip
    if family == "phi":
        return t.PhiConfig(max_position_embeddings=CONTEXT, **small, **common)
    if family == "mistral":  # sliding-window attention
        return t.MistralConfig(max_position_embeddings=CONTEXT, num_key_value_heads=2, sliding_window=8, **small,
                               **common)  # fmt: skip
    if family == "bloom":  # ALiBi from the 2D mask, no position ids
        return t.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    raise AssertionError(family)


EAGER_ONLY = {"gemma2", "bloom"}  # transformers gives these no SDPA path


def build(
    family: str, attn: str = "sdpa", seed: int = 0, vocab: int = VOCAB
) -> tuple[torch.nn.Module, HFCausalLM]:
    torch.manual_seed(seed)
    attn = "eager" if family in EAGER_ONLY else attn
    try:
        hf = transformers.AutoModelForCausalLM.from_config(_config(family, vocab), attn_implementation=attn)
    except ValueError:  # older transformers give some families no SDPA path
        hf = transformers.AutoModelForCausalLM.from_config(
            _config(family, vocab), attn_implementation="eager"
        )
    hf.eval()
    return hf, HFCausalLM(hf)


@pytest.fixture(scope="module")
def tokenizer():
    from danlu.tokenizer import Tokenizer

    return Tokenizer.train(SAMPLE_TEXT, vocab_size=VOCAB)


def _ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "opt", "phi", "gemma2", "cohere", "bloom"])
@torch.no_grad()
def test_logits_and_keys_are_the_hf_models(family: str) -> None:
    hf, model = build(family)
    ids = _ids()
    expected = hf(ids).logits
    assert torch.allclose(model(ids), expected, atol=1e-5, rtol=0)
    h = model.hidden_states(ids)  # the split Generator and DPO use: hidden states, then lm_head
    assert torch.allclose(model.lm_head(h), expected, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == list(hf.state_dict())
    assert {id(p) for p in model.parameters()} == {id(p) for p in hf.parameters()}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
@torch.no_grad()
def test_loss_equals_hf_loss_with_labels(family: str) -> None:
    hf, model = build(family)
    ids = _ids()
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt that carries no loss
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)  # HF shifts internally
    expected = hf(ids, labels=labels).loss
    assert torch.allclose(model(ids, targets), expected, atol=1e-5, rtol=0)
    per_token = model(ids, targets, reduction="none")
    assert per_token.shape == targets.shape
    assert bool((per_token[targets == IGNORE_INDEX] == 0).all())
    assert torch.allclose(per_token.sum() / (targets != IGNORE_INDEX).sum(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("family", "attn"),
    [
        ("gpt2", "sdpa"),
        ("gpt2", "eager"),
        ("gpt_neox", "sdpa"),
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("opt", "sdpa"),
        ("phi", "sdpa"),
    ],
)
@torch.no_grad()
def test_packed_rows_score_like_documents_run_one_by_one(family: str, attn: str) -> None:
    _, model = build(family, attn)
    if not PACKING:
        assert not model.supports_packing
        pytest.skip(f"transformers {transformers.__version__} models take no custom 4D mask")
    assert model.supports_packing
    ids = _ids(t=16)
    targets = torch.roll(ids, -1, dims=1)
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 9 + [4] * 7])
    packed = model(ids, targets, segment_ids=segments, reduction="none")
    alone = torch.zeros_like(packed)
    for row in range(2):
        for seg in segments[row].unique():
            cols = segments[row] == seg
            alone[row, cols] = model(
                ids[row : row + 1, cols], targets[row : row + 1, cols], reduction="none"
            )[0]
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)
    # the control: without segment ids later documents see earlier ones, far beyond the tolerance
    plain = model(ids, targets, reduction="none")
    assert (plain - alone).abs().max() > 1e-2


def test_models_that_cannot_pack_say_so() -> None:
    _, model = build("bloom")  # takes no position ids: positions cannot restart per document
    assert not model.supports_packing
    if PACKING:  # (older transformers refuse earlier: no custom 4D masks at all)
        assert "position ids" in model.packing_problem()
    ids = _ids(t=8)
    with pytest.raises(DanluError, match=r"BloomForCausalLM.*sft\.pack=false"):
        model(ids, segment_ids=torch.tensor([[0] * 4 + [1] * 4] * 2))


@torch.no_grad()
def test_packed_rows_must_fit_a_sliding_window() -> None:
    # a window of 8: the packed mask replaces the sliding one, so longer packed rows are refused
    _, model = build("mistral")
    if not PACKING:
        pytest.skip(f"transformers {transformers.__version__} models take no custom 4D mask")
    assert model.supports_packing
    segments = torch.tensor([[0] * 3 + [1] * 5])
    ids = _ids(b=1, t=8)
    packed = model(ids, segment_ids=segments)
    assert torch.allclose(packed[:, 3:], model(ids[:, 3:]), atol=1e-5, rtol=0)
    with pytest.raises(DanluError, match="sliding window of 8"):
        model(_ids(b=1, t=9), segment_ids=torch.zeros(1, 9, dtype=torch.long))


def _hf_greedy(hf: torch.nn.Module, prompts: list[list[int]], pad_id: int, n: int) -> list[list[int]]:
    """transformers' own greedy continuation of each left-padded prompt, n tokens each (no stop token)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = (ids != -1).long()
    for row, p in enumerate(prompts):
        mask[row, : longest - len(p)] = 0
    hf.generation_config.eos_token_id = None
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=pad_id)  # fmt: skip
    return out[:, longest:].tolist()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "bloom"])
def test_generator_greedy_equals_hf_generate(family: str, tokenizer) -> None:
    hf, model = build(family)
    generator = Generator(model, tokenizer)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[])
    prompts = [
        tokenizer.encode(s) for s in ["The capital of Japan", "你好", "12 + 34 = 46. 7 × 8", "Hello, how"]
    ]
    assert len({len(p) for p in prompts}) > 2  # left padding of different widths

    one = _hf_greedy(hf, prompts[:1], tokenizer.pad_id, 10)[0]
    assert generator.generate(prompts[:1], greedy)[0].token_ids == one
    streamed = [c for c in generator.stream(prompts[0], greedy) if not isinstance(c, str)][0]
    assert streamed.token_ids == one

    reference = _hf_greedy(hf, prompts, tokenizer.pad_id, 10)
    assert [c.token_ids for c in generator.generate(prompts, greedy)] == reference

    # A stop token that ends some rows early and not others: the finished rows leave the batch (cache.reorder)
    # and the rest must go on exactly as transformers' greedy rows do.
    def cut(row: list[int], stop: int) -> list[int]:
        return row[: row.index(stop)] if stop in row else row

    stop = next(
        t for row in reference for t in row[1:]
        if len({len(cut(r, t)) for r in reference}) > 1 and any(len(cut(r, t)) == 10 for r in reference)
    )  # fmt: skip
    results = generator.generate(
        prompts, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop])
    )
    assert [c.token_ids for c in results] == [cut(r, stop) for r in reference]
    assert {c.finish_reason for c in results} == {"stop", "length"}


@torch.no_grad()
def test_deepcopy_is_an_independent_model() -> None:
    """DPO's reference model is a deepcopy of the policy: the copy must share nothing with it, yet stay whole."""
    import copy

    hf, model = build("gpt_neox")
    ref = copy.deepcopy(model)
    ids = _ids()
    assert torch.allclose(ref(ids), model(ids), atol=0, rtol=0)
    assert {id(p) for p in ref.parameters()} == {id(p) for p in ref.hf_model.parameters()}
    assert not {id(p) for p in ref.parameters()} & {id(p) for p in hf.parameters()}
    for p in ref.parameters():
        p.add_(1.0)
    assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ref(ids), model(ids))


@torch.no_grad()
def test_cache_limits_and_reorder() -> None:
    _, model = build("gpt2")
    ids = _ids(b=3, t=6)
    cache = model.new_cache(3, max_len=8)
    model.hidden_states(ids, cache=cache)
    assert cache.pos == 6
    with pytest.raises(ValueError, match="exceeds the context"):
        model.hidden_states(ids[:, :3], cache=cache)
    cache.reorder(torch.tensor([2, 0]))
    step = model(ids[[2, 0], :1], cache=cache)
    assert cache.pos == 7
    full = torch.cat([ids[[2, 0]], ids[[2, 0], :1]], dim=1)
    assert torch.allclose(step[:, -1], model(full)[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(_ids(b=1, t=CONTEXT + 1))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_training_lowers_loss_and_saves_an_hf_checkpoint(family: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf, model = build(family)
    ids = _ids(b=4, t=24)
    targets = torch.roll(ids, -1, dims=1)
    model.train()
    assert hf.training
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()

    tied = model.tied_keys()
    assert tied == (["lm_head.weight"] if family == "gpt2" else [])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    # transformers 4 refuses safetensors files without this metadata
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = model.hf_config_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **{dtype_kw: torch.float32}).eval()
    assert type(loaded).__name__ == model.architecture
    with torch.no_grad():
        expected = model(ids)
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5, rtol=0)
        again = HFCausalLM.from_pretrained(tmp_path)
        assert torch.allclose(again(ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
@torch.no_grad()
def test_resize_token_embeddings_keeps_old_tokens(family: str) -> None:
    hf, model = build(family)
    ids = _ids()
    before = model(ids)
    model.resize_token_embeddings(VOCAB + 16)
    after = model(ids)
    assert after.shape[-1] == VOCAB + 16
    assert torch.allclose(after[..., :VOCAB], before, atol=1e-5, rtol=0)
    assert (
        model.config.vocab_size == hf.config.vocab_size == model.hf_config_dict()["vocab_size"] == VOCAB + 16
    )
    emb = hf.get_input_embeddings().weight
    assert torch.allclose(emb[VOCAB:], emb[:VOCAB].mean(0).expand(16, -1))
    head = model.lm_head.weight
    assert head.shape[0] == VOCAB + 16
    assert (head is emb) == (family == "gpt2")
    assert torch.allclose(head[VOCAB:], head[:VOCAB].mean(0).expand(16, -1))
    ours, theirs = model.state_dict(keep_vars=True), hf.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    assert all(ours[k] is theirs[k] for k in theirs)  # the wrapper follows modules that the resize replaced
    assert {id(p) for p in model.parameters()} == {id(p) for p in hf.parameters()}


def test_config_surface() -> None:
    hf, model = build("gpt2")
    cfg = model.config
    assert (cfg.max_position_embeddings, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        CONTEXT, VOCAB, 64, 2,
    )  # fmt: skip
    assert cfg.tie_word_embeddings
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    no_emb = cfg.num_params(embeddings=False)
    assert no_emb == cfg.num_params() - VOCAB * 64 - CONTEXT * 64  # token and position tables
    assert cfg.flops_per_token(32) == 6 * (no_emb + VOCAB * 64) + 12 * 2 * 64 * 32
    assert json.loads(json.dumps(cfg.to_dict()))["architectures"] == ["GPT2LMHeadModel"]
    assert model.architecture == "GPT2LMHeadModel"
    assert model.supports_compiled_decode is False
    assert not build("gpt_neox")[1].config.tie_word_embeddings
    model.to(torch.float64)  # parameters stay shared with the HF model through a conversion
    assert next(hf.parameters()).dtype == torch.float64
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-9, rtol=0)
