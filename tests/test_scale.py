"""Correct at scale (issue 19, training): each rank reads its own rows of the global batch, losses are normalized
over the whole global batch, 2 processes give the losses, logged stats and weights of 1 with the same global batch
(SFT, SFT with a LoRA adapter, pretraining, distillation, reward, DPO, GRPO, PPO, the AI-text detector; the rollouts
sample the same text), every one of these stages killed on 2 processes resumes exactly, a non-finite gradient is
caught, one precedence rule for settings, and the final tokens/s in danlu.json is the stage's own, resumed or not.

Run as a script (`python tests/test_scale.py one|two OUT CKPT PAIRS RL RM [ddp|fsdp] [KILLED]`, under torchrun for
two), this file is also the worker of the 2-process test: it trains every stage above and writes, per rank, the
hashes of the rows each step read, the logged losses and stats and a hash of the final weights (see `_worker`). The
SFT dialogs, the detector's human and machine texts, the distillation's student checkpoint and pretraining's token
shards (`shards`, tokenized with `tok`) lie beside PAIRS.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = {"progress": False, "log_every": 1, "device": "cpu", "dtype": "fp32", "threads": 1}
# Logged stats that are means over equal counts of rows (pairs, rollouts) on every rank, so their mean over the ranks
# is one process's figure for the same global batch (a std or a per-token mean over the rank's own tokens is not).
MEAN_STATS = {"reward": ("accuracy", "margin"), "dpo": ("accuracy", "margin", "rewards_chosen"),
              "grpo": ("reward", "completion_tokens"), "ppo": ("reward", "kl"), "detect": ("accuracy",)}  # fmt: skip
# each trains into OUT/its name
STAGES = ("lora", "sft", "pretrain", "distill", "reward", "dpo", "grpo", "ppo", "detect")
# Also killed and resumed under FSDP2: pretraining's weights go back into the shards by the engine's plain path, the
# others' by their own (the adapter's restore, the classifier's saved HF names).
FSDP_RESUMED = ("lora", "pretrain", "detect")
PRETRAIN_MODEL = {"depth": 1}  # pretraining's model from scratch (seed 0), on rows of 32 tokens


def _row_hash(row: list[int], pad_id: int) -> str:
    """A row's tokens without its trailing padding (padding depends on the batch a row lands in)."""
    while row and row[-1] == pad_id:
        row = row[:-1]
    return hashlib.sha256(json.dumps(row).encode()).hexdigest()[:16]


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.to_local() if hasattr(v, "to_local") else v  # FSDP2: this rank's shard
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _record_fits(record: dict[str, Any]) -> None:
    """Wraps Trainer.fit to record, per stage (the name of its folder: `lora` trains as `sft`), the row hashes of
    every batch this rank read, the logged (already all-reduced) losses and `MEAN_STATS` and a hash of the final
    weights."""
    from danlu import engine

    real_fit = engine.Trainer.fit

    def fit(self: Any) -> Any:
        rows: list[list[str]] = []
        real_next = self.data.next_batch
        # (distillation's rows of packed text have no pad id: nothing is stripped)
        pad = self.data.pad_id if hasattr(self.data, "pad_id") else getattr(getattr(self.data, "tok", None),
                                                                            "pad_id", -1)  # fmt: skip

        def next_batch() -> dict[str, torch.Tensor]:
            b = real_next()
            rows.append(sorted(_row_hash(r, pad) for r in b["input_ids"].tolist()))
            return b

        self.data.next_batch = next_batch
        start = _weights_hash(self.raw_model)
        out = real_fit(self)
        logged = [h for h in self.history if h.get("event") == "train"]
        record[self.out.name] = {
            "start": start,
            "rows": rows,
            "losses": [h["loss"] for h in logged],
            "stats": [{k: h[k] for k in MEAN_STATS.get(self.stage, ())} for h in logged],
            "weights": _weights_hash(self.raw_model),
        }
        return out

    engine.Trainer.fit = fit


class _Killed(Exception):
    """A crash right after a checkpoint: the process stops with no final save, as after a kill."""


def _crash_after(step: int) -> None:
    """Makes Trainer crash at the boundary of `step`, after the checkpoint `save_every` writes there (every rank
    leaves at the same point, so no rank waits in a collective for a dead one)."""
    from danlu import engine

    real = engine.Trainer._boundary

    def boundary(self: Any) -> None:
        real(self)
        if self.step == step:
            raise _Killed

    engine.Trainer._boundary = boundary


