"""The AI-text detector: metrics, class balance, training on the engine, the saved folder in transformers' pipeline,
zero-shot formulas against plain loops, the CLI, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from danlu import DanluError
from danlu.detect.metrics import HUMAN, MACHINE, auroc, report, threshold_at_fpr, tpr_at_fpr
from danlu.detect.texts import BalancedBatches, Text, clean_classes
from danlu.detect.train import DetectConfig, train_detector
from tests.conftest import make_checkpoint

transformers = pytest.importorskip("transformers")

WORDS = [
    "the",
    "a",
    "river",
    "mountain",
    "city",
    "capital",
    "highest",
    "longest",
    "of",
    "is",
    "in",
    "and",
    "which",
    "country",
    "people",
]


def human_like(n: int, seed: int = 0) -> list[Text]:
    """English word salad: one source."""
    rng = random.Random(seed)
    return [Text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + ".", HUMAN, f"h{i}")
            for i in range(n)]  # fmt: skip


def machine_like(n: int, seed: int = 1) -> list[Text]:
    """Arithmetic lines: a clearly different source."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append(Text(f"{a} + {b} = {a + b}. {a} × {b} = {a * b}。", MACHINE, f"m{i}"))
    return out


# ── metrics ──────────────────────────────────────────────────────────────────────────────────────────────────────


def test_auroc_equals_pair_counting_and_tpr_follows_its_definition() -> None:
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounded: ties happen
    labels = [rng.randint(0, 1) for _ in range(60)]
    pos = [s for s, y in zip(scores, labels) if y == MACHINE]
    neg = [s for s, y in zip(scores, labels) if y == HUMAN]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(pairs)
    # 200 human texts: at 1% FPR two of them may score above the threshold.
    human = [i / 200 for i in range(200)]
    t = threshold_at_fpr(human, 0.01)
    assert sum(h > t for h in human) == 2
    machine = [0.995, 0.992, 0.5, 0.1]
    s, y = human + machine, [HUMAN] * 200 + [MACHINE] * 4
    assert tpr_at_fpr(s, y) == pytest.approx(0.5)  # 0.995 and 0.992 lie above the 198th human score 0.985
    assert tpr_at_fpr([0.1, 0.9], [HUMAN, MACHINE]) == 1.0 and tpr_at_fpr([0.9, 0.1], [HUMAN, MACHINE]) == 0.0


def test_report_breaks_down_by_language_and_short_texts() -> None:
    texts = ["hello there friend", "你好朋友今天怎么样", "another english text", "中文的机器文本在这里"]
    rep = report([0.1, 0.2, 0.9, 0.8], [HUMAN, HUMAN, MACHINE, MACHINE], texts, [3, 60, 4, 70])
    assert rep["all"]["auroc"] == 1.0 and rep["all"]["n_human"] == 2
    assert rep["en"]["n_human"] == 1 and rep["zh"]["n_machine"] == 1
    assert rep["short_lt50"]["n_human"] == 1 and rep["short_lt50"]["n_machine"] == 1


# ── data policies ────────────────────────────────────────────────────────────────────────────────────────────────


def test_batches_are_class_balanced_and_cover_the_smaller_class_each_epoch() -> None:
    human = [[i + 1] for i in range(10)]
    machine = [[100 + i] for i in range(3)]
    src = BalancedBatches(human, machine, batch_size=4, pad_id=0, seed=0)
    seen_machine: list[int] = []
    for _ in range(3):  # 3 batches × 2 machine rows = 2 epochs of the 3 machine texts
        b = src.next_batch()
        assert b["labels"].tolist() == [HUMAN, HUMAN, MACHINE, MACHINE]
        seen_machine += b["input_ids"][2:, 0].tolist()
    assert sorted(seen_machine[:3]) == [100, 101, 102] and sorted(seen_machine[3:]) == [100, 101, 102]
    state = src.state_dict()
    again = BalancedBatches(human, machine, 4, 0, 0)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["input_ids"], src.next_batch()["input_ids"])  # exact resume
    with pytest.raises(DanluError, match="even"):
        BalancedBatches(human, machine, 3, 0, 0)


