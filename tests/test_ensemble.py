"""Ensembles: weighted averages of next-token log-probs, driven by the Generator, the evaluators and the CLI."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_checkpoint

from danlu import DanluError
from danlu.ensemble import EnsembleModel, load_ensemble, parse_members
from danlu.generate import Completion, Generator, SamplingParams
from danlu.io import load_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("ens")
    return [make_checkpoint(root / n, tiny_tokenizer, depth=1, seed=s) for n, s in (("a", 1), ("b", 2))]


def prompt(tok) -> list[int]:
    return tok.render_chat([{"role": "user", "content": "中国最高的山是什么?"}], add_generation_prompt=True)[
        0
    ]


def test_ensemble_with_itself_generates_what_the_model_does(pair):
    ck = load_checkpoint(pair[0], quiet=True)
    ens = EnsembleModel([ck.model, ck.model], ck.tokenizer.vocab_size, [0.3, 0.7])
    ids = prompt(ck.tokenizer)
    for params in (
        SamplingParams(max_tokens=24, temperature=0),
        SamplingParams(max_tokens=24, seed=3, top_p=0.9),
    ):
        want = Generator(ck.model, ck.tokenizer).generate([ids], params)[0]
        got = Generator(ens, ck.tokenizer).generate([ids], params)[0]
        assert got.token_ids == want.token_ids and len(got.token_ids) > 0
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        streamed = list(Generator(ens, ck.tokenizer).stream(ids, params))
        assert isinstance(streamed[-1], Completion) and streamed[-1].token_ids == want.token_ids
        assert "".join(s for s in streamed[:-1]) == want.text


def test_ensemble_scores_are_the_weighted_average_of_log_probs(pair):
    a, b = (load_checkpoint(p, quiet=True) for p in pair)
    v = a.tokenizer.vocab_size
    ens = EnsembleModel([a.model, b.model], v, [3, 1])
    x = torch.tensor([prompt(a.tokenizer)])
    with torch.no_grad():
        la, lb = (F.log_softmax(m.model(x)[..., :v].float(), -1) for m in (a, b))
        scores = ens(x)
        assert scores.shape[-1] == a.model.config.vocab_size and bool((scores[..., v:] == -math.inf).all())
        assert torch.allclose(scores[..., :v], 0.75 * la + 0.25 * lb, atol=1e-6)
        last = ens.hidden_states(x)[..., :v]  # what the Generator reads for the next token
        want = (0.75 * la + 0.25 * lb)[:, -1]
        assert last.shape == (1, 1, v) and torch.allclose(last[:, 0], want, atol=1e-6)
        mix = EnsembleModel([a.model, b.model], v, [3, 1], mode="prob")(x)[..., :v]
        assert torch.allclose(mix.exp(), 0.75 * la.exp() + 0.25 * lb.exp(), atol=1e-6)
        y = torch.roll(x, -1, 1)
        loss = ens(x, y, reduction="none")
        assert torch.allclose(
            loss, -F.log_softmax(0.75 * la + 0.25 * lb, -1).gather(-1, y[..., None])[..., 0], atol=1e-5
        )


def test_batched_generation_matches_one_by_one(pair):
    ck = load_ensemble([str(p) for p in pair], [1, 1])
    gen = Generator(ck.model, ck.tokenizer)
    tok = ck.tokenizer
    prompts = [prompt(tok), [tok.bos_id, *tok.encode("The capital of Japan is")]]
    params = SamplingParams(max_tokens=12, temperature=0)
    batch = gen.generate(prompts, params)
    for p, c in zip(prompts, batch):
        assert gen.generate([p], params)[0].token_ids == c.token_ids


def test_refusals(pair, tmp_path):
    from danlu.tokenizer import Tokenizer

    other = make_checkpoint(tmp_path / "o", Tokenizer.train([t[::-1] for t in SAMPLE_TEXT], vocab_size=380))
    with pytest.raises(DanluError, match=r"different tokenizers: token id \d+"):
        load_ensemble([str(pair[0]), str(other)])
    with pytest.raises(DanluError, match=r"2 weight\(s\) for 3 models"):
        parse_members("a,b,c", "0.5,0.5")
    with pytest.raises(DanluError, match=r"two or more checkpoints"):
        parse_members("a")
    with pytest.raises(DanluError, match=r"each must be >= 0"):
        load_ensemble([str(p) for p in pair], [1, -1])


def test_cli_generate_and_eval_with_an_ensemble(pair, capsys, tmp_path):
    from danlu.cli import main

    spec = ",".join(str(p) for p in pair)
    assert main(["generate", "--ensemble", spec, "--weights", "0.6,0.4", "hello", "--max-tokens", "5",
                 "--temperature", "0"]) == 0  # fmt: skip
    assert "tokens, finish" in capsys.readouterr().err
    data = tmp_path / "text.txt"
    data.write_text("\n".join(SAMPLE_TEXT[:4]))
    assert main(["eval", "--ensemble", spec, "--task", "bpb", "--data", str(data), "--device", "cpu"]) == 0
    assert "bpb" in capsys.readouterr().out


def test_served_ensemble(pair):
    from danlu.serve.routing import load_served_ensemble, parse_ensembles

    specs = parse_ensembles([f"duo={pair[0]},{pair[1]}"], ["duo=2,1"], taken=["solo"])
    assert specs == [("duo", [str(pair[0]), str(pair[1])], [2.0, 1.0])]
    with pytest.raises(DanluError, match="given twice"):
        parse_ensembles([f"solo={pair[0]},{pair[1]}"], [], taken=["solo"])
    with pytest.raises(DanluError, match="no ensemble named"):
        parse_ensembles([f"duo={pair[0]},{pair[1]}"], ["trio=1,1"], taken=[])
    served = load_served_ensemble("duo", specs[0][1], specs[0][2])
    try:
        assert served.card()["id"] == "duo" and served.meta["ensemble"]["weights"] == pytest.approx(
            [2 / 3, 1 / 3]
        )

        async def ask() -> list:
            job = served.worker.submit(prompt(served.tokenizer), SamplingParams(max_tokens=6, temperature=0))
            return [item async for item in served.worker.iterate(job)]

        out = asyncio.run(ask())
        assert isinstance(out[-1], Completion) and out[-1].prompt_tokens > 0
    finally:
        served.worker.close()


def test_best_of_n_picks_the_answer_the_reward_model_scores_best(pair, tmp_path, capsys):
    """Best-of-n across models: every member samples n answers, the reward model scores each whole conversation,
    and the highest wins — the same scores the scorer gives those conversations on its own; the CLI agrees."""
    from danlu.cli import main
    from danlu.ensemble import best_of_n
    from danlu.rewards import RewardModel, RewardModelScorer, save_reward_model

    members = [load_checkpoint(p, quiet=True) for p in pair]
    torch.manual_seed(3)
    rm = RewardModel.from_policy(members[0].model).eval()
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # a random but decisive judge
    scorer = RewardModelScorer(rm, members[0].tokenizer)
    messages = [{"role": "user", "content": "中国最高的山是什么？"}]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    best, candidates = best_of_n(members, scorer, messages, params, n=3)
    assert len(candidates) == 6 and {c.member for c in candidates} == {0, 1}
    again = scorer.score(
        [[*messages, {"role": "assistant", "content": c.completion.text}] for c in candidates]
    )
    assert [c.score for c in candidates] == pytest.approx(again)
    assert best.score == max(again) and len({c.completion.text for c in candidates}) > 1

    folder = tmp_path / "rm"
    save_reward_model(folder, rm.state_dict(), rm.config, members[0].tokenizer, {"stage": "test"})
    code = main(["generate", "--ensemble", ",".join(map(str, pair)), "--best-of", str(folder), "--n", "3", "--chat",
                 "--max-tokens", "8", "--temperature", "1", "--seed", "7", "中国最高的山是什么？"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0 and out.out.strip() == best.completion.text.strip()
    assert out.err.count("\n") >= 6 and "*" in out.err
    assert main(["generate", "--ensemble", ",".join(map(str, pair)), "--best-of", str(folder), "hi"]) == 2
    assert "--best-of needs --ensemble A,B (the models) and --chat" in capsys.readouterr().err
