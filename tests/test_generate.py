"""The static-shape decode step computes what the cache path computes, compiled or not."""

from __future__ import annotations

import pytest
import torch

from danlu.generate import Completion, Generator, SamplingParams, cache_length
from danlu.model import ModelConfig, Transformer
from tests.conftest import IdsTokenizer


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, depth=2, max_position_embeddings=64, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_matches_the_cache_path(tied: bool) -> None:
    model = _model(tie_word_embeddings=tied)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        reference = model.new_cache(2, 32)
        model(x[:, :8], cache=reference)
        static = model.new_cache(2, 32)
        model(x[:, :8], cache=static)
        for i in range(8, 20):
            want = model(x[:, i : i + 1], cache=reference)[:, -1]
            got = model.decode_step(x[:, i : i + 1], torch.tensor([i]), static.k, static.v)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for layer in range(2):  # the caches hold the same keys and values too
        torch.testing.assert_close(static.k[layer][:, :, :20], reference.k[layer][:, :, :20])


def test_cache_lengths_are_few() -> None:
    assert [cache_length(n, 512) for n in (1, 40, 256, 257, 512, 600)] == [256, 256, 256, 512, 512, 512]
    assert cache_length(100, 64) == 64


@pytest.mark.slow
def test_compiled_generation_gives_the_eager_tokens() -> None:
    model = _model()
    prompt = torch.randint(1, 300, (12,)).tolist()
    eager, compiled = Generator(model, IdsTokenizer()), Generator(model, IdsTokenizer(), compile=True)
    for params in (
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7),
    ):
        want, got = eager.generate([prompt], params)[0], compiled.generate([prompt], params)[0]
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    streamed = list(compiled.stream(prompt, SamplingParams(max_tokens=10, temperature=0.0)))
    assert "".join(s for s in streamed if isinstance(s, str)) == streamed[-1].text


def test_a_failing_compiler_falls_back_to_eager(capsys: pytest.CaptureFixture[str]) -> None:
    class CompileError(RuntimeError):  # what inductor raises without a working C++ toolchain
        __module__ = "torch._inductor.exc"

    model = _model()
    prompt = torch.randint(1, 300, (12,)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    compiled = Generator(model, IdsTokenizer(), compile=True)

    def broken(*args: object) -> torch.Tensor:
        raise CompileError("C++ compile error: cannot find a compiler")

    compiled._decode = compiled._decode_step = broken  # no compiler: every compiled graph fails
    got = compiled.generate([prompt], params)[0]
    assert isinstance(got, Completion)
    assert got.token_ids == Generator(model, IdsTokenizer()).generate([prompt], params)[0].token_ids
    assert "torch.compile failed" in capsys.readouterr().err
    assert compiled._decode is None


def test_compile_modes_are_checked() -> None:
    from danlu import DanluError
    from danlu.compiler import resolve_compile

    assert resolve_compile("on", "cpu") and not resolve_compile("off", "cuda")
    with pytest.raises(DanluError, match="compile must be auto, on or off, not 'yes'"):
        resolve_compile("yes", "cpu")


def test_decoding_compiles_for_many_rows_only() -> None:
    """Evaluation and RL probes compile their batch graph for a call of many generations (auto), never for a few
    (tests, small sets: the compilation would cost more than it saves); on and off decide alone."""
    from danlu.compiler import DECODE_ROWS_THAT_PAY, compile_decoding, compiler_available

    model = _model()
    assert compile_decoding("on", model, 1) and not compile_decoding("off", model, 10 * DECODE_ROWS_THAT_PAY)
    assert not compile_decoding("auto", model, DECODE_ROWS_THAT_PAY - 1)
    assert compile_decoding("auto", model, DECODE_ROWS_THAT_PAY) == compiler_available(torch.device("cpu"))


def test_sampling_follows_the_distribution_and_its_cuts() -> None:
    """Inverse-CDF sampling, rows drawn together: each row's frequencies match its softmax, tokens cut by top-k or
    top-p never come, and a row's draw depends on its own generator only (alone or beside other rows)."""
    from danlu.generate import _draw

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    n = 20_000
    counts = torch.zeros(2, 5)
    plain = SamplingParams(temperature=1.0)
    # n draws of one row in one call: the same generator n times gives n independent draws
    for row in range(2):
        g = torch.Generator().manual_seed(row + 1)
        counts[row] = torch.bincount(_draw(logits[row : row + 1].expand(n, 5), plain, [g] * n), minlength=5)
    expected = torch.softmax(logits, -1) * n
    # within 5 standard deviations of a binomial count, for every token of both rows
    tolerance = 5 * (expected * (1 - expected / n)).sqrt() + 1
    assert ((counts - expected).abs() <= tolerance).all(), (counts, expected)

    topk = SamplingParams(temperature=1.0, top_k=2)
    topp = SamplingParams(temperature=1.0, top_p=0.7)  # token 0 holds 0.64: tokens 0 and 1 reach 0.7
    g = torch.Generator().manual_seed(3)
    seen_k = {int(_draw(logits[:1], topk, [g])[0]) for _ in range(500)}
    seen_p = {int(_draw(logits[:1], topp, [g])[0]) for _ in range(500)}
    assert seen_k == {0, 1} and seen_p == {0, 1}

    alone = _draw(logits[1:], plain, [torch.Generator().manual_seed(9)])
    beside = _draw(logits, plain, [torch.Generator().manual_seed(4), torch.Generator().manual_seed(9)])
    assert int(alone[0]) == int(beside[1])