def _stages(record: dict[str, Any], out: Path, ckpt: Path, pairs: Path, rl: Path, rm: str, mode: str, parallel: str,
            resume: str, only: tuple[str, ...] = STAGES, **extra: Any) -> None:  # fmt: skip
    """SFT (in full and with a LoRA adapter), pretraining, distillation, reward, DPO and the detector (3 steps), GRPO
    and PPO (2 steps, scored by the reward model `rm`) with the global batch of 4 rows, 4 pairs, 4 texts and 2 prompts,
    split over the ranks of `mode` two (the stages in `only`). A stage that refuses to run leaves its message in
    `record`."""
    from danlu import DanluError
    from danlu.compress.distill import DistillConfig, PackedRows, distill
    from danlu.detect.metrics import HUMAN, MACHINE
    from danlu.detect.texts import read_texts
    from danlu.detect.train import DetectConfig, train_detector
    from danlu.engine import TrainConfig
    from danlu.io import load_checkpoint
    from danlu.stages.dpo import DPOConfig, train_dpo
    from danlu.stages.grpo import GRPOConfig, train_grpo
    from danlu.stages.ppo import PPOConfig, train_ppo
    from danlu.stages.pretrain import PretrainConfig, pretrain
    from danlu.stages.reward import RewardConfig, train_reward
    from danlu.stages.sft import SFTConfig, sft

    split = 2 if mode == "one" else 1  # the same global batch on 1 and on 2 processes
    train = {**FAST, "steps": 3, "batch_size": 2 * split, "parallel": parallel, **extra}
    rl_train = {
        **FAST,
        "steps": 2,
        "lr": 0.01,
        "parallel": parallel,
        **extra,
    }  # a KL to the reference at step 2

    def distill_rows() -> None:
        """A random 1-layer student toward the random teacher `ckpt`: KD at T=2 plus cross-entropy, on ~11 rows of
        32 tokens (step 3 starts a new epoch; the last row is padded, so ranks score different token counts)."""
        teacher, student = load_checkpoint(ckpt), load_checkpoint(pairs.parent / "student")
        texts = [f"第{a}行: {a} × 7 = {7 * a}。The capital of country {a} is city {a * 3}." for a in range(9)]
        rows = PackedRows.from_texts(teacher.tokenizer, texts, 32, train["batch_size"])
        distill(student.model, teacher.model, rows, out / "distill", tcfg=TrainConfig(**train, lr=0.01,
                warmup_steps=0), cfg=DistillConfig(temperature=2.0, alpha=0.5), tokenizer=teacher.tokenizer,
                meta={"stage": "test"}, resume=resume == "auto")  # fmt: skip
        params = list(teacher.model.parameters())  # FSDP2 shards the frozen teacher too: DTensors, 1/N local
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
        record["teacher_share"] = local / sum(p.numel() for p in params)

    def detect() -> None:
        """The detector on 8 human and 8 machine texts: 2 of each held out, 6 of each read once in 3 steps."""
        texts = [read_texts([pairs.parent / f"{name}.jsonl"], label) for name, label in (("human", HUMAN),
                                                                                          ("machine", MACHINE))]  # fmt: skip
        train_detector(*texts, ckpt, out / "detect", DetectConfig(max_tokens=32, eval_share=0.25, resume=resume,
                                                                  train={**train, "lr": 0.01}))  # fmt: skip

    stages = {
        # SFT with a rank-4 LoRA adapter on the attention's q and v projections (the base frozen); first, while
        # every process's RNG is its own: the adapter's init must not depend on it (FSDP2 keeps each rank's draw)
        "lora": lambda: sft(ckpt, [pairs.parent / "sft.jsonl"], out / "lora", recipe={}, cfg=SFTConfig(
            seq_len=64, val_dialogs=0, replay=0.0, eval_limit=0, resume=resume, train=train,
            peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})),
        # Dialogs packed 2–3 to a row of 64 tokens, answers of different lengths: rows score different token counts
        "sft": lambda: sft(ckpt, [pairs.parent / "sft.jsonl"], out / "sft", recipe={}, cfg=SFTConfig(
            seq_len=64, val_dialogs=0, replay=0.0, eval_limit=0, resume=resume, train=train)),
        # From scratch over the token shards (rows of 32 tokens): the engine's own data source and loss
        "pretrain": lambda: pretrain(pairs.parent / "shards", pairs.parent / "tok", out / "pretrain",
                                     recipe={"model": PRETRAIN_MODEL}, cfg=PretrainConfig(
            seq_len=32, eval_facts=0, resume=resume, train={**train, "warmup_steps": 0, "eval_every": 0})),
        "distill": distill_rows,
        "reward": lambda: train_reward(ckpt, pairs, out / "reward", recipe={},
                                       cfg=RewardConfig(resume=resume, train=train)),
        "dpo": lambda: train_dpo(ckpt, pairs, out / "dpo", recipe={}, cfg=DPOConfig(resume=resume, train=train)),
        # A trained reward model scores every sample differently, so advantages and gradients are not 0.
        "grpo": lambda: train_grpo(ckpt, rl, out / "grpo", recipe={}, cfg=GRPOConfig(
            resume=resume, group_size=2, prompts_per_step=split, max_new_tokens=4, eval_rows=0, reward=rm, beta=1.0,
            train=rl_train)),
        "ppo": lambda: train_ppo(ckpt, rl, out / "ppo", recipe={}, reward=rm, cfg=PPOConfig(
            resume=resume, prompts_per_step=split, max_new_tokens=4, eval_rows=0, train=rl_train)),
        "detect": detect,
    }  # fmt: skip
    assert tuple(stages) == STAGES
    for name, run in stages.items():
        if name not in only:
            continue
        try:
            run()
        except _Killed:
            continue  # on to the next stage's crash
        except DanluError as e:  # FSDP is refused for the stages that sample rollouts
            if parallel != "fsdp":
                raise
            record[name] = {"refused": str(e)}


