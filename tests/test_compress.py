"""Compression (issue 18): importance, pruning, the KD loss, distillation, quantization, subset, the pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from danlu import DanluError
from danlu.compress.importance import measure_importance
from danlu.compress.prune import TargetShape, prune, shape_for_ratio, student_config
from danlu.model import ModelConfig, Transformer
from tests.conftest import IdsTokenizer


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=448, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 400, (4, 24), generator=g)} for _ in range(n)]


def test_pruning_nothing_gives_the_teachers_logits_exactly() -> None:
    torch.manual_seed(0)
    teacher = Transformer(small_config()).eval()
    scores = measure_importance(teacher, batches())
    student, plan = prune(teacher, scores, TargetShape())
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(ids), teacher(ids))
    assert plan.layers == [0, 1, 2]


def test_importance_picks_planted_dead_head_channel_layer_and_embedding_channel() -> None:
    torch.manual_seed(0)
    model = Transformer(small_config(num_hidden_layers=4)).eval()
    hd = model.config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 2 * hd : 3 * hd] = (
            0  # head 2 of layer 0 adds nothing
        )
        model.model.layers[1].mlp.up_proj.weight[77] = 0  # channel 77 of layer 1 is always 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # layer 2 is the identity
        model.model.layers[2].mlp.down_proj.weight.zero_()
        for m in model.modules():  # hidden channel 9 is zeroed by every norm
            if type(m).__name__ == "RMSNorm" and m.weight.numel() == 128:
                m.weight[9] = 0
    s = measure_importance(model, batches())
    assert int(s.heads[0].argmin()) == 2 and float(s.heads[0, 2]) == 0.0
    assert int(s.channels[1].argmin()) == 77 and float(s.channels[1, 77]) == 0.0
    assert int(s.layers.argmin()) == 2 and float(s.layers[2]) < 1e-6 < float(s.layers.sort().values[1])
    assert int(s.embedding.argmin()) == 9
    target = TargetShape(hidden_size=96, intermediate_size=224, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2)  # fmt: skip
    student, plan = prune(model, s, target)
    assert plan.layers == [0, 1, 3]
    assert 2 not in plan.heads[0] and 77 not in plan.channels[1] and 9 not in plan.embedding
    assert student(batches(1)[0]["input_ids"]).shape == (4, 24, 448)


def test_pruned_checkpoint_loads_in_danlu_and_transformers(tmp_path, tiny_tokenizer) -> None:
    from transformers import LlamaForCausalLM

    from danlu.io import load_checkpoint, save_model_dir

    torch.manual_seed(0)
    teacher = Transformer(small_config()).eval()
    target = TargetShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)  # fmt: skip
    student, _ = prune(teacher, measure_importance(teacher, batches()), target)
    save_model_dir(tmp_path / "s", student.state_dict(), student.config, tiny_tokenizer, {"stage": "test"})
    ckpt = load_checkpoint(tmp_path / "s", quiet=True)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        ours = student(ids)
        assert torch.equal(ckpt.model(ids), ours)
        assert torch.allclose(hf(ids).logits, ours, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (dict(hidden_size=100), "not a multiple of 32"),
        (dict(intermediate_size=512), "larger than the teacher's 256"),
        (dict(num_hidden_layers=0), "must be a positive whole number"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "not a multiple of num_key_value_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=1), "more than the teacher's 2"),
    ],
)
def test_target_shapes_that_cannot_be_cut_are_refused(shape: dict, message: str) -> None:
    with pytest.raises(DanluError, match=message):
        student_config(small_config(), TargetShape(**shape))


def test_ratio_gives_a_student_about_that_much_smaller() -> None:
    cfg = ModelConfig(depth=12)
    student = student_config(cfg, shape_for_ratio(cfg, 10))
    ratio = cfg.num_params(embeddings=False) / student.num_params(embeddings=False)
    assert 7 <= ratio <= 14 and student.hidden_size % 64 == 0 and student.intermediate_size % 64 == 0
    with pytest.raises(DanluError, match="ratio"):
        shape_for_ratio(cfg, 0.5)


def test_a_ratio_beyond_the_smallest_cuttable_student_is_refused_with_the_best_possible() -> None:
    with pytest.raises(
        DanluError, match=r"compress.ratio=200: .* is only 17.9× smaller; choose compress.ratio ≤ 17.9"
    ):
        shape_for_ratio(small_config(), 200)
    assert shape_for_ratio(small_config(), 8, multiple=32).num_hidden_layers >= 1  # within reach: no error


# ── the KD loss ──────────────────────────────────────────────────────────────────────────────────────────────


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):  # noqa: ANN001, ANN201
    """TRL's GKDTrainer.generalized_jsd_loss (reduction="batchmean" with labels), as TRL writes it."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def test_kd_loss_equals_the_formula_and_trls_generalized_jsd_at_its_beta_limits() -> None:
    from danlu.losses import generalized_jsd, kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    mask = labels != -100
    temp = 2.0
    p_t, p_s = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    per_token = (p_t * (p_t.log() - p_s.log())).sum(-1)  # KL(teacher‖student), written out
    expected = temp**2 * per_token[mask].mean()
    assert torch.allclose(kd_loss(s, t, mask, temp), expected, atol=1e-5)
    for beta in (0.0, 1.0, 0.5):
        ours = generalized_jsd(s, t, mask, beta=beta, temperature=temp)
        assert torch.allclose(ours, trl_generalized_jsd(s, t, labels, beta, temp), atol=1e-5), beta
    rev = (p_s * (p_s.log() - p_t.log())).sum(-1)[mask].mean()
    assert torch.allclose(generalized_jsd(s, t, mask, beta=1.0, temperature=temp), rev, atol=1e-5)
    assert float(kd_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)


