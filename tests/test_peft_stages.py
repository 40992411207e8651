"""Adapters on the preference and RL stages: `reward`, `dpo`, `ppo` and `grpo` with a `peft:` section train only the
adapter (and the heads that must train in full), write an adapter folder in peft's format that loads, and DPO's
reference is the base under the adapter, not a second copy of the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from danlu import DanluError

peft = pytest.importorskip("peft")

FAST = {"progress": False, "log_every": 1, "device": "cpu", "dtype": "fp32", "batch_size": 2}
LORA = {"method": "lora", "r": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft_rl_data")
    pairs, prompts = [], []
    for a in range(2, 8):
        q = [{"role": "user", "content": f"{a} + 3 = ?"}]
        pairs.append({"prompt": q, "chosen": f"{a + 3}", "rejected": f"{a + 4} 不对"})
        prompts.append({"messages": q, "answer": str(a + 3)})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (root / "rl.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return {"pairs": root / "pairs.jsonl", "rl": root / "rl.jsonl"}


def _adapter_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))


def _saved(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_reward_lora_trains_the_score_head_in_full_and_loads_as_a_reward_model(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    from transformers import LlamaForSequenceClassification

    from danlu.rewards import RewardModelScorer, is_reward_model, load_reward_model
    from danlu.stages.reward import RewardConfig, train_reward

    out = tmp_path / "rm"
    res = train_reward(tiny_checkpoint, data["pairs"], out, recipe={}, eval_data=data["pairs"],
                       cfg=RewardConfig(resume="false", peft=LORA, train={**FAST, "steps": 2}))  # fmt: skip
    assert "heldout_pair_accuracy" in res
    assert _adapter_files(out) == ["adapter_config.json", "adapter_model.safetensors", "danlu.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    tensors = _saved(out)
    assert "base_model.model.score.weight" in tensors  # the head trained in full, under peft's key
    assert not any(".score.lora_" in k for k in tensors)  # and never LoRA'd
    assert any("q_proj.lora_A" in k for k in tensors)
    assert is_reward_model(out)
    rm, tok = load_reward_model(out)
    convs = [
        [{"role": "user", "content": "2 + 3 = ?"}, {"role": "assistant", "content": c}]
        for c in ("5", "6 不对")
    ]
    ours = RewardModelScorer(rm, tok).score(convs)
    # peft's own loader on transformers' sequence classifier gives the same scores (pad token set as danlu's)
    hf = LlamaForSequenceClassification.from_pretrained(
        tiny_checkpoint, num_labels=1, pad_token_id=tok.pad_id
    )
    theirs_model = peft.PeftModel.from_pretrained(hf.eval(), out).eval()
    ids = [tok.render_chat(c)[0] for c in convs]
    longest = max(map(len, ids))
    batch = torch.tensor([i + [tok.pad_id] * (longest - len(i)) for i in ids])
    with torch.no_grad():
        theirs = theirs_model(input_ids=batch).logits.squeeze(-1).tolist()
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_reward_lora_resume_restores_the_score_head(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    from danlu.stages.reward import RewardConfig, train_reward

    def run(out: Path, steps: int, resume: str) -> list[float]:
        cfg = RewardConfig(resume=resume, peft=LORA, train={**FAST, "steps": steps, "save_every": 2})
        train_reward(tiny_checkpoint, data["pairs"], out, recipe={}, cfg=cfg)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [m["loss"] for m in map(json.loads, lines) if m.get("event") == "train"]

    full = run(tmp_path / "a", 3, "false")
    run(tmp_path / "b", 2, "false")
    state_path = tmp_path / "b" / "trainer_state" / "state.json"
    state = json.loads(state_path.read_text())
    state["finished"], state["config"]["steps"] = False, 3  # as if stopped after step 2 of 3
    state_path.write_text(json.dumps(state))
    assert run(tmp_path / "b", 3, "true") == full  # bit-for-bit: LoRA factors and the score head came back


def test_dpo_lora_uses_the_base_as_reference_without_a_copy(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    from danlu.data.preference import PairBatches, encode_pairs
    from danlu.io import load_checkpoint
    from danlu.stages.common import AdapterOff, attach_with_reference, sequence_logps
    from danlu.stages.dpo import DPOConfig, train_dpo

    # the reference view runs the bare base: its log-probs equal the parent's even after the adapter moved
    ckpt = load_checkpoint(tiny_checkpoint)
    adapter, ref = attach_with_reference(ckpt, LORA, "dpo", tiny_checkpoint, None)
    assert isinstance(ref, AdapterOff) and ref.model is ckpt.model  # the policy's own weights, no copy
    with torch.no_grad():
        for name, p in ckpt.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    from danlu.data.preference import read_pairs

    pairs, _ = encode_pairs(read_pairs(data["pairs"]), ckpt.tokenizer, 128)
    batch = next(PairBatches(pairs, 2, ckpt.tokenizer.pad_id, 0).sequential(4))
    plain = load_checkpoint(tiny_checkpoint).model.eval()
    with torch.no_grad():
        base_lp = sequence_logps(plain, batch)
        torch.testing.assert_close(sequence_logps(ref, batch), base_lp, atol=1e-5, rtol=0)
        assert (sequence_logps(ckpt.model, batch) - base_lp).abs().max() > 1e-3  # the adapter is on again
    trainable = [n for n, p in ckpt.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # switching off and on kept what trains

    # the stage: loss starts at log 2 (policy = reference), cached equals online, only the adapter is written
    losses = {}
    for mode in ("cached", "online"):
        out = tmp_path / mode
        cfg = DPOConfig(resume="false", reference_mode=mode, peft=LORA, train={**FAST, "steps": 2})
        res = train_dpo(tiny_checkpoint, data["pairs"], out, recipe={}, eval_data=data["pairs"], cfg=cfg)
        assert res["heldout_implicit_reward_accuracy_before"] == 0.5  # policy = reference before training
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line).get("event") == "train"]  # fmt: skip
        assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    assert losses["cached"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["cached"] == pytest.approx(losses["online"], abs=1e-4)
    again = load_checkpoint(tmp_path / "cached")
    assert again.meta["adapter"]["method"] == "lora" and again.meta["stage"] == "dpo"


def test_dpo_with_a_soft_prompt_references_the_wrapped_base(tiny_checkpoint: Path, data: dict) -> None:
    from danlu.io import load_checkpoint
    from danlu.stages.common import attach_with_reference

    ckpt = load_checkpoint(tiny_checkpoint)
    base = ckpt.model
    _, ref = attach_with_reference(
        ckpt, {"method": "ptuning", "virtual_tokens": 4}, "dpo", tiny_checkpoint, None
    )
    assert ref is base and ckpt.model is not base  # the PromptedLM wraps the base, the reference is the base
    assert not any(p.requires_grad for p in ref.parameters())


def test_grpo_lora_writes_an_adapter_that_loads(tiny_checkpoint: Path, data: dict, tmp_path: Path) -> None:
    from danlu.io import load_checkpoint
    from danlu.stages.grpo import GRPOConfig, train_grpo

    out = tmp_path / "grpo"
    cfg = GRPOConfig(resume="false", group_size=2, prompts_per_step=2, max_new_tokens=3, beta=0.04, eval_rows=2,
                     peft={"method": "dora", "r": 4}, train={**FAST, "steps": 2})  # fmt: skip
    res = train_grpo(tiny_checkpoint, data["rl"], out, recipe={}, cfg=cfg, eval_data=data["rl"])
    assert math.isfinite(res["train_loss"]) and "heldout_accuracy" in res
    assert _adapter_files(out) == ["adapter_config.json", "adapter_model.safetensors", "danlu.json"]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"]
    assert load_checkpoint(out).meta["adapter"]["method"] == "dora"


def test_ppo_lora_trains_the_value_head_and_saves_only_the_policy_adapter(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    from danlu.io import load_checkpoint
    from danlu.stages.ppo import PPOConfig, train_ppo

    out = tmp_path / "ppo"
    cfg = PPOConfig(resume="false", prompts_per_step=3, max_new_tokens=4, eval_rows=3, peft=LORA,
                    train={**FAST, "steps": 2})  # fmt: skip
    res = train_ppo(
        tiny_checkpoint, data["rl"], out, recipe={}, cfg=cfg, reward="world", eval_data=data["rl"]
    )
    assert math.isfinite(res["kl"]) and math.isfinite(res["value_loss"])
    tensors = _saved(out)
    assert tensors and all("lora_" in k for k in tensors)  # no value head, no base weights
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert any(w != 0.0 for w in state["data"]["value_weight"])  # the value head trained (it starts at zero)
    assert load_checkpoint(out).meta["adapter"]["method"] == "lora"


def test_soft_prompts_and_head_targets_are_refused_where_they_cannot_work(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    from danlu.stages.ppo import PPOConfig, train_ppo
    from danlu.stages.reward import RewardConfig, train_reward

    with pytest.raises(DanluError, match="reward.peft.method: ptuning is a soft prompt"):
        train_reward(tiny_checkpoint, data["pairs"], tmp_path / "a", recipe={},
                     cfg=RewardConfig(peft={"method": "ptuning"}, train=FAST))  # fmt: skip
    with pytest.raises(DanluError, match="reward.peft.target_modules: 'score'"):
        train_reward(tiny_checkpoint, data["pairs"], tmp_path / "b", recipe={},
                     cfg=RewardConfig(peft={"method": "lora", "target_modules": ["q_proj", "score"]}, train=FAST))  # fmt: skip
    with pytest.raises(DanluError, match="ppo.peft.method: prefix is a soft prompt"):
        train_ppo(tiny_checkpoint, data["rl"], tmp_path / "c", recipe={}, reward="world",
                  cfg=PPOConfig(peft={"method": "prefix"}, train=FAST))  # fmt: skip


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo", "grpo"])
def test_peft_on_the_command_line_fills_the_stage_section(stage: str, tmp_path: Path) -> None:
    from danlu.cli import build_parser
    from danlu.commands._training import stage_config
    from danlu.stages.dpo import DPOConfig
    from danlu.stages.grpo import GRPOConfig
    from danlu.stages.ppo import PPOConfig
    from danlu.stages.reward import RewardConfig

    cls = {"reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}[stage]
    extra = ["--reward", "world"] if stage == "ppo" else []
    args = build_parser().parse_args([stage, "--from", "m", "--data", "d", "--out", str(tmp_path), *extra, "--peft",
                                      "dora", f"{stage}.peft.r=4"])  # fmt: skip
    _, cfg = stage_config(args, stage, cls)
    assert cfg.peft == {"method": "dora", "r": 4}


def test_sft_with_ptuning_fits_the_virtual_tokens_in_the_context(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A soft prompt's virtual tokens take positions: rows default to the context minus them, one dialog per row
    with no segments (the base's context is 128; these dialogs are short, so a full-context row would overflow)."""
    from danlu.io import load_checkpoint
    from danlu.stages.sft import SFTConfig, sft

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(8) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = SFTConfig(resume="false", eval_limit=0, bpb_rows=0, replay=0.0, peft={"method": "ptuning", "virtual_tokens": 8},
                    train={**FAST, "steps": 2, "eval_every": 2})  # fmt: skip
    res = sft(tiny_checkpoint, [data], tmp_path / "pt", recipe={}, cfg=cfg)
    assert res["seq_len"] == 128 - 8 and res["packed"] is False and math.isfinite(res["val_loss_end"])
    assert load_checkpoint(tmp_path / "pt").meta["adapter"]["peft_type"] == "P_TUNING"


