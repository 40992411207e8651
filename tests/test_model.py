"""The decoder matches transformers' Llama exactly, and the KV cache, padding and packing paths agree."""

from __future__ import annotations

import pytest
import torch

from danlu.model import ModelConfig, Transformer


def test_depth_knob_sets_a_consistent_shape() -> None:
    cfg = ModelConfig(vocab_size=1000, depth=6)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        384,
        6,
        3,
        64,
    )
    assert cfg.intermediate_size % 64 == 0 and cfg.intermediate_size >= 8 * cfg.hidden_size // 3
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=3)


def test_parameter_names_are_transformers_llama_names() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=256, depth=2, tie_word_embeddings=False, max_position_embeddings=64)
    ours = set(Transformer(cfg).state_dict()) - {"rope_cos", "rope_sin"}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=2,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        tie_word_embeddings=False,
    )  # fmt: skip
    theirs = set(transformers.LlamaForCausalLM(hf_cfg).state_dict())
    assert ours == theirs


def test_kv_cache_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, depth=2, max_position_embeddings=64)).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        parts = [model(x[:, :10], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_each_prompt_alone() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, depth=2, max_position_embeddings=64)).eval()
    a, b = torch.randint(1, 300, (1, 12)), torch.randint(1, 300, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    with torch.no_grad():
        cache = model.new_cache(2, pad=torch.tensor([0, 5]))
        out = model(batch, cache=cache)
        step = model(torch.tensor([[3], [4]]), cache=cache)
        alone_b = model(torch.cat([b, torch.tensor([[4]])], 1))
    torch.testing.assert_close(out[1, 5:], alone_b[0, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], alone_b[0, 7], atol=1e-5, rtol=1e-5)


def test_packed_segments_do_not_attend_across_documents() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, depth=2, max_position_embeddings=64)).eval()
    x = torch.randint(0, 300, (1, 20))
    seg = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed = model(x, segment_ids=seg)
        second = model(x[:, 8:])
    torch.testing.assert_close(packed[:, 8:], second, atol=1e-5, rtol=1e-5)


def test_context_overflow_is_an_error() -> None:
    model = Transformer(ModelConfig(vocab_size=300, depth=1, max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("rows", [4096, 6, 7])  # 64 row blocks of 64, and counts zero-padded to 64 rows
def test_compiled_rms_norm_matches_f_rms_norm_in_output_and_gradients(rows: int) -> None:
    """The norm training runs under torch.compile (its backward sums the weight gradient in row blocks) is
    F.rms_norm's math: same output, same gradients for input and weight."""
    from danlu.model import _CompiledRMSNorm

    torch.manual_seed(0)
    x = torch.randn(rows, 64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).requires_grad_()
    grad = torch.randn(rows, 64)
    ref = torch.nn.functional.rms_norm(x, (64,), w, 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, w), grad)
    out = _CompiledRMSNorm.apply(x, w, 1e-5)
    grads = torch.autograd.grad(out, (x, w), grad)
    torch.testing.assert_close(out, ref)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_one_compiled_training_graph_serves_batches_of_other_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """RL and preference batches change shape every step, and they score per token (`reduction="none"`). Under
    dynamic shapes one graph (forward and backward) must serve every batch: the norm's weight-gradient blocks once
    made dynamo guard on rows % 64, % 32, …, the chunked loss on the exact row count and then on its chunk count, so
    GRPO compiled again nearly every step until dynamo's recompile limit. Per-token losses equal eager's."""
    from torch._dynamo.backends.registry import lookup_backend

    import danlu.losses_fused as fused

    # 16-row chunks: the batches below make 6, 8, 10, 5 and 7
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 16 * 256)
    monkeypatch.setattr(fused, "MIN_CHUNK_ROWS", 16)
    graphs = []

    def counting(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, depth=1, max_position_embeddings=64))
    step = torch.compile(model, backend=counting, dynamic=True)
    first = None
    # 90, 120, 145, 69, 100 rows: odd and even, multiples of 2, 8 and neither. Over 64 rows each (real batches have
    # thousands): fewer would leave the norm's 64 blocks one row each, a size dynamo specializes, as it does a batch of 1
    for batch, length in [(3, 30), (4, 30), (5, 29), (3, 23), (4, 25)]:
        ids = torch.randint(0, 256, (batch, length))
        losses = step(ids, ids.roll(-1, 1), reduction="none")
        losses.mean().backward()
        eager = model(ids, ids.roll(-1, 1), reduction="none")
        torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-5)
        first = first or len(graphs)
    assert len(graphs) == first


# Llama's layout, and Qwen2's q/k/v biases with Qwen3's q/k norm (the compiled norm then runs per head too); the
# mean loss (traced) and per-token losses (the chunked loss behind its own op, as RL stages take them).
@pytest.mark.parametrize(
    "extra, reduction", [({}, "mean"), ({"qkv_bias": True, "qk_norm": True}, "mean"), ({}, "none")]
)
def test_compiled_training_step_matches_eager_in_loss_and_every_gradient(extra: dict, reduction: str) -> None:
    """What torch.compile trains (the compiled norm, the chunked loss) gives eager's loss and the gradient of every
    parameter."""
    from danlu.compiler import compiler_available

    if not compiler_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, depth=2, max_position_embeddings=32, **extra))
    with torch.no_grad():  # biases start at zero, where a wrong bias gradient would not change the loss
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(std=0.1)
    ids = torch.randint(0, 256, (2, 32))
    targets = ids.roll(-1, 1)
    weights = torch.rand(ids.shape)  # per-token losses weighted differently, as advantages weigh them
    eager = model(ids, targets, reduction=reduction)
    (eager * weights).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(ids, targets, reduction=reduction)
    (compiled * weights).sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