def test_a_few_distillation_steps_lower_heldout_kl(tmp_path, tiny_tokenizer) -> None:
    from conftest import SAMPLE_TEXT

    from danlu.compress.distill import DistillConfig, PackedRows, distill, heldout_kl
    from danlu.engine import TrainConfig

    torch.manual_seed(0)
    teacher = Transformer(small_config(initializer_range=0.1)).eval()
    data = PackedRows.from_texts(tiny_tokenizer, SAMPLE_TEXT[:40], 32, 4)
    held = PackedRows.from_texts(tiny_tokenizer, SAMPLE_TEXT[40:], 32, 1)
    target = TargetShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    student, _ = prune(teacher, measure_importance(teacher, data.sequential()), target)
    before = heldout_kl(student, teacher, held.sequential())
    tcfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, device="cpu", dtype="fp32", compile="off",
                       eval_every=0, save_minutes=0, progress=False, log_every=4)  # fmt: skip
    res = distill(student, teacher, data, tmp_path / "d", tcfg=tcfg, cfg=DistillConfig(temperature=2.0),
                  tokenizer=tiny_tokenizer, meta={"stage": "test"}, eval_rows=held)  # fmt: skip
    assert res["heldout_kl_before"] == pytest.approx(before, rel=1e-4)
    assert res["heldout_kl_after"] < 0.9 * before
    assert (tmp_path / "d" / "model.safetensors").exists()
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_and_student_tokenizers_must_match(tiny_tokenizer) -> None:
    from danlu.compress.distill import check_same_tokenizer
    from danlu.tokenizer import Tokenizer

    check_same_tokenizer(tiny_tokenizer, tiny_tokenizer, "here")
    other = Tokenizer.train(["completely different words only here"] * 30, vocab_size=300)
    with pytest.raises(DanluError, match="tokenizers differ"):
        check_same_tokenizer(tiny_tokenizer, other, "compress")


# ── quantization ─────────────────────────────────────────────────────────────────────────────────────────────


def test_int8_and_int4_round_trip_errors_stay_within_their_bounds() -> None:
    from danlu.compress.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * torch.linspace(0.01, 2, 96)[:, None]
    w[3, 5] = 40.0  # an outlier row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())  # |w - ŵ| ≤ scale / 2 per row
    packed, scales, mins = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 64) and scales.shape == (96, 4)
    err4 = (dequantize_int4(packed, scales, mins) - w).abs().view(96, 4, 32)
    bound = scales.float()[..., None] / 2 + mins.float().abs()[..., None] * 2**-10 + 1e-6
    assert bool((err4 <= bound).all())
    assert float(err4.mean()) > float(err.mean())  # 4 bits lose more than 8
    with pytest.raises(DanluError, match="group size"):
        quantize_int4(w, 48)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_runs_saves_and_reloads(tmp_path, tiny_tokenizer, bits: int) -> None:
    from danlu.compress.quantize import (
        QuantLinear,
        load_quantized,
        quantize_model,
        save_quantized,
        state_bytes,
    )
    from danlu.generate import Generator, SamplingParams
    from danlu.io import load_checkpoint

    torch.manual_seed(0)
    model = Transformer(small_config()).eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        ref = model(ids)
        fp_bytes = state_bytes(model)
        q = quantize_model(model, bits, 32)
        out = q(ids)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.01 if bits == 8 else 0.12)  # rms error of a uniform step: range/15/√12 ≈ 8% of σ at int4
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 3 * 7
    assert state_bytes(q) < fp_bytes * (0.45 if bits == 8 else 0.35)
    save_quantized(q, tmp_path / "q", tiny_tokenizer, {"stage": "test"})
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == bits
    ckpt = load_quantized(tmp_path / "q")
    assert torch.equal(load_checkpoint(tmp_path / "q", quiet=True).model(ids), out)  # every tool reads it
    with torch.no_grad():
        assert torch.equal(ckpt.model(ids), out)
    text = Generator(ckpt.model, tiny_tokenizer).generate(
        [[1, 5, 6]], SamplingParams(max_tokens=4, temperature=0)
    )
    assert len(text[0].token_ids) >= 1
    with pytest.raises(DanluError, match="group_size"):
        quantize_model(Transformer(small_config()), 4, 96)


# ── subset, memory, pipeline ─────────────────────────────────────────────────────────────────────────────────