def test_ranks_read_their_own_slice_of_every_global_batch() -> None:
    """Under torchrun rank r of 3 reads the r-th slice of each class in every global batch: together the 3 read one
    process's batch of 3 × 4, across epochs of both classes; a saved position continues on 2 processes under the
    same global batch and is refused under another."""
    human = [[i + 1] for i in range(10)]
    machine = [[100 + i] for i in range(7)]
    one = BalancedBatches(human, machine, 12, 0, 3)
    ranks = [BalancedBatches(human, machine, 4, 0, 3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        want = one.next_batch()["input_ids"][:, 0].tolist()
        got = [r.next_batch()["input_ids"][:, 0].tolist() for r in ranks]
        assert [x for g in got for x in g[:2]] == want[:6] and [x for g in got for x in g[2:]] == want[6:]
    again = BalancedBatches(human, machine, 6, 0, 3, rank=1, world_size=2)
    again.load_state_dict(ranks[0].state_dict())
    want = one.next_batch()["input_ids"][:, 0].tolist()
    assert again.next_batch()["input_ids"][:, 0].tolist() == want[3:6] + want[9:]
    with pytest.raises(DanluError, match="global batches of 12 texts"):
        BalancedBatches(human, machine, 4, 0, 3).load_state_dict(ranks[0].state_dict())


def test_empty_or_far_smaller_class_and_shared_texts_are_refused_or_dropped() -> None:
    with pytest.raises(DanluError, match="no machine texts"):
        clean_classes(human_like(5), [], 10)
    with pytest.raises(DanluError, match=r"2 machine texts against 40 human texts, more than 10× fewer"):
        clean_classes(human_like(40), machine_like(2), 10)
    shared = Text("same words here.", HUMAN, "x")
    h, m = clean_classes([*human_like(4), shared], [*machine_like(4), Text(shared.text, MACHINE, "y")], 10)
    assert shared.text not in {r.text for r in h + m} and len(h) == 4 and len(m) == 4


# ── training, saving, scoring, pipeline ──────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, dict]:
    """A detector fine-tuned for a few steps on two clearly different sources (about 10 s on 2 cores)."""
    root = tmp_path_factory.mktemp("detect")
    backbone = make_checkpoint(root / "backbone", tiny_tokenizer, chat=False, depth=1, context=64)
    cfg = DetectConfig(max_tokens=48, eval_share=0.25, train={"steps": 40, "batch_size": 8, "lr": 3e-3,
                       "device": "cpu", "progress": False, "compile": "off"})  # fmt: skip
    result = train_detector(human_like(60), machine_like(60), backbone, root / "det", cfg)
    return root / "det", result


def test_a_few_steps_separate_two_sources_on_held_out_rows(trained) -> None:
    folder, result = trained
    held = result["heldout"]["all"]
    assert held["n_human"] == 15 and held["n_machine"] == 15
    assert held["auroc"] >= 0.95 > result["heldout_auroc_before"] - 0.2  # learnt, not there from the start
    saved = json.loads((folder / "heldout_eval.json").read_text())
    assert saved["all"]["auroc"] == held["auroc"]
    hist = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(h.get("event") == "eval" and "val_auroc" in h for h in hist)


def test_saved_detector_gives_the_same_probabilities_in_transformers_pipeline(trained) -> None:
    from danlu.detect.classifier import Detector

    folder, _ = trained
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "human", "1": "machine"}
    texts = [t.text for t in human_like(3, seed=7) + machine_like(3, seed=8)]
    ours = Detector.load(folder).probabilities(texts)
    clf = transformers.pipeline("text-classification", model=str(folder), device="cpu")
    theirs = clf(texts, top_k=None)
    for p, row in zip(ours, theirs):
        got = {d["label"]: d["score"] for d in row}
        assert set(got) == {"human", "machine"}
        assert got["machine"] == pytest.approx(p, abs=1e-5)
    assert sum(p > 0.5 for p in ours[3:]) == 3 and sum(p < 0.5 for p in ours[:3]) == 3


def test_texts_longer_than_the_context_keep_their_first_tokens(trained, tiny_tokenizer) -> None:
    from danlu.detect.classifier import Detector
    from danlu.detect.texts import encode

    folder, _ = trained
    det = Detector.load(folder)
    assert det.max_tokens == 48
    long = " ".join(["the river of the city"] * 80)
    ids = encode(det.tokenizer, long)
    assert len(ids) > 64  # beyond even the backbone's context
    head = det.probabilities_of_ids([ids[:48]])[0]
    assert det.probabilities([long])[0] == pytest.approx(head, abs=1e-6) and det.truncated == 1
    clf = transformers.pipeline("text-classification", model=str(folder), device="cpu")
    got = {d["label"]: d["score"] for d in clf([long], top_k=None, truncation=True)[0]}
    assert got["machine"] == pytest.approx(head, abs=1e-5)  # the saved model_max_length makes HF cut the same


@pytest.mark.parametrize("family", ["gpt_neox"])  # an untied output matrix (embed_out), not the native path
def test_an_hf_backbone_gives_an_hf_classifier_the_pipeline_loads(
    family: str, tmp_path: Path, tiny_tokenizer
) -> None:
    from danlu.detect.classifier import Detector
    from danlu.hf_model import HFCausalLM
    from danlu.io import save_model_dir

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=tiny_tokenizer.padded_vocab_size(64), hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, rotary_pct=0.5)  # fmt: skip
    model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg))
    save_model_dir(tmp_path / "neox", model.state_dict(), model.config, tiny_tokenizer, {"stage": "test"})
    dcfg = DetectConfig(max_tokens=32, eval_share=0.2, train={"steps": 6, "batch_size": 4, "device": "cpu",
                        "progress": False, "compile": "off"})  # fmt: skip
    train_detector(human_like(10), machine_like(10), tmp_path / "neox", tmp_path / "det", dcfg)
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "det" / "model.safetensors"), "pt") as f:
        assert "score.weight" in f.keys() and not any(k.startswith("embed_out") for k in f.keys())  # noqa: SIM118
    texts = ["the city of the river.", "12 + 3 = 15."]
    ours = Detector.load(tmp_path / "det").probabilities(texts)
    clf = transformers.pipeline("text-classification", model=str(tmp_path / "det"), device="cpu")
    for p, row in zip(ours, clf(texts, top_k=None)):
        assert {d["label"]: d["score"] for d in row}["machine"] == pytest.approx(p, abs=1e-5)


