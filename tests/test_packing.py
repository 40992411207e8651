"""Packed rows without a dense T x T mask compute what the dense mask computes.

Native model: flex attention's block-sparse mask (`attention = "flex"`) against the dense (B, 1, T, T) mask, on
tiny random models with GQA, q/k norm and biases, rows of uneven documents that cross 128-token blocks, one-token
documents and a padding segment. Flex has no backward on a CPU (danlu.model.packed_attention), so here the forward
and the loss are compared, and the gradient where a GPU is present.

transformers-backed models: packed rows give each document's logits as it gets alone, for the routes that carry no
4D mask: flash attention (rows joined into one sequence with position ids and cu_seq_lens) and flex_attention
(transformers builds the block mask from the position resets). Flash attention's kernels are CUDA-only, so the flash
test installs a plain-torch reference for `flash_attn_func` / `flash_attn_varlen_func` where transformers keeps its
loaded kernels: everything else, from the model's kwargs to transformers' choice of the varlen path, is transformers'
own code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import danlu.model
from danlu import DanluError
from danlu.compiler import compiler_available
from danlu.model import IGNORE_INDEX, ModelConfig, Transformer, packed_attention

VOCAB = 96
PAD = 0
# Three rows of 300 tokens: uneven documents across the 128-token blocks (one of one token), a padding segment at
# the end of the first row (as danlu.stages.sft.collate makes it: its own segment, never scored), a row that is one
# document, and a row split just past a block edge.
SEGMENTS = torch.tensor(
    [
        [0] * 37 + [1] * 1 + [2] * 150 + [3] * 100 + [4] * 12,
        [0] * 300,
        [0] * 129 + [1] * 171,
    ]
)


def _native(qk_norm: bool = False, qkv_bias: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, qk_norm=qk_norm, qkv_bias=qkv_bias, initializer_range=0.2,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    if qkv_bias:  # random biases, so that they show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.2)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, SEGMENTS.shape, generator=g)
    targets = torch.roll(ids, -1, 1)
    ends = torch.ones_like(SEGMENTS, dtype=torch.bool)  # a document's last token predicts nothing
    ends[:, :-1] = SEGMENTS[:, 1:] != SEGMENTS[:, :-1]
    targets[ends] = IGNORE_INDEX
    ids[0, -12:], targets[0, -12:] = PAD, IGNORE_INDEX  # the padding segment
    return ids, targets


def _run(
    model: Transformer, attention: str, ids: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    model.attention = attention
    return model(ids, targets, segment_ids=SEGMENTS, reduction="none")


@pytest.mark.parametrize(("qk_norm", "qkv_bias"), [(False, False), (True, True)])
@torch.no_grad()
def test_flex_logits_and_loss_equal_the_dense_mask(qk_norm: bool, qkv_bias: bool) -> None:
    model = _native(qk_norm, qkv_bias)
    ids, targets = _batch()
    dense, flex = _run(model, "dense", ids), _run(model, "flex", ids)
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-5)
    dense_loss, flex_loss = _run(model, "dense", ids, targets), _run(model, "flex", ids, targets)
    torch.testing.assert_close(flex_loss, dense_loss, atol=2e-5, rtol=1e-5)
    model.attention = "flex"
    mean = model(ids, targets, segment_ids=SEGMENTS)
    torch.testing.assert_close(mean, dense_loss.sum() / (targets != IGNORE_INDEX).sum(), atol=1e-5, rtol=1e-5)
    # the control: attention across documents (no segments) is far from both
    assert (model(ids) - dense).abs().max() > 1e-1


@torch.no_grad()
def test_flex_under_bf16_autocast_runs_in_bf16_and_matches_the_dense_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # q/k norm leaves q and k in fp32 and v in bf16 under autocast. SDPA, an autocast op, runs in bf16 there; flex
    # is none and would take the mix (and run in fp32), so danlu hands it all three in autocast's dtype.
    dtypes = []

    def recording_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return flex_attention(q, k, v, **kwargs)

    monkeypatch.setattr(danlu.model, "flex_attention", recording_flex)
    model = _native(qk_norm=True)
    ids, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, flex = _run(model, "dense", ids), _run(model, "flex", ids)
    assert dtypes == [(torch.bfloat16,) * 3] * model.config.num_hidden_layers
    torch.testing.assert_close(flex.float(), dense.float(), atol=0.1, rtol=0.05)


def test_auto_chooses_flex_on_cuda_and_the_dense_mask_elsewhere() -> None:
    assert packed_attention("auto", torch.device("cuda")) == "flex"
    assert packed_attention("auto", torch.device("cpu")) == "dense"
    assert packed_attention("flex", torch.device("cpu")) == "flex"
    with pytest.raises(DanluError, match="'sparse' is not one of auto, dense, flex"):
        packed_attention("sparse", torch.device("cpu"))


def test_flex_refuses_to_train_on_a_cpu_with_a_clear_error() -> None:
    model = _native().train()
    ids, targets = _batch()
    with pytest.raises(DanluError, match="'flex' cannot train on cpu"):
        _run(model, "flex", ids, targets)
    model.attention = "auto"  # auto trains on the dense mask here
    assert model(ids, targets, segment_ids=SEGMENTS).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention has a backward on GPUs only")
def test_flex_gradient_equals_the_dense_masks_on_a_gpu() -> None:
    model = _native(qk_norm=True).cuda().train()
    ids, targets = (x.cuda() for x in _batch())
    segments = SEGMENTS.cuda()
    grads = {}
    for attention in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        model.attention = attention
        loss = model(ids, targets, segment_ids=segments)
        loss.backward()
        grads[attention] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["flex"][0], grads["dense"][0], atol=1e-5, rtol=1e-5)
    for flex, dense in zip(grads["flex"][1], grads["dense"][1]):
        torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(torch.device("cpu")), reason="no C++ compiler for inductor")
@torch.no_grad()
def test_compiled_flex_equals_the_dense_mask() -> None:
    """What the engine runs: the whole model under torch.compile, the block mask built inside the graph."""
    model = _native(qk_norm=True)
    ids, _ = _batch()
    dense = _run(model, "dense", ids)
    model.attention = "flex"
    compiled = torch.compile(model, dynamic=False)
    torch.testing.assert_close(compiled(ids, segment_ids=SEGMENTS), dense, atol=2e-5, rtol=1e-5)
    # the mask builder that an eager model runs compiled on a GPU gives the eager builder's blocks
    fused = danlu.model._compiled(danlu.model._block_segment_mask)(SEGMENTS)
    eager = danlu.model._block_segment_mask(SEGMENTS)
    assert torch.equal(fused.to_dense(), eager.to_dense())  # which blocks run at all
    assert torch.equal(fused.full_kv_num_blocks, eager.full_kv_num_blocks)  # and how many of them unmasked


# ───────────────────────── transformers-backed models ─────────────────────────

transformers = pytest.importorskip("transformers")
from danlu.hf_model import HFCausalLM  # noqa: E402

HF_SEGMENTS = torch.tensor([[0] * 5 + [1] * 1 + [2] * 7 + [3] * 3, [4] * 9 + [5] * 7])
FIVE = int(transformers.__version__.split(".")[0]) >= 5  # packing needs transformers 5's masking_utils


def _hf(family: str, attn: str) -> HFCausalLM:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    cfg = transformers.LlamaConfig(**common) if family == "llama" else transformers.Qwen2Config(**common)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    if family == "qwen2":  # Qwen2's q/k/v biases start at zero: make them show
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.2)
    hf.config._attn_implementation = attn  # what from_pretrained(attn_implementation=…) sets
    return HFCausalLM(hf)


def _assert_packed_equals_alone(model: HFCausalLM) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, HF_SEGMENTS.shape, generator=g)
    packed = model(ids, segment_ids=HF_SEGMENTS)
    for row in range(ids.size(0)):
        for seg in HF_SEGMENTS[row].unique():
            cols = HF_SEGMENTS[row] == seg
            alone = model(ids[row : row + 1, cols])[0]
            torch.testing.assert_close(packed[row, cols], alone, atol=1e-5, rtol=1e-5)
    # the control: the same rows unpacked let later documents see earlier ones
    assert (model(ids) - packed).abs().max() > 1e-2


def _reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:  # fmt: skip
    """flash_attn_varlen_func's contract in plain torch: (total, heads, D), each cu_seqlens span attends alone."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and tuple(window_size) == (-1, -1) and not softcap
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        out[start:end] = y.transpose(0, 1)
    return out