def test_subset_is_balanced_and_drops_near_duplicates() -> None:
    from danlu.compress.subset import SubsetConfig, select_subset

    rows = [{"text": f"river number {i} flows past the town of {i * 7} and then into the sea", "domain": "geo"}
            for i in range(200)]  # fmt: skip
    dup = (
        "the same long sentence about the weather repeated many times with only one number changed at the end"
    )
    rows += [{"text": f"{dup} {i}", "domain": "weather"} for i in range(50)]
    rows += [{"text": "".join(chr(0x4E00 + (i * 131 + j * 17) % 2000) for j in range(30)), "domain": "story"}
             for i in range(20)]  # fmt: skip
    picked, report = select_subset(rows, SubsetConfig(rows=60, threshold=0.7))
    assert report["rows_picked"] == 60
    assert report["by_domain"]["weather"] == 1  # 50 near-copies count once
    assert report["by_domain"]["story"] >= 5 and report["by_domain"]["geo"] >= 30
    assert report["near_duplicates_skipped"] >= 20  # a weather copy is tried (and skipped) every round
    again, _ = select_subset(rows, SubsetConfig(rows=60, threshold=0.7))
    assert again == picked  # deterministic for a seed


def test_teacher_too_large_for_memory_is_refused(tiny_checkpoint) -> None:
    from danlu.compress.pipeline import teacher_memory

    need = teacher_memory(tiny_checkpoint, available=2**40)
    assert need > 0
    with pytest.raises(DanluError, match=r"needs about .* GiB"):
        teacher_memory(tiny_checkpoint, available=need // 2)


def _texts_file(tmp_path):  # noqa: ANN001, ANN202
    from conftest import SAMPLE_TEXT

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(SAMPLE_TEXT)))
    return texts


def _train_config(steps: int):  # noqa: ANN202
    from danlu.engine import TrainConfig

    return TrainConfig(steps=steps, batch_size=4, device="cpu", dtype="fp32", compile="off", eval_every=0,
                       save_minutes=0, progress=False)  # fmt: skip


def test_a_student_with_another_tokenizer_is_refused(tmp_path, tiny_tokenizer) -> None:
    from conftest import make_checkpoint

    from danlu.compress.pipeline import CompressConfig, run_compress
    from danlu.tokenizer import Tokenizer

    teacher = make_checkpoint(tmp_path / "teacher", tiny_tokenizer, depth=2, chat=False)
    other = Tokenizer.train(["completely different words only here 完全不同"] * 30, vocab_size=300)
    student = make_checkpoint(tmp_path / "student", other, depth=1, chat=False)
    cfg = CompressConfig(data=str(_texts_file(tmp_path)), student=str(student), decode_tokens=0)
    with pytest.raises(DanluError, match=r"compress.student=.*student: the teacher's and the student's tokenizers "
                                         r"differ .*compares the two distributions token by token"):  # fmt: skip
        run_compress(teacher, tmp_path / "out", cfg, _train_config(1))
    with pytest.raises(DanluError, match="compress.multiple=48: must be a multiple of 32"):
        run_compress(teacher, tmp_path / "out", CompressConfig(data=str(_texts_file(tmp_path)), multiple=48),
                     _train_config(1))  # fmt: skip


def test_compress_pipeline_writes_every_step_and_its_report(tmp_path, tiny_tokenizer) -> None:
    from conftest import make_checkpoint

    from danlu.compress.pipeline import CompressConfig, run_compress, summary
    from danlu.config import from_dict
    from danlu.io import load_checkpoint

    teacher = make_checkpoint(tmp_path / "teacher", tiny_tokenizer, depth=2, chat=False)
    texts = _texts_file(tmp_path)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "中国最高的山是", "answer": "珠穆朗玛峰", "lang": "zh", "split": "test"})
                     + "\n" + json.dumps({"prompt": "日本的首都是", "answer": "东京", "split": "dev"}) + "\n")  # fmt: skip
    cfg = from_dict(CompressConfig, {
        "data": str(texts), "eval_data": str(texts), "facts": str(facts), "eval_tokens": 2000, "decode_tokens": 4,
        "shape": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
                  "num_key_value_heads": 1},
        "subset": {"rows": 40}, "prune": {"calibration_rows": 8, "seq_len": 32},
        "distill": {"seq_len": 32}, "quantize": {"bits": [8, 4], "group_size": 32},
        "factorize": {"enabled": True, "energy": 0.5, "heal_steps": 2},
        "share": {"enabled": True, "heal_steps": 2}, "gguf": ["q8_0"],
    }, "compress")  # fmt: skip
    result = run_compress(teacher, tmp_path / "out", cfg, _train_config(3))
    names = [r["model"] for r in result["rows"]]
    assert names == [
        "teacher",
        "pruned",
        "distilled",
        "scratch",
        "low-rank",
        "shared",
        "int8",
        "int4",
        "gguf q8_0",
    ]
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["pruned"]["non_embedding_params"] < rows["teacher"]["non_embedding_params"] / 4
    assert rows["scratch"]["non_embedding_params"] == rows["distilled"]["non_embedding_params"]
    assert result["scratch"]["tokens"] == result["distill"]["tokens"] == 3 * 4 * 32  # equal token budgets
    assert (
        rows["int8"]["bytes"] < rows["distilled"]["bytes"] and rows["int4"]["bytes"] < rows["int8"]["bytes"]
    )
    for name in ("low-rank", "shared"):  # each option measured against the distilled student and judged
        assert rows[name]["non_embedding_params"] < rows["distilled"]["non_embedding_params"]
        assert isinstance(result[name]["pays"], bool) and result[name]["heal"]["steps"] == 2
    assert result["shared"]["pairs"] == [[0, 1]]
    models = [r for r in result["rows"] if not r["model"].startswith("gguf")]
    assert all(math.isfinite(r["val_bpb"]) and r["decode_tokens_per_s"] > 0 for r in models)
    assert all(
        r["fact_rows"] == 1 and r["fact_split"] == "test" for r in models
    )  # the dev row is never scored
    assert (
        result["subset"]["rows_picked"] < 20
    )  # 4 texts × 20 numbered copies: the copies are near-duplicates
    for step in ("pruned", "distilled", "scratch"):
        assert load_checkpoint(tmp_path / "out" / step, quiet=True).config.hidden_size == 64
    gguf = result["gguf"]["q8_0"]
    assert (
        gguf["bytes"] == (tmp_path / "out" / "gguf").joinpath(gguf["path"].rsplit("/", 1)[1]).stat().st_size
    )
    assert gguf["bytes"] < rows["distilled"]["bytes"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| int4 |" in report and "| scratch |" in report and "decode tok/s" in report
    assert summary(result)["scratch_tokens"] == 3 * 4 * 32


# ── low-rank factorization and block sharing (options) ───────────────────────────────────────────────────────


def test_count_params_matches_the_config_for_a_plain_model() -> None:
    from danlu.compress.sizes import count_params

    for tied in (True, False):
        model = Transformer(small_config(tie_word_embeddings=tied))
        assert count_params(model) == model.config.num_params()
        assert count_params(model, embeddings=False) == model.config.num_params(embeddings=False)


def test_rank_by_energy_recovers_a_planted_rank_and_refuses_a_bad_energy() -> None:
    from danlu.compress.lowrank import factorize_weight, rank_for_energy

    assert rank_for_energy(torch.tensor([3.0, 4.0, 0.0]), 1.0) == 2  # 9 + 16 = all of the energy
    assert rank_for_energy(torch.tensor([3.0, 4.0, 0.0]), 0.36) == 1  # σ₁² = 9 of 25
    assert rank_for_energy(torch.tensor([3.0, 4.0, 0.0]), 0.37) == 2
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 6, generator=g) @ torch.randn(6, 128, generator=g)  # rank 6
    a, b = factorize_weight(w, None, 0.9999)
    assert a.shape == (6, 128) and b.shape == (96, 6)
    assert torch.allclose(b @ a, w, atol=1e-4)
    assert factorize_weight(torch.randn(32, 32, generator=g), None, 0.9999) is None  # full rank: no saving
    with pytest.raises(DanluError, match=r"energy=1.5: must be in \(0, 1\]"):
        rank_for_energy(torch.ones(3), 1.5)