def _worker(mode: str, out: Path, ckpt: Path, pairs: Path, rl: Path, rm: str, parallel: str = "ddp",
            killed: str = "") -> None:  # fmt: skip
    """Every stage straight into `out` (`mode` one: 1 process; two: 2, with `parallel`). Then, with DDP, every stage
    again into out/killed, and `FSDP_RESUMED` under FSDP2 into out/killed_fsdp, each crashing after its checkpoint
    of step 1; with `killed` (a folder an earlier launch left so), every stage continued there to the end, as a rerun
    after a kill does, and those of killed_fsdp beside it under FSDP2 (records in killed/../resume*)."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, Any] = {}
    _record_fits(record)
    own_rm = rm if mode == "two" else str(out / "reward")
    _stages(record, out, ckpt, pairs, rl, own_rm, mode, parallel, "false")
    (out / f"{mode}{rank}.json").write_text(json.dumps(record))
    if killed:
        record.clear()
        _stages(record, Path(killed), ckpt, pairs, rl, rm, mode, "ddp", "auto", save_every=1)
        (Path(killed).parent / f"resume{rank}.json").write_text(json.dumps(record))
        record.clear()
        _stages(record, Path(f"{killed}_fsdp"), ckpt, pairs, rl, rm, mode, "fsdp", "auto", FSDP_RESUMED,
                save_every=1)  # fmt: skip
        (Path(killed).parent / f"resume_fsdp{rank}.json").write_text(json.dumps(record))
    if mode == "two" and parallel == "ddp":
        _crash_after(1)
        _stages(record, out / "killed", ckpt, pairs, rl, rm, mode, parallel, "false", save_every=1)
        _stages(record, out / "killed_fsdp", ckpt, pairs, rl, rm, mode, "fsdp", "false", FSDP_RESUMED,
                save_every=1)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    from danlu.data.shards import tokenize_corpus
    from danlu.files import write_jsonl_atomic
    from tests.conftest import make_checkpoint

    root = tmp_path_factory.mktemp("scale_data")
    pairs, prompts, dialogs = [], [], []
    for a in range(2, 10):  # answers of different lengths, so rows differ in their token counts
        q = [{"role": "user", "content": f"{a} + 3 = ?"}]
        pairs.append({"prompt": q, "chosen": f"{a + 3}" + " 对" * (a % 3), "rejected": f"{a + 4} 不对"})
        prompts.append({"messages": q, "answer": str(a + 3)})
    for a in range(16):
        answer = f"{a + 3}" + " 对" * (a % 5) + " The capital of Japan is Tokyo." * (a % 3 == 0)
        dialogs.append({"messages": [{"role": "user", "content": f"{a} + 3 = ?"},
                                     {"role": "assistant", "content": answer}]})  # fmt: skip
    (root / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (root / "rl.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:4]))
    (root / "sft.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogs))
    # the detector's texts: 8 of each class, of different lengths (rows are padded), none shared
    human = [f"第{a}句: the river of city {a} is" + " very" * (a % 4) + " long." for a in range(8)]
    machine = [f"{a} + {a * 7} = {a * 8}." + f" {a} × 7 = {a * 7}。" * (a % 3) for a in range(8)]
    for name, texts in (("human", human), ("machine", machine)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                    for t in texts))  # fmt: skip
    make_checkpoint(root / "student", tiny_tokenizer, seed=1)  # distillation's student: other random weights
    # pretraining's token shards: numbers all through the text, so no two rows of 32 tokens are the same
    tiny_tokenizer.save(root / "tok")
    write_jsonl_atomic(root / "corpus.jsonl", ({"text": f"第{a}行: {a} × 7 = {7 * a}。The river of city {a} is "
                                                        f"{a % 5 + 1} km long."} for a in range(48)))  # fmt: skip
    tokenize_corpus(
        {"train": [root / "corpus.jsonl"]}, root / "tok", root / "shards", workers=1, progress=False
    )
    return {"pairs": root / "pairs.jsonl", "rl": root / "rl.jsonl", "student": root / "student"}


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved weights: the model's, or an adapter folder's own tensors."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else folder / "model.safetensors"))


def _pretrain_start(tokenizer: Any) -> torch.nn.Module:
    """Pretraining's first model: from scratch, as the stage builds it (seed 0)."""
    from danlu.model import Transformer
    from danlu.stages.pretrain import build_model_config

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Transformer(build_model_config(PRETRAIN_MODEL, tokenizer.padded_vocab_size(64), 32))