def test_a_tokenizer_that_does_not_fit_the_backbone_is_refused(tmp_path: Path, tiny_tokenizer) -> None:
    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=256, depth=1, max_position_embeddings=64
    )  # fewer rows than the tokenizer's 400
    save_model_dir(tmp_path / "b", Transformer(cfg).state_dict(), cfg, tiny_tokenizer, {"stage": "test"})
    dcfg = DetectConfig(train={"steps": 1, "batch_size": 2, "device": "cpu", "progress": False})
    with pytest.raises(DanluError, match="tokenizer has 400 tokens but the model's embedding has only 256"):
        train_detector(human_like(4), machine_like(4), tmp_path / "b", tmp_path / "det", dcfg)


# ── zero-shot ────────────────────────────────────────────────────────────────────────────────────────────────────


def _loop_fast_detectgpt(score: torch.Tensor, ref: torch.Tensor, labels: list[int]) -> float:
    ll = mu = var = 0.0
    for t, x in enumerate(labels):
        lp = torch.log_softmax(score[t].double(), -1).tolist()
        q = torch.softmax(ref[t].double(), -1).tolist()
        ll += lp[x]
        m = sum(qv * lv for qv, lv in zip(q, lp))
        mu += m
        var += sum(qv * lv * lv for qv, lv in zip(q, lp)) - m * m
    return (ll - mu) / math.sqrt(var)


def _loop_binoculars(observer: torch.Tensor, performer: torch.Tensor, labels: list[int]) -> float:
    nll = xent = 0.0
    for t, x in enumerate(labels):
        lp = torch.log_softmax(performer[t].double(), -1).tolist()
        p_obs = torch.softmax(observer[t].double(), -1).tolist()
        nll -= lp[x]
        xent -= sum(a * b for a, b in zip(p_obs, lp))
    return (nll / len(labels)) / (xent / len(labels))