def test_activation_aware_svd_beats_plain_svd_on_the_layers_outputs() -> None:
    from danlu.compress.lowrank import factorize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    scale = torch.ones(64)
    scale[:4] = 30.0  # four input channels carry most of the activation: their columns matter most
    x = torch.randn(512, 64, generator=g) * scale
    errors = {}
    for name, s in (("plain", None), ("aware", scale)):
        a, b = factorize_weight(
            w, s, 1.0, rank=8
        )  # the same rank: which 8 directions are kept is the difference
        assert a.shape == (8, 64)
        errors[name] = float((x @ (b @ a).T - x @ w.T).norm() / (x @ w.T).norm())
    assert errors["aware"] < 0.5 * errors["plain"]
    assert (
        factorize_weight(w, scale, 0.9)[0].size(0) <= 8
    )  # 90% of the weighted energy sits in a few directions
    assert (
        factorize_weight(w, None, 0.9) is None
    )  # a random matrix's flat spectrum: no rank at 90% saves anything


def test_factorized_model_tracks_the_dense_one_and_decodes_with_a_cache() -> None:
    from danlu.compress.lowrank import LowRankLinear, factorize_model
    from danlu.compress.sizes import count_params
    from danlu.generate import Generator, SamplingParams

    torch.manual_seed(0)
    model = Transformer(small_config()).eval()
    with torch.no_grad():  # make every block weight rank 8: factorizing at high energy is then (almost) exact
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(m.weight, full_matrices=False)
                m.weight.copy_(u[:, :8] * s[:8] @ vh[:8])
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        ref = model(ids)
        info = factorize_model(model, batches(), 0.999999)
        out = model(ids)
    assert info["layers_factorized"] == 3 * 7 and info["layers_dense"] == 0
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 21
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    assert count_params(model, embeddings=False) < model.config.num_params(embeddings=False) / 2
    prompt = ids[0, :6].tolist()
    greedy = SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, IdsTokenizer(vocab_size=448, stop_ids=())).generate([prompt], greedy)[0].token_ids
    with torch.no_grad():  # the cached decode picks what a full forward pass picks, token by token
        seq = list(prompt)
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert gen == seq[6:]