def test_two_processes_read_their_own_rows_match_one_and_resume_exactly(
    tmp_path: Path, tiny_checkpoint: Path, tiny_tokenizer, data
) -> None:
    """torchrun, 2 CPU processes (gloo): SFT (in full and with a LoRA adapter), pretraining and distillation (2
    rows of tokens per rank), reward, DPO (2 pairs per rank), the detector (1 human and 1 machine text per rank),
    GRPO and PPO (1 prompt per rank) give the losses, logged mean stats (reward, accuracy, …: the mean over the
    ranks, not rank 0's) and final weights of 1 process with 4 rows, 4 pairs, 4 texts and 2 prompts (to 1e-5), DDP
    and FSDP2 alike, each rank reading its own half of every global batch (hashed rows: for GRPO and PPO the sampled
    rollouts, the same text as one process samples). Each stage killed after step 1 on 2 processes continues, in a
    new launch, with the losses and weights of the uninterrupted run (to 1e-6), and its danlu.json's speed counts
    the tokens of every step of the stage, not only the resumed launch's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(tiny_checkpoint), str(data["pairs"]), str(data["rl"]), str(tmp_path / "one" / "reward")]
    one = subprocess.run([sys.executable, __file__, "one", str(tmp_path / "one"), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    ref = json.loads((tmp_path / "one" / "one0.json").read_text())

    def torchrun(parallel: str, *killed: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               __file__, "two", str(tmp_path / parallel), *args, parallel, *killed],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)  # fmt: skip

    # DDP, its stages killed after step 1 into ddp/killed; then FSDP2, which also continues ddp/killed (DDP): a new
    # launch resumes them, as a rerun after a kill does
    for parallel in ("ddp", "fsdp"):
        two = torchrun(parallel, *([str(tmp_path / "ddp" / "killed")] if parallel == "fsdp" else []))
        assert two.returncode == 0, two.stderr[-8000:]  # enough to hold the failing rank's own traceback
        r0, r1 = (json.loads((tmp_path / parallel / f"two{r}.json").read_text()) for r in (0, 1))
        if parallel == "fsdp":  # the teacher split between the ranks (dim 0 of each tensor, so not evenly)
            assert r0["teacher_share"] + r1["teacher_share"] == pytest.approx(1.0)
            assert max(r0["teacher_share"], r1["teacher_share"]) < 0.75
        else:
            assert r0["teacher_share"] == r1["teacher_share"] == 1.0
        for stage in STAGES:
            if parallel == "fsdp" and stage in ("grpo", "ppo"):
                assert "use train.parallel=ddp for " + stage in r0[stage]["refused"], stage
                continue
            assert len(ref[stage]["losses"]) == (2 if stage in ("grpo", "ppo") else 3), stage
            assert r0[stage]["losses"] == pytest.approx(ref[stage]["losses"], abs=1e-5), (parallel, stage)
            for step, want in enumerate(ref[stage]["stats"]):  # every rank logs the mean over the ranks
                for got in (r0[stage]["stats"][step], r1[stage]["stats"][step]):
                    assert got == pytest.approx(want, abs=1e-5), (parallel, stage, step)
            for step, rows in enumerate(ref[stage]["rows"]):
                mine, theirs = set(r0[stage]["rows"][step]), set(r1[stage]["rows"][step])
                assert not mine & theirs, (parallel, stage, step)  # different rows on each rank
                assert sorted(mine | theirs) == sorted(set(rows)), (parallel, stage, step)  # together: one's
            if parallel == "ddp":  # (FSDP2: each rank hashes its own shard)
                assert r0[stage]["weights"] == r1[stage]["weights"] != r0[stage]["start"], stage
            # The same update as one process: to 1e-3 of its size (Adam turns the float noise of a gradient near 0
            # into a step of up to lr on a handful of weights; other samples or advantages would differ by ~1).
            want = _final_weights(tmp_path / "one" / stage)
            got = _final_weights(tmp_path / parallel / stage)
            assert want.keys() == got.keys()
            if stage == "pretrain":  # its first weights built again (the hash: they are the run's)
                first = _pretrain_start(tiny_tokenizer)
                assert _weights_hash(first) == ref[stage]["start"]
                start = first.state_dict()
            else:
                start = _final_weights(data["student"] if stage == "distill" else tiny_checkpoint)
            if stage == "lora":  # B starts at 0 (A at random): its weights are how far it moved
                start = {k: torch.zeros_like(v) for k, v in want.items() if "lora_B" in k}
            moved = torch.cat([(want[k] - start[k]).flatten() for k in start if k in want])
            apart = torch.cat([(got[k] - want[k]).flatten() for k in want if k in start or stage == "lora"])
            assert apart.norm() < 1e-3 * moved.norm(), (parallel, stage, float(apart.norm() / moved.norm()))

    # every stage killed and resumed under DDP, FSDP_RESUMED under FSDP2 too (its weights: rank 0's shards)
    for parallel, stages, tail in (("ddp", STAGES, ""), ("fsdp", FSDP_RESUMED, "_fsdp")):
        killed = tmp_path / "ddp" / f"killed{tail}"
        straight = json.loads((tmp_path / parallel / "two0.json").read_text())
        again = json.loads((tmp_path / "ddp" / f"resume{tail}0.json").read_text())
        again1 = json.loads((tmp_path / "ddp" / f"resume{tail}1.json").read_text())
        for stage in stages:
            resumed = f"resumed {'sft' if stage == 'lora' else stage} from step 1 in {killed / stage}\n"
            assert resumed in two.stdout, stage  # not afresh
            # the resumed stage's history on every rank: step 1's record (from before the kill), then its own
            for rank_record in (again, again1):
                assert rank_record[stage]["losses"] == pytest.approx(straight[stage]["losses"], abs=1e-6), stage
            assert again[stage]["weights"] == straight[stage]["weights"], (parallel, stage)
            # its final speed is the whole stage's: step 1's tokens, trained before the kill, count too
            tokens = [json.loads((folder / stage / "danlu.json").read_text())["metrics"]["train_tokens"]
                      for folder in (killed, tmp_path / parallel)]  # fmt: skip
            assert tokens[0] == tokens[1] > 0, (parallel, stage, tokens)


def test_pair_and_prompt_sources_shard_the_global_batch(tiny_tokenizer, data) -> None:
    """In process: rank r of N reads the r-th slice of the global batch one process reads, for every position,
    across epochs; a checkpoint's data position carries over to another world size with the same global batch and
    refuses another global batch with the reason."""
    from danlu import DanluError
    from danlu.data.preference import PairBatches, encode_pairs, read_pairs, read_rl_prompts
    from danlu.stages.rollouts import Rollouts

    encoded = encode_pairs(read_pairs(data["pairs"]), tiny_tokenizer, 128)[0]
    one = PairBatches(encoded, 6, tiny_tokenizer.pad_id, seed=3)
    ranks = [PairBatches(encoded, 2, tiny_tokenizer.pad_id, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):  # 30 pairs of 8: several epochs
        want = one.next_batch()["input_ids"].tolist()
        got = [r.next_batch()["input_ids"].tolist() for r in ranks]
        pad = tiny_tokenizer.pad_id
        assert sorted(_row_hash(row, pad) for g in got for row in g) == sorted(
            _row_hash(r, pad) for r in want
        )
    with pytest.raises(DanluError, match="trained on 3 processes, this run has 1"):
        PairBatches(encoded, 2, tiny_tokenizer.pad_id, seed=3).load_state_dict(ranks[0].state_dict())

    prompts = read_rl_prompts(data["rl"])
    kw = {
        "group_size": 2,
        "prompts_per_step": 1,
        "max_new_tokens": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 0,
    }
    single = Rollouts(prompts, tiny_tokenizer, None, None, None, **{**kw, "prompts_per_step": 2})
    pair = [Rollouts(prompts, tiny_tokenizer, None, None, None, **kw, rank=r, world_size=2) for r in range(2)]
    for position in range(4):
        a, b = (p._prompt_indices(position) for p in pair)
        assert a + b == single._prompt_indices(position) and a != b
    pair[1].position = 3
    single.load_state_dict(pair[1].state_dict())  # 2 prompts a step either way: resharded
    assert single.position == 3
    halved = Rollouts(prompts, tiny_tokenizer, None, None, None, **kw)  # 1 prompt a step on 1 process
    with pytest.raises(DanluError, match="trained on 2 processes, this run has 1, and its rollout position"):
        halved.load_state_dict(pair[1].state_dict())


def test_packed_text_rows_shard_the_global_batch(tiny_tokenizer) -> None:
    """In process: distillation's rows follow pretraining's rule (RowOrder): rank r of 3 reads the r-th slice of the
    global batch one process reads, across epochs, and continues from a saved position; too few rows for one global
    batch is refused, naming both counts."""
    from danlu import DanluError
    from danlu.compress.distill import PackedRows

    texts = [f"第{a}行: {a} × 7 = {7 * a}。The capital of country {a} is city {a * 3}." for a in range(9)]
    one = PackedRows.from_texts(tiny_tokenizer, texts, 32, 6, seed=3)
    ranks = [PackedRows.from_texts(tiny_tokenizer, texts, 32, 2, seed=3) for _ in range(3)]
    for r, source in enumerate(ranks):
        source.shard(r, 3)
    for _ in range(4):  # 11 rows, 6 a global batch: a new epoch every batch
        want = one.next_batch()["input_ids"]
        assert torch.equal(torch.cat([r.next_batch()["input_ids"] for r in ranks]), want)
    again = PackedRows.from_texts(tiny_tokenizer, texts, 32, 2, seed=3)
    again.shard(1, 3)
    again.load_state_dict(ranks[1].state_dict())
    assert torch.equal(again.next_batch()["input_ids"], ranks[1].next_batch()["input_ids"])
    with pytest.raises(DanluError, match="11 rows of text, fewer than one global batch of 12"):
        ranks[0].shard(0, 6)


def test_rollouts_sample_the_same_rows_whatever_the_world_size(tiny_checkpoint: Path, data) -> None:
    """In process, the real generator: 2 ranks with 1 prompt each sample, together, the rows 1 process with 2
    prompts per step samples (each row seeded by its index in the run); another run seed samples other rows. And
    PPO's advantage whitening over the global batch is `losses.masked_whiten` on one process."""
    import contextlib

    from danlu.data.preference import read_rl_prompts
    from danlu.io import load_checkpoint
    from danlu.losses import masked_whiten
    from danlu.stages.ppo import whiten_global
    from danlu.stages.rollouts import Rollouts

    ckpt = load_checkpoint(tiny_checkpoint)
    prompts = read_rl_prompts(data["rl"])

    def source(seed: int = 0, **kw: Any) -> Rollouts:
        r = Rollouts(prompts, ckpt.tokenizer, ckpt.model, None, None, group_size=2, max_new_tokens=6,
                     temperature=1.0, top_p=1.0, seed=seed, **kw)  # fmt: skip
        r.autocast = contextlib.nullcontext
        return r

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy cores: 100× slower decode steps
    try:
        one = source(prompts_per_step=2)
        ranks = [source(prompts_per_step=1, rank=r, world_size=2) for r in range(2)]
        for position in range(2):
            want = [e.ids for e in one.sample(position)[1]]
            assert [e.ids for r in ranks for e in r.sample(position)[1]] == want
            assert len({tuple(ids) for ids in want}) == 4  # a group's two samples differ
        assert [e.ids for e in source(1, prompts_per_step=2).sample(1)[1]] != want
    finally:
        torch.set_num_threads(threads)

    x, mask = torch.randn(4, 7), torch.rand(4, 7) > 0.3
    torch.testing.assert_close(whiten_global(x, mask, 1) * mask, masked_whiten(x, mask) * mask)


