"""The chunked output projection + cross-entropy equals the plain whole-logits path: loss and gradients, for every
reduction, with ignored targets, tied and untied heads, under autocast and under torch.compile."""

from __future__ import annotations

import pytest
import torch

from danlu import losses_fused
from danlu.losses_fused import chunk_rows, linear_cross_entropy, plain_linear_cross_entropy
from danlu.model import IGNORE_INDEX, ModelConfig, Transformer


def _inputs(
    rows: int = 2, cols: int = 150, hidden: int = 32, vocab: int = 500, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, hidden, generator=gen, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(vocab, hidden, generator=gen, dtype=dtype)).requires_grad_()
    t = torch.randint(0, vocab, (rows, cols), generator=gen)
    t[0, :40] = IGNORE_INDEX  # a padded prompt
    t[1, -7:] = IGNORE_INDEX
    return x, w, t


def _loss_and_grads(fn, x, w, t, reduction):  # noqa: ANN001, ANN202
    loss = fn(x, w, t, reduction=reduction)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)  # not all ones
    gx, gw = torch.autograd.grad(loss, (x, w), upstream)
    return loss.detach(), gx, gw


def test_ignore_index_is_the_models() -> None:
    assert losses_fused.IGNORE_INDEX == IGNORE_INDEX


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_plain_path_in_loss_and_gradients(reduction: str) -> None:
    x, w, t = _inputs()
    # 64 rows a chunk: 300 rows make 5 chunks, the last one short.
    chunked = _loss_and_grads(lambda *a, **k: linear_cross_entropy(*a, **k, rows=64), x, w, t, reduction)
    plain = _loss_and_grads(plain_linear_cross_entropy, x, w, t, reduction)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if reduction == "none":
        assert chunked[0].shape == t.shape
        assert (chunked[0][t == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_frozen_head_gets_no_gradient_and_x_the_same_one(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-token losses over a frozen head (an adapter trains, the head does not): x's gradient is the one the
    trainable head gives, and the head's own, a third of the head's backward, is never computed. Compiled (the
    custom op's path, traced by aot_eager: no C++ compiler needed) and eager."""
    x, w, t = _inputs()
    want = _loss_and_grads(plain_linear_cross_entropy, x, w, t, "none")
    computed = []
    real = losses_fused._accumulate_weight_grad
    monkeypatch.setattr(losses_fused, "_accumulate_weight_grad", lambda *a: computed.append(1) or real(*a))
    w.requires_grad_(False)
    fn = lambda x, w, t: linear_cross_entropy(x, w, t, reduction="none")  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = fn(x, w, t)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    (gx,) = torch.autograd.grad(loss, (x,), upstream)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, want[1], rtol=1e-6, atol=1e-6)
    assert not computed


def test_all_targets_ignored_gives_zero_loss_and_gradients() -> None:
    x, w, t = _inputs()
    t.fill_(IGNORE_INDEX)
    loss, gx, gw = _loss_and_grads(linear_cross_entropy, x, w, t, "mean")
    assert loss.item() == 0.0 and not gx.any() and not gw.any()


def test_no_grad_computes_only_the_loss() -> None:
    x, w, t = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t)
    torch.testing.assert_close(loss, plain_linear_cross_entropy(x, w, t).detach())
    assert not loss.requires_grad


def test_bf16_autocast_matches_the_plain_path_under_autocast() -> None:
    """Under autocast both paths multiply in bf16 and take softmax in fp32, so they agree to bf16 rounding."""
    x, w, t = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = _loss_and_grads(lambda *a, **k: linear_cross_entropy(*a, **k, rows=64), x, w, t, "mean")
        plain = _loss_and_grads(plain_linear_cross_entropy, x, w, t, "mean")
    assert chunked[1].dtype == x.dtype and chunked[2].dtype == w.dtype
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_chunk_rows_keeps_chunks_small_but_efficient() -> None:
    assert chunk_rows(4096, 4096) == 1024  # 4 chunks of 4M fp32 logits
    assert chunk_rows(8192, 151_936) == 256  # a big vocabulary: never below the matmul-friendly floor
    assert chunk_rows(100, 4096) == 100


def _model(tied: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, depth=1, max_position_embeddings=64, tie_word_embeddings=tied)
    return Transformer(cfg)


def _plain_model_loss(
    model: Transformer, ids: torch.Tensor, targets: torch.Tensor, reduction: str
) -> torch.Tensor:
    return plain_linear_cross_entropy(model.hidden_states(ids), model.lm_head.weight, targets, reduction)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_model_loss_and_gradients_match_the_plain_path(tied: bool, reduction: str) -> None:
    model = _model(tied)
    ids = torch.randint(0, 320, (3, 40))
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    grads = []
    for fn in (
        lambda: model(ids, targets, reduction=reduction),
        lambda: _plain_model_loss(model, ids, targets, reduction),
    ):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.sum().backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    if not tied:
        assert "lm_head.weight" in fused_grads  # the untied head gets its own gradient
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_loss_under_torch_compile_matches_eager() -> None:
    pytest.importorskip("torch._inductor")
    from danlu.compiler import compiler_available

    if not compiler_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor")
    model = _model(tied=True)
    ids = torch.randint(0, 320, (2, 32))
    targets = ids.roll(-1, 1)
    targets[0, :5] = IGNORE_INDEX
    eager = model(ids, targets)
    eager.backward()
    eager_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(ids, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)