def test_shared_blocks_compute_with_one_set_of_weights_and_decode_with_a_cache() -> None:
    import copy

    from danlu.compress.share import share_adjacent_blocks
    from danlu.compress.sizes import count_params
    from danlu.generate import Generator, SamplingParams

    torch.manual_seed(0)
    model = Transformer(small_config(num_hidden_layers=3, initializer_range=0.1)).eval()
    reference = copy.deepcopy(model)
    influence = torch.tensor([0.1, 0.5, 0.2])  # block 1 is the more influential of the pair (0, 1)
    info = share_adjacent_blocks(model, influence)
    assert info == {"pairs": [[0, 1]], "kept": [1]}
    layers = model.model.layers
    assert layers[0].mlp is layers[1].mlp and layers[0].self_attn.q_proj is layers[1].self_attn.q_proj
    assert (
        layers[0].self_attn.layer == 0 and layers[1].self_attn.layer == 1
    )  # each position its own cache slot
    per_block = (model.config.num_params(embeddings=False) - model.config.hidden_size) // 3
    assert count_params(model, embeddings=False) == model.config.num_params(embeddings=False) - per_block
    with torch.no_grad():  # the same as the unshared model with block 1's weights copied into block 0
        reference.model.layers[0].load_state_dict(reference.model.layers[1].state_dict())
        ids = batches(1)[0]["input_ids"]
        assert torch.allclose(model(ids), reference(ids), atol=1e-6)
    prompt = ids[0, :6].tolist()
    greedy = SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[])
    assert (Generator(model, IdsTokenizer(vocab_size=448, stop_ids=())).generate([prompt], greedy)[0].token_ids
            == Generator(reference, IdsTokenizer(vocab_size=448, stop_ids=())).generate([prompt], greedy)[0].token_ids)  # fmt: skip


def test_the_scratch_control_keeps_the_distillations_token_budget() -> None:
    from danlu.compress.pipeline import _scratch_train

    tcfg = _train_config(7)
    assert (
        _scratch_train(tcfg, {"lr": 0.003, "warmup_steps": 5}).steps == 7
    )  # its own optimizer settings only
    with pytest.raises(DanluError, match="steps cannot differ from the distillation's"):
        _scratch_train(tcfg, {"steps": 9})
    with pytest.raises(DanluError, match="learning_rate is not a train setting"):
        _scratch_train(tcfg, {"learning_rate": 0.1})


def test_the_compress_recipe_section_is_a_valid_config() -> None:
    from danlu.compress.pipeline import CompressConfig
    from danlu.config import from_dict, load_recipe

    cfg = from_dict(CompressConfig, load_recipe("compress")["compress"], "compress")
    assert (
        cfg.scratch.enabled and cfg.factorize.enabled and cfg.share.enabled and cfg.gguf == ["q8_0", "q4_k_m"]
    )
    with pytest.raises(DanluError, match="energie"):
        from_dict(CompressConfig, {"factorize": {"energie": 0.9}}, "compress")


# ── restoring chat behaviour after distillation ─────────────────────────────────────────────────────────────


def _restore_world(tmp_path):  # noqa: ANN001, ANN202
    """One dialog repeated as the fine-tuning data, and a world eval folder whose test split asks it back."""
    question, answer = "中国最高的山是什么？", "珠穆朗玛峰"
    dialogs = tmp_path / "dialogs.jsonl"
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    dialogs.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 48, encoding="utf-8")
    world = tmp_path / "world" / "eval"
    world.mkdir(parents=True)
    (world / "facts_base.jsonl").write_text(json.dumps({"prompt": "中国最高的山是", "answer": answer}) + "\n")
    facts = [{"messages": [{"role": "user", "content": question}], "answer": answer, "lang": "zh", "split": "test"},
             {"messages": [{"role": "user", "content": "日本的首都是哪里？"}], "answer": "东京", "split": "dev"}]  # fmt: skip
    (world / "facts_chat.jsonl").write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts))
    return dialogs, tmp_path / "world"


def test_restore_tunes_teacher_student_and_control_then_scores_chat_facts(tmp_path, tiny_tokenizer) -> None:
    """compress.restore: `danlu sft` on the distilled student, on the from-scratch control and on the base teacher
    (the same fine-tuning), each a chat checkpoint scored on the held-out chat facts of the test split (the dev row
    never); the quantized rows are of the fine-tuned student. The fine-tuned student answers what it was tuned on."""
    from conftest import make_checkpoint

    from danlu.compress.pipeline import CompressConfig, run_compress
    from danlu.config import from_dict
    from danlu.io import load_checkpoint, read_meta

    teacher = make_checkpoint(tmp_path / "teacher", tiny_tokenizer, depth=2, chat=False)
    dialogs, world = _restore_world(tmp_path)
    texts = _texts_file(tmp_path)
    cfg = from_dict(CompressConfig, {
        "data": str(texts), "eval_data": str(texts), "eval_tokens": 500, "decode_tokens": 0,
        "shape": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                  "num_key_value_heads": 1},
        "subset": {"rows": 40}, "prune": {"calibration_rows": 4, "seq_len": 32}, "distill": {"seq_len": 32},
        "quantize": {"bits": [8]},
        "restore": {"enabled": True, "data": [str(dialogs)], "eval_data": str(world), "limit": 0,
                    "sft": {"val_dialogs": 4, "train": {"steps": 60, "lr": 0.01, "warmup_steps": 0}}},
    }, "compress")  # fmt: skip
    engine = {"device": "cpu", "dtype": "fp32", "compile": "off", "progress": False, "batch_size": 4,
              "save_minutes": 0, "eval_every": 0, "sample_every": 0, "threads": 1}  # fmt: skip
    result = run_compress(teacher, tmp_path / "out", cfg, _train_config(2), {"seed": 0, "train": engine})
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "pruned", "distilled", "scratch", "teacher + SFT", "distilled + SFT",
                          "scratch + SFT", "int8"]  # fmt: skip
    for name in ("teacher + SFT", "distilled + SFT", "scratch + SFT", "int8"):
        assert rows[name]["chat_fact_rows"] == 1 and rows[name]["chat_fact_split"] == "test", name
    assert "chat_fact_accuracy" not in rows["teacher"] and "chat_fact_accuracy" not in rows["distilled"]
    assert rows["distilled + SFT"]["chat_fact_accuracy"] == 1.0  # tuned on that very question
    out = tmp_path / "out"
    for folder in ("teacher_sft", "distilled_sft", "scratch_sft"):
        assert load_checkpoint(out / folder, quiet=True).is_chat, folder
    assert read_meta(out / "int8")["parent"] == str(out / "distilled_sft")
    assert "danlu sft --from " + str(out / "scratch") in (out / "restore.log").read_text()
    assert "| distilled + SFT |" in (out / "report.md").read_text()