def _reference_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:  # fmt: skip
    """flash_attn_func's contract in plain torch: (B, T, heads, D), each row one sequence."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale,
        enable_gqa=True,
    )  # fmt: skip
    return y.transpose(1, 2)


@pytest.fixture
def reference_flash_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' flash path with the plain-torch kernels above in the slots where it keeps the loaded ones."""
    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_process_flash_kwargs_fn"):
        if not hasattr(fa, name):
            pytest.skip(f"transformers {transformers.__version__} keeps its flash kernels elsewhere")
    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", _reference_flash)
    monkeypatch.setattr(fa, "_flash_varlen_fn", _reference_varlen)
    monkeypatch.setattr(fa, "_flash_with_kvcache_fn", None)
    monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
    monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
    monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(_reference_varlen))
    monkeypatch.setattr(fa, "_process_with_kvcache_kwargs_fn", dict)


@pytest.mark.skipif(not FIVE, reason="packing needs transformers 5")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_flash_attention_packs_through_position_ids(family: str, reference_flash_kernels: None) -> None:
    model = _hf(family, "flash_attention_2")
    assert model.supports_packing and model._packing_route() == "flatten"
    _assert_packed_equals_alone(model)


@pytest.mark.slow
@pytest.mark.skipif(not FIVE, reason="packing needs transformers 5")
@pytest.mark.skipif(
    not compiler_available(torch.device("cpu")), reason="transformers compiles flex_attention"
)
@torch.no_grad()
def test_flex_attention_packs_through_position_ids() -> None:
    model = _hf("llama", "flex_attention")
    assert model.supports_packing and model._packing_route() == "positions"
    _assert_packed_equals_alone(model)


@pytest.mark.skipif(not FIVE, reason="packing needs transformers 5")
def test_attention_implementations_that_cannot_pack_say_so() -> None:
    model = _hf("llama", "paged|flash_attention_2")
    assert not model.supports_packing
    assert "'paged|flash_attention_2' is not known to keep packed documents apart" in model.packing_problem()
    with pytest.raises(DanluError, match=r"LlamaForCausalLM.*sft\.pack=false"):
        model(torch.zeros(2, 16, dtype=torch.long), segment_ids=HF_SEGMENTS)
    for attn, route in [("sdpa", "mask"), ("eager", "mask"), ("flash_attention_3", "flatten")]:
        assert _hf("llama", attn)._packing_route() == route