def test_adapters_trained_from_an_sft_adapter_load_on_it_merged(
    tiny_checkpoint: Path, data: dict, tmp_path: Path
) -> None:
    """In a pipeline, DPO and the reward model start from the SFT stage's adapter (merged into its base); their
    own adapters name that folder as their base and load the same way: base + SFT adapter merged, then theirs."""
    from danlu.adapters import PeftSpec, attach
    from danlu.io import load_checkpoint
    from danlu.rewards import load_reward_model
    from danlu.stages.dpo import DPOConfig, train_dpo
    from danlu.stages.reward import RewardConfig, train_reward

    ckpt = load_checkpoint(tiny_checkpoint)
    sft_adapter = attach(ckpt, PeftSpec(method="lora", r=4), tiny_checkpoint, "sft.peft", quiet=True)
    with torch.no_grad():
        for name, p in ckpt.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    sft_adapter.save(tmp_path / "sft", None, {"stage": "sft", "chat": True})
    train_dpo(tmp_path / "sft", data["pairs"], tmp_path / "dpo", recipe={},
              cfg=DPOConfig(resume="false", peft=LORA, train={**FAST, "steps": 1}))  # fmt: skip
    dpo = load_checkpoint(tmp_path / "dpo")
    assert dpo.meta["adapter"]["base"] == str(tmp_path / "sft")
    x = torch.tensor([[5, 17, 42, 7]])
    with (
        torch.no_grad()
    ):  # one step moved the DPO adapter only a little: close to the SFT model, not the base
        sft_logits = ckpt.model.eval()(x)
        assert (dpo.model(x) - sft_logits).abs().max() < (
            load_checkpoint(tiny_checkpoint).model(x) - sft_logits
        ).abs().max()
    train_reward(tmp_path / "sft", data["pairs"], tmp_path / "rm", recipe={},
                 cfg=RewardConfig(resume="false", peft=LORA, train={**FAST, "steps": 1}))  # fmt: skip
    rm, _ = load_reward_model(tmp_path / "rm")
    assert rm(x, torch.tensor([4])).shape == (1,)