def test_restore_without_dialogs_is_refused_before_any_step(tmp_path, tiny_tokenizer) -> None:
    from conftest import make_checkpoint

    from danlu import DanluError
    from danlu.compress.pipeline import CompressConfig, run_compress

    teacher = make_checkpoint(tmp_path / "teacher", tiny_tokenizer, depth=2, chat=False)
    cfg = CompressConfig(data=str(_texts_file(tmp_path)))
    cfg.restore.enabled, cfg.restore.data = True, [str(tmp_path / "missing.jsonl")]
    with pytest.raises(DanluError, match="compress.restore.data: .*missing.jsonl: no such file"):
        run_compress(teacher, tmp_path / "out", cfg, _train_config(1))
    assert not (tmp_path / "out").exists()


# ── distillation options: cached top-k teacher, sequence-level KD, on-policy GKD ───────────────────────────────


def _kd_setup(tok):  # noqa: ANN001, ANN202
    """A random teacher with the tokenizer's vocabulary (no padding rows, which generation never samples), its pruned
    student, 40 texts of distillation rows and held-out rows."""
    from conftest import SAMPLE_TEXT

    from danlu.compress.distill import PackedRows

    torch.manual_seed(0)
    teacher = Transformer(small_config(initializer_range=0.1, vocab_size=tok.vocab_size)).eval()
    data = PackedRows.from_texts(tok, SAMPLE_TEXT[:40], 32, 4)
    held = PackedRows.from_texts(tok, SAMPLE_TEXT[40:], 32, 1)
    target = TargetShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    student, _ = prune(teacher, measure_importance(teacher, data.sequential()), target)
    return teacher, student, data, held


def _kd_train(steps: int, **kw):  # noqa: ANN202
    from danlu.engine import TrainConfig

    base = dict(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, device="cpu", dtype="fp32", compile="off",
                eval_every=0, save_minutes=0, progress=False, log_every=4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _distill(student, teacher, data, out, tok, steps: int = 12, held=None, tcfg=None, **cfg):  # noqa: ANN001, ANN202
    import copy

    from danlu.compress.distill import DistillConfig, distill

    return distill(copy.deepcopy(student), teacher, data, out, tcfg=tcfg or _kd_train(steps),
                   cfg=DistillConfig(**cfg), tokenizer=tok, meta={"stage": "test"}, eval_rows=held)  # fmt: skip


def _greedy(model: torch.nn.Module, prompts: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """n greedy tokens after each prompt, by a full forward per token (no cache), among the tokenizer's `vocab` ids
    (the embedding's padding rows are never sampled): the reference for generation."""
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1, :vocab].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.size(1) :]


def test_topk_loss_is_the_full_kd_loss_when_k_is_the_vocabulary_and_close_with_few(tiny_tokenizer) -> None:
    from danlu.compress.teacher_topk import teacher_topk
    from danlu.losses import generalized_jsd, kd_loss, topk_kd_loss
    from danlu.model import IGNORE_INDEX

    teacher, student, data, _ = _kd_setup(tiny_tokenizer)
    x, y = data.x[:6], data.y[:6]
    mask = y != IGNORE_INDEX
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x).detach().requires_grad_(True)
    full = teacher_topk(teacher, x, 400, temperature=2.0)
    assert full["logp"].dtype == torch.float16 and full["ids"].dtype == torch.int16
    assert full["logp"].shape == (6, 32, 400) and full["tail"].shape == (6, 32)
    ours = topk_kd_loss(s_logits, full["logp"], full["ids"], full["tail"], mask, 0.0, 2.0)
    ref = kd_loss(s_logits, t_logits, mask, 2.0)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=2e-3)
    (g_ours,) = torch.autograd.grad(ours, s_logits)
    (g_ref,) = torch.autograd.grad(ref, s_logits)
    assert torch.allclose(g_ours, g_ref, atol=2e-3 * float(g_ref.abs().max()))
    gjsd = topk_kd_loss(s_logits, full["logp"], full["ids"], full["tail"], mask, 0.5, 2.0)
    expected = 4 * float(generalized_jsd(s_logits.detach(), t_logits, mask, 0.5, 2.0))
    assert float(gjsd.detach()) == pytest.approx(expected, rel=2e-3)
    # a peaked teacher (a trained model's shape): its top 32 of 400 tokens and the tail bucket stay close
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4)
        t_logits = teacher(x)
    few = teacher_topk(teacher, x, 32, temperature=1.0)
    s_logits = s_logits.detach()
    exact = float(kd_loss(s_logits, t_logits, mask))
    approx = float(topk_kd_loss(s_logits, few["logp"], few["ids"], few["tail"], mask))
    assert 0.9 * exact < approx <= exact * 1.001  # the binned KL is a lower bound of the full one