class _Fixed:
    """A data source of fixed batches, in turn: rows with few and with many scored targets."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return {k: v.clone() for k, v in b.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


def _tiny_model(seed: int = 0) -> Any:
    from danlu.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=128, depth=1, max_position_embeddings=32))


def _uneven_batches() -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 2 rows: the first scores 2 tokens per row (short answers), the second 15 (long)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for scored in (2, 15):
        x = torch.randint(0, 128, (2, 16), generator=g)
        y = torch.randint(0, 128, (2, 16), generator=g)
        y[:, : 16 - scored] = -100
        out.append({"input_ids": x, "targets": y})
    return out


def _trainer(tmp: Path, data: Any, loss_fn: Any = None, **cfg: Any) -> Any:
    from danlu.engine import Hooks, TrainConfig, Trainer

    tcfg = TrainConfig(**{"steps": 1, "lr": 1e-2, "warmup_steps": 0, "eval_every": 0, "save_minutes": 0, **FAST,
                          **cfg})  # fmt: skip
    return Trainer(tcfg, _tiny_model(), data, loss_fn or (lambda m, b: (m(b["input_ids"], b["targets"]), {})), tmp,
                   Hooks(save_model=lambda state, folder, meta: None), stage="test")  # fmt: skip


def test_accumulated_loss_is_the_mean_over_the_global_batch_tokens(tmp_path: Path, monkeypatch) -> None:
    """grad_accum 2 (micro-batches of 2 and 15 scored tokens per row) gives the gradient of one batch of all 4 rows,
    whose mean runs over all 34 tokens: not the mean of the two micro-batch means, which weighs short answers more."""
    from danlu import engine

    grads: dict[str, torch.Tensor] = {}
    real_step = engine.optimizer_step

    def capture(optimizers: Any, params: Any, grad_clip: float, grad_norm: Any = None) -> float:
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[str(id(p))] = p.grad.clone()
        return real_step(optimizers, params, grad_clip, grad_norm)

    monkeypatch.setattr(engine, "optimizer_step", capture)
    micro = _uneven_batches()
    t = _trainer(tmp_path / "accum", _Fixed(micro), grad_accum=2, grad_clip=0.0)
    names = {str(id(p)): n for n, p in t.raw_model.named_parameters()}
    t.fit()
    accumulated = {names[k]: v for k, v in grads.items()}

    whole = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    for reduce_per_micro in (False, True):
        model = _tiny_model()
        if reduce_per_micro:  # the old rule: each micro-batch's own mean, averaged
            loss = sum(model(b["input_ids"], b["targets"]) for b in micro) / 2
        else:
            loss = model(whole["input_ids"], whole["targets"])
        loss.backward()
        same = all(
            torch.allclose(accumulated[n], p.grad, atol=1e-6, rtol=1e-5) for n, p in model.named_parameters()
        )
        assert (
            same != reduce_per_micro
        )  # equal to the global-batch gradient, and that differs from the old rule
    record = next(h for h in t.history if h.get("event") == "train")
    with torch.no_grad():
        assert record["loss"] == pytest.approx(
            float(_tiny_model()(whole["input_ids"], whole["targets"])), abs=1e-5
        )


class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), an infinite gradient backward: an overflow inside backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def test_non_finite_gradient_with_finite_loss_is_skipped(tmp_path: Path, capsys) -> None:
    from danlu.engine import NonFiniteLoss

    calls = {"n": 0}

    def loss_fn(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        loss = m(b["input_ids"], b["targets"])
        return (_InfGrad.apply(loss) if calls["n"] == 2 else loss), {}

    t = _trainer(tmp_path / "one_bad", _Fixed(_uneven_batches()), loss_fn, steps=3)
    t.fit()
    assert t.step == 3 and calls["n"] == 4  # the bad step was skipped and redone with the next batch
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    events = [h for h in t.history if h.get("event") == "nonfinite"]
    assert len(events) == 1 and "gradient norm is" in events[0]["what"]
    assert "gradient norm is" in capsys.readouterr().out

    always = _trainer(tmp_path / "all_bad", _Fixed(_uneven_batches()),
                      lambda m, b: (_InfGrad.apply(m(b["input_ids"], b["targets"])), {}), steps=5)  # fmt: skip
    before = {k: v.clone() for k, v in always.raw_model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="not finite for 3 steps.*gradient norm"):
        always.fit()
    assert all(torch.equal(v, always.raw_model.state_dict()[k]) for k, v in before.items())


def test_one_precedence_rule_for_settings() -> None:
    """stage section > recipe `train:` (and its top-level seed/device/dtype/compile) > stage defaults > engine."""
    from danlu.engine import TrainConfig
    from danlu.stages.common import train_config

    recipe = {"train": {"lr": 0.5, "batch_size": 3, "seed": 1}, "seed": 7, "dtype": "fp32"}
    defaults = {"lr": 2e-4, "steps": 150, "batch_size": 8, "weight_decay": 0.0}
    cfg = train_config(recipe, {"batch_size": 5, "dtype": "bf16"}, "dpo", defaults)
    assert cfg.lr == 0.5  # the recipe's train: beats the stage's built-in default
    assert cfg.batch_size == 5 and cfg.dtype == "bf16"  # the stage's own section beats both
    assert cfg.steps == 150 and cfg.weight_decay == 0.0  # stage defaults beat the engine's
    assert cfg.seed == 7  # a top-level key beats train:'s
    assert cfg.warmup_steps == TrainConfig().warmup_steps  # the engine's default where nobody says
    assert train_config({}, None, "sft").lr == TrainConfig().lr


@pytest.mark.parametrize("stage", ["reward", "dpo", "grpo", "ppo"])
def test_recipe_train_reaches_every_rl_stage(stage: str, tmp_path: Path, tiny_checkpoint: Path, data) -> None:
    """`train.lr=…` at the top of a recipe reaches reward/DPO/GRPO/PPO (it used to lose to their defaults), and
    the stage's own `train.lr` still wins over it."""
    from danlu.stages import dpo, grpo, ppo, reward

    recipe = {"train": {"lr": 0.0123, "weight_decay": 0.5}}
    small = {"resume": "false", "train": {**FAST, "steps": 1, "batch_size": 2, "lr": 0.0456}}
    rl = {"max_new_tokens": 2, "eval_rows": 0, "prompts_per_step": 1}
    out = tmp_path / stage
    if stage == "reward":
        reward.train_reward(
            tiny_checkpoint, data["pairs"], out, recipe=recipe, cfg=reward.RewardConfig(**small)
        )
    elif stage == "dpo":
        dpo.train_dpo(tiny_checkpoint, data["pairs"], out, recipe=recipe, cfg=dpo.DPOConfig(**small))
    elif stage == "grpo":
        grpo.train_grpo(tiny_checkpoint, data["rl"], out, recipe=recipe, cfg=grpo.GRPOConfig(**small, **rl,
                                                                                            group_size=2))  # fmt: skip
    else:
        ppo.train_ppo(
            tiny_checkpoint, data["rl"], out, recipe=recipe, reward="world", cfg=ppo.PPOConfig(**small, **rl)
        )
    saved = json.loads((out / "trainer_state" / "state.json").read_text())["config"]
    assert (
        saved["weight_decay"] == 0.5
    )  # recipe-level beats the stage's built-in default (0.0 for DPO/GRPO/PPO)
    assert saved["lr"] == 0.0456  # the stage's own section beats the recipe