def test_zero_shot_formulas_equal_plain_loops() -> None:
    from danlu.detect.zeroshot import binoculars, fast_detectgpt

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, 11, generator=g) * 2, torch.randn(2, 7, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[1, 4:] = -100  # the second row is shorter (padding)
    fd, bi = fast_detectgpt(a, b, labels), binoculars(a, b, labels)
    for r, n in ((0, 7), (1, 4)):
        ids = labels[r, :n].tolist()
        assert fd[r].item() == pytest.approx(_loop_fast_detectgpt(a[r], b[r], ids), rel=1e-4)
        assert bi[r].item() == pytest.approx(_loop_binoculars(a[r], b[r], ids), rel=1e-4)


def test_zero_shot_scores_batched_equal_one_by_one_and_refuse_mismatched_tokenizers(
    tmp_path: Path, tiny_tokenizer
) -> None:
    from danlu.detect.zeroshot import ZeroShot, open_zero_shot
    from danlu.io import load_checkpoint
    from danlu.tokenizer import Tokenizer
    from tests.conftest import SAMPLE_TEXT

    make_checkpoint(tmp_path / "a", tiny_tokenizer, chat=False, seed=1)
    make_checkpoint(tmp_path / "b", tiny_tokenizer, chat=False, seed=2)
    texts = [
        "The capital of Japan is Tokyo.",
        "12 + 34 = 46.",
        "中国最高的山是珠穆朗玛峰。日本的首都是东京。",
    ]
    for method in ("fast-detectgpt", "binoculars"):
        z = open_zero_shot(method, tmp_path / "a", tmp_path / "b")
        together = z.raw_scores(texts)
        alone = [z.raw_scores([t])[0] for t in texts]
        assert together == pytest.approx(alone, rel=1e-4)
        assert z.scores(texts) == pytest.approx(
            together if method == "fast-detectgpt" else [-v for v in together]
        )
    other = Tokenizer.train(SAMPLE_TEXT, vocab_size=300)
    make_checkpoint(tmp_path / "c", other, chat=False)
    a, c = load_checkpoint(tmp_path / "a", quiet=True), load_checkpoint(tmp_path / "c", quiet=True)
    with pytest.raises(DanluError, match="tokenizer of .* differs"):
        ZeroShot("binoculars", a, c)
    with pytest.raises(DanluError, match="known methods"):
        ZeroShot("detectgpt", a)


# ── the command ──────────────────────────────────────────────────────────────────────────────────────────────────


def test_cli_train_with_generated_machine_text_then_score_and_eval(
    tmp_path: Path, tiny_checkpoint, capsys
) -> None:
    from danlu.cli import main

    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({"text": t.text}) + "\n" for t in human_like(12)), encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"instruction": f"Say something about {w}."}) + "\n" for w in WORDS[:9])
    )
    out = tmp_path / "det"
    code = main(["detect", "train", "--human", str(human), "--generate-with", str(tiny_checkpoint),
                 "--prompts", str(prompts), "--out", str(out), "steps=3", "batch_size=4", "max_tokens=32",
                 "device=cpu", "progress=false", "eval_share=0.2"])  # fmt: skip
    assert code == 0
    generated = [json.loads(x) for x in (tmp_path / "det.generated.jsonl").read_text().splitlines()]
    assert {g["meta"]["temperature"] for g in generated} == {0.7, 1.0, 0.3}
    assert json.loads((out / "danlu.json").read_text())["backbone"] == str(tiny_checkpoint)
    capsys.readouterr()
    assert main(["detect", "score", str(out), "a human sentence.", str(human)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 13 and all(0 <= x["p_machine"] <= 1 for x in lines)
    assert (
        main(["detect", "score", "--zero-shot", "binoculars", "--model", str(tiny_checkpoint), "hello"]) == 0
    )
    assert "score" in json.loads(capsys.readouterr().out)
    machine = tmp_path / "det.generated.jsonl"
    assert main(["detect", "eval", str(out), "--human", str(human), "--machine", str(machine),
                 "--out", str(tmp_path / "r.json")]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["all"]["n_human"] == 12 and rep["all"]["n_machine"] == len(generated)
    assert (
        main(["detect", "train", "--human", str(human), "--out", str(tmp_path / "x")]) == 2
    )  # no machine, no --from
    assert "--from" in capsys.readouterr().err


# ── the server route ─────────────────────────────────────────────────────────────────────────────────────────────


def test_server_detect_route_scores_texts_and_refuses_bad_input(trained, tiny_checkpoint) -> None:
    from fastapi.testclient import TestClient

    from danlu.detect.classifier import Detector
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.routing import load_served_model

    folder, _ = trained
    det = Detector.load(folder)
    models = [load_served_model("tiny", str(tiny_checkpoint))]
    try:
        with TestClient(create_app(models, ServeOptions(detector=det))) as client:
            texts = ["the river of the city.", "12 + 30 = 42. 2 × 3 = 6。", " ".join(["the city"] * 200)]
            r = client.post("/v1/detect", json={"input": texts})
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert [d["p_machine"] for d in data] == pytest.approx(det.probabilities(texts), abs=1e-6)
            assert [d["truncated"] for d in data] == [False, False, True] and data[1]["label"] == "machine"
            one = client.post("/v1/detect", json={"input": "the river."}).json()["data"]
            assert len(one) == 1 and one[0]["index"] == 0
            assert "/v1/detect" in client.app.openapi()["paths"]  # documented in the schema
            for bad in ({"input": []}, {"input": ""}, {"input": ["x"] * 65}, {"input": 3}, {}):
                r = client.post("/v1/detect", json=bad)
                assert r.status_code == 400 and "error" in r.json(), bad
        with TestClient(create_app(models, ServeOptions())) as client:
            r = client.post("/v1/detect", json={"input": "hello"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "detector_off"
    finally:
        for m in models:
            m.worker.close()