def test_topk_distillation_lowers_heldout_kl_and_reuses_or_refuses_its_cache(tmp_path, tiny_tokenizer):
    import copy

    from danlu.compress.teacher_topk import cache_path

    teacher, student, data, held = _kd_setup(tiny_tokenizer)
    res = _distill(student, teacher, data, tmp_path / "d", tiny_tokenizer, held=held, topk=16)
    assert res["heldout_kl_after"] < 0.9 * res["heldout_kl_before"]
    cache = cache_path(tmp_path / "d", 16)
    assert cache.parent == tmp_path and cache.exists()  # beside the model folder, which each save swaps whole
    written = cache.stat().st_mtime_ns
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    again = _distill(student, teacher, data, tmp_path / "d", tiny_tokenizer, steps=3, topk=16)
    hook.remove()
    # reused: no teacher forward, nothing rewritten
    assert calls == [] and cache.stat().st_mtime_ns == written
    assert again["steps"] == 3
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 0.01
    with pytest.raises(DanluError, match=r"top16.safetensors: .*from another teacher.*Delete the file"):
        _distill(student, other, data, tmp_path / "d", tiny_tokenizer, steps=1, topk=16)
    with pytest.raises(DanluError, match=r"made from temperature 1.0 \(now 2.0\)"):
        _distill(student, teacher, data, tmp_path / "d", tiny_tokenizer, steps=1, topk=16, temperature=2.0)
    with pytest.raises(DanluError, match="topk=500: more than the vocabulary's 400 tokens"):
        _distill(student, teacher, data, tmp_path / "e", tiny_tokenizer, steps=1, topk=500)


def test_sequence_kd_trains_on_the_teachers_continuations_and_lowers_heldout_kl(tmp_path, tiny_tokenizer):
    import copy

    from danlu.compress.distill import DistillConfig, _source
    from danlu.engine import Dist
    from danlu.model import IGNORE_INDEX

    teacher, student, data, held = _kd_setup(tiny_tokenizer)
    cfg = DistillConfig(mode="sequence", prompt_tokens=8, gen_temperature=0.0)
    reference = copy.deepcopy(data)
    source = _source(data, student, teacher, tiny_tokenizer, cfg, _kd_train(1), Dist())
    batch, rows = source.next_batch(), reference.next_batch()
    prompts = rows["input_ids"][:, :8]
    # rows of 32 tokens: 8 of prompt, 24 of the 25 the teacher writes (the 25th is only a target)
    continuation = _greedy(teacher, prompts, 25, tiny_tokenizer.vocab_size)
    assert torch.equal(batch["input_ids"], torch.cat([prompts, continuation[:, :-1]], 1))
    assert batch["input_ids"].shape == rows["input_ids"].shape  # as many tokens as a data row
    assert torch.equal(batch["targets"][:, 7:], continuation)  # the generated tokens, and only those, count
    assert bool((batch["targets"][:, :7] == IGNORE_INDEX).all())
    res = _distill(student, teacher, data, tmp_path / "s", tiny_tokenizer, steps=30, held=held, mode="sequence",
                   prompt_tokens=8)  # fmt: skip
    assert res["generated_batches"] == res["batches"] == 30
    # a random teacher writes gibberish, far from the held-out text's prefixes: KL there falls less than on logits
    # (30 steps: 0.88–0.91 of the start over five training seeds; 20 steps left 0.91–0.97, too close to call)
    assert res["heldout_kl_after"] < 0.96 * res["heldout_kl_before"]


def test_on_policy_kd_lambda_zero_is_the_data_loss_and_lambda_one_scores_the_students_samples(
    tmp_path, tiny_tokenizer
) -> None:
    import copy

    from danlu.compress.distill import DistillConfig, _source
    from danlu.engine import Dist
    from danlu.io import load_weights
    from danlu.model import IGNORE_INDEX

    teacher, student, data, held = _kd_setup(tiny_tokenizer)
    _distill(student, teacher, copy.deepcopy(data), tmp_path / "logits", tiny_tokenizer, steps=3, beta=0.5)
    off = _distill(student, teacher, copy.deepcopy(data), tmp_path / "lmbda0", tiny_tokenizer, steps=3, beta=0.5,
                   mode="on_policy", lmbda=0.0)  # fmt: skip
    assert off["generated_batches"] == 0
    a, b = load_weights(tmp_path / "logits", torch.float32), load_weights(tmp_path / "lmbda0", torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)

    cfg = DistillConfig(mode="on_policy", lmbda=1.0, prompt_tokens=4, new_tokens=12, gen_temperature=0.0)
    reference = copy.deepcopy(data)
    source = _source(data, student, teacher, tiny_tokenizer, cfg, _kd_train(1), Dist())
    student.train()
    batch, rows = source.next_batch(), reference.next_batch()
    assert student.training  # sampling left the student in the mode the engine trains it in
    prompts = rows["input_ids"][:, :4]
    samples = _greedy(student, prompts, 12, tiny_tokenizer.vocab_size)
    assert torch.equal(batch["input_ids"], torch.cat([prompts, samples[:, :-1]], 1))
    assert torch.equal(batch["targets"][:, 3:], samples)
    assert bool((batch["targets"][:, :3] == IGNORE_INDEX).all())
    res = _distill(student, teacher, data, tmp_path / "gkd", tiny_tokenizer, held=held, mode="on_policy",
                   lmbda=0.5, beta=0.5, prompt_tokens=8)  # fmt: skip
    assert 0 < res["generated_batches"] < res["batches"] == 12
    assert res["heldout_kl_after"] < 0.9 * res["heldout_kl_before"]