def test_final_speed_is_the_stage_average(tmp_path: Path, tiny_tokenizer) -> None:
    """The figures users read, danlu.json's `tokens_per_s` and `mfu` (written by the stages' real saver), are the
    stage's: all tokens over all step time, below the fast last interval's figure. And after a kill and a resume they
    are still the whole stage's: the slow steps before the checkpoint count, not only the resumed launch's."""
    from danlu.stages.common import make_saver

    calls = {"n": 0}

    def slow_then_fast(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        if calls["n"] <= 2:
            time.sleep(0.3)
        return m(b["input_ids"], b["targets"]), {}

    def trainer(out: Path, loss_fn: Any, **cfg: Any) -> Any:
        t = _trainer(out, _Fixed(_uneven_batches()), loss_fn, peak_flops=1e9, **cfg)
        t.flops_per_token = 6.0 * sum(p.numel() for p in t.raw_model.parameters())
        t.hooks.save_model = make_saver(t.raw_model.config, tiny_tokenizer, {"stage": "test"}, chat=False)
        return t

    def final_speed(t: Any, out: Path, steps: int) -> dict[str, Any]:
        """The speed event, after checking it counts `steps` steps and danlu.json holds its figures."""
        speed = next(h for h in t.history if h.get("event") == "speed")
        assert speed["train_tokens"] == steps * 2 * 16
        saved = json.loads((out / "danlu.json").read_text(encoding="utf-8"))["metrics"]
        assert (saved["tokens_per_s"], saved["mfu"]) == (speed["tokens_per_s"], speed["mfu"])
        tps = speed["train_tokens"] / speed["train_seconds"]  # (train_seconds is rounded to ms)
        assert speed["tokens_per_s"] == pytest.approx(tps, rel=2e-3)
        assert speed["mfu"] == pytest.approx(tps * t.flops_per_token / 1e9, rel=2e-3) and speed["mfu"] > 0
        return speed

    t = trainer(tmp_path / "speed", slow_then_fast, steps=3)
    t.fit()
    last = [h for h in t.history if h.get("event") == "train"][-1]
    assert final_speed(t, tmp_path / "speed", 3)["tokens_per_s"] < last["tokens_per_s"]

    calls["n"] = 0

    def killed_at_step_3(m: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if calls["n"] == 2:
            raise KeyboardInterrupt  # after the checkpoint of step 2 (the 2 slow steps)
        return slow_then_fast(m, b)

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "killed", killed_at_step_3, steps=4, save_every=2).fit()
    calls["n"] = 2  # the resumed launch runs fast
    resumed = trainer(tmp_path / "killed", slow_then_fast, steps=4, save_every=2)
    resumed.resume()
    resumed.fit()
    assert (
        final_speed(resumed, tmp_path / "killed", 4)["train_seconds"] > 0.6
    )  # all 4 steps, the slow ones too


class _FakeWriter:
    """Stands in for TensorBoard's SummaryWriter (not installed here): appends each scalar to a file in its log
    folder by path, as the real one's event file lives there, so a log folder swapped away breaks the next write."""

    def __init__(self, log_dir: str) -> None:
        self.path = Path(log_dir) / "events.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with open(self.path, "r+") as f:  # r+: the file must still be there
            f.seek(0, 2)
            f.write(f"{tag} {step} {value}\n")

    def close(self) -> None:
        pass


def test_tensorboard_log_survives_checkpoint_swaps(tmp_path: Path, monkeypatch) -> None:
    import types

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    t = _trainer(tmp_path / "tb", _Fixed(_uneven_batches()), steps=3, save_every=1)
    t.hooks.save_model = lambda state, folder, meta: (folder / "config.json").write_text("{}")
    t.fit()
    lines = (tmp_path / "tb" / "tensorboard" / "events.txt").read_text().splitlines()
    assert [int(line.split()[1]) for line in lines if line.startswith("test/loss ")] == [1, 2, 3]


def test_fsdp_resume_continues_exactly_on_two_processes(tmp_path: Path, tiny_tokenizer) -> None:
    """torchrun, 2 CPU processes, FSDP2: 3 steps, then `--resume` to 6, gives the losses of 6 steps straight: the
    checkpoint holds the full weights and the full (gathered) optimizer state, and both go back into the shards."""
    from danlu.data.shards import tokenize_corpus
    from danlu.files import read_records, write_jsonl_atomic
    from tests.conftest import SAMPLE_TEXT

    tiny_tokenizer.save(tmp_path / "tok")
    write_jsonl_atomic(
        tmp_path / "train.jsonl", ({"text": t + f" {i}"} for i, t in enumerate(SAMPLE_TEXT * 4))
    )
    tokenize_corpus({"train": [tmp_path / "train.jsonl"]}, tmp_path / "tok", tmp_path / "shards", workers=1,
                    progress=False)  # fmt: skip
    common = [f"--data={tmp_path / 'shards'}", f"--tokenizer={tmp_path / 'tok'}", "--recipe=smoke", "dtype=fp32",
              "device=cpu", "model.depth=1", "pretrain.seq_len=32", "pretrain.eval_facts=0",
              "pretrain.train.eval_every=0", "pretrain.train.sample_every=0", "pretrain.train.log_every=1",
              "pretrain.train.warmup_steps=0", "pretrain.train.schedule=constant", "train.threads=1",
              "train.batch_size=2", "train.parallel=fsdp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, steps: int, *extra: str) -> list[float]:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "danlu", "pretrain", f"--out={out}", *common, f"pretrain.train.steps={steps}",
                              *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-8000:]
        return [r["loss"] for r in read_records(out / "metrics.jsonl") if r.get("event") == "train"]

    straight = torchrun(tmp_path / "straight", 6)
    assert len(torchrun(tmp_path / "resumed", 3)) == 3
    resumed = torchrun(tmp_path / "resumed", 6, "--resume")
    assert len(straight) == len(resumed) == 6
    assert resumed == pytest.approx(straight, abs=1e-6)


if __name__ == "__main__":
    from danlu.engine import close_distributed

    try:  # as `danlu <command>` does: the group ends before the interpreter does
        _worker(
            sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), *sys.argv[6:]
        )
    finally:
        close_distributed()