def test_on_policy_kd_resumes_with_the_same_coins_and_samples(tmp_path, tiny_tokenizer) -> None:
    import copy

    from danlu.compress.distill import DistillConfig, distill
    from danlu.io import load_weights

    teacher, student, data, _ = _kd_setup(tiny_tokenizer)
    cfg = DistillConfig(mode="on_policy", lmbda=0.5, prompt_tokens=8)

    def run(out, steps: int, resume: bool = False):  # noqa: ANN001, ANN202
        tcfg = _kd_train(steps, warmup_steps=0, schedule="constant")  # the same learning rate at every step
        return distill(copy.deepcopy(student), teacher, copy.deepcopy(data), out, tcfg=tcfg, cfg=cfg,
                       tokenizer=tiny_tokenizer, meta={"stage": "test"}, resume=resume)  # fmt: skip

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=True)
    assert resumed["batches"] == straight["batches"] == 6
    assert resumed["generated_batches"] == straight["generated_batches"]
    assert 0 < straight["generated_batches"] < 6
    a, b = load_weights(tmp_path / "a", torch.float32), load_weights(tmp_path / "b", torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"topk": -1}, r"compress.distill.topk=-1: must be ≥ 0"),
        ({"mode": "sequence", "topk": 8}, r"topk=8 with mode=sequence: the cache holds"),
        ({"mode": "on_policy", "alpha": 0.5}, r"alpha=0.5 with mode=on_policy"),
        ({"mode": "on_policy", "lmbda": 1.5}, r"lmbda=1.5: must be in \[0, 1\]"),
        ({"beta": -0.1}, r"beta=-0.1: must be in \[0, 1\]"),
        ({"mode": "sequence", "prompt_tokens": 66, "seq_len": 64}, r"prompt_tokens=66 \+ new_tokens=0"),
        ({"mode": "off_policy"}, r"mode: 'off_policy' is not one of 'logits', 'sequence', 'on_policy'"),
        ({"gen_temperature": -1}, r"gen_temperature=-1"),
    ],
)
def test_bad_distillation_settings_are_refused_naming_the_key(values: dict, message: str) -> None:
    from danlu.compress.distill import DistillConfig
    from danlu.config import from_dict

    with pytest.raises(DanluError, match=message):
        from_dict(DistillConfig, values, "compress.distill")


def test_on_policy_kd_refuses_fsdp_and_a_continuation_past_the_context() -> None:
    from danlu.compress.kd_modes import check_parallel

    check_parallel("on_policy", "ddp", 2)
    check_parallel("sequence", "fsdp", 2)
    with pytest.raises(DanluError, match="mode=on_policy with train.parallel=fsdp on 2 processes"):
        check_parallel("on_policy", "fsdp", 2)


def test_killed_compress_resumes_its_distillation(tmp_path, tiny_tokenizer, monkeypatch, capsys) -> None:
    """A run that dies after the distillation's checkpoint of step 2 continues from there when started again with
    the same settings (compress.resume: auto), and ends with the weights of a run that was never interrupted."""
    import dataclasses

    from conftest import make_checkpoint
    from safetensors.torch import load_file

    from danlu import engine
    from danlu.compress.pipeline import CompressConfig, run_compress
    from danlu.config import from_dict

    teacher = make_checkpoint(tmp_path / "teacher", tiny_tokenizer, depth=2, chat=False)
    section = {"data": str(_texts_file(tmp_path)), "decode_tokens": 0, "scratch": {"enabled": False},
               "quantize": {"enabled": False}, "subset": {"rows": 40}, "prune": {"calibration_rows": 4, "seq_len": 32},
               "distill": {"seq_len": 32}, "shape": {"hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1}}  # fmt: skip
    tcfg = dataclasses.replace(_train_config(4), save_every=2)
    run_compress(teacher, tmp_path / "straight", from_dict(CompressConfig, section, "compress"), tcfg)

    real = engine.Trainer._boundary

    def dies_after_step_2(self: engine.Trainer) -> None:
        real(self)
        if self.step == 2:
            raise KeyboardInterrupt  # as a kill: no final save

    monkeypatch.setattr(engine.Trainer, "_boundary", dies_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_compress(teacher, tmp_path / "killed", from_dict(CompressConfig, section, "compress"), tcfg)
    monkeypatch.setattr(engine.Trainer, "_boundary", real)
    capsys.readouterr()
    run_compress(teacher, tmp_path / "killed", from_dict(CompressConfig, section, "compress"), tcfg)
    assert f"resumed distill from step 2 in {tmp_path / 'killed' / 'distilled'}" in capsys.readouterr().out
    want = load_file(str(tmp_path / "straight" / "distilled" / "model.safetensors"))
    got = load_file(str(tmp_path / "killed" / "distilled" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
