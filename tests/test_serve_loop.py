"""The feedback loop closes: a served model's wrong answer is corrected on the page's API, the feedback is
exported as SFT data, the model is fine-tuned on it, and the new model — served without the correction
memory — answers the corrected question right.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

QUESTION = "日本的首都是哪里?"
RIGHT = "东京。"
NOW = dt.datetime(2026, 11, 21, 14, 5)


def _fine_tune(ckpt: Path, sft_file: Path, out: Path, steps: int = 120) -> Path:
    """`danlu sft`'s code on the exported `messages` records: loss on assistant tokens only, a chat checkpoint."""
    from danlu.stages.sft import SFTConfig, sft

    train = {"steps": steps, "batch_size": 1, "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0, "eval_every": 0,
             "compile": "off", "progress": False, "device": "cpu", "dtype": "fp32"}  # fmt: skip
    cfg = SFTConfig(val_dialogs=0, replay=0.0, eval_limit=0, bpb_rows=0, train=train)
    sft(ckpt, [sft_file], out, recipe={}, cfg=cfg)
    return out


@pytest.mark.slow
def test_feedback_export_fine_tunes_and_the_question_is_answered_right(tmp_path: Path):
    import httpx
    import openai
    from test_serve import make_checkpoint  # tests/ is on sys.path under pytest

    from danlu.cli import main
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.feedback import FeedbackStore
    from danlu.serve.memory import CorrectionMemory
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer

    base = make_checkpoint(tmp_path / "base")
    db = tmp_path / "feedback.sqlite3"
    msgs = [{"role": "user", "content": QUESTION}]

    def serve(path: Path, memory: bool):
        model = load_served_model("m", str(path))
        opts = ServeOptions(
            feedback=FeedbackStore(db), memory=CorrectionMemory() if memory else None, now=lambda: NOW
        )
        return model, create_app([model], opts)

    model, app = serve(base, memory=True)
    try:
        with BackgroundServer(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = client.chat.completions.create(
                model="m", messages=msgs, max_tokens=10, temperature=0, store=True
            )
            wrong = r.choices[0].message.content
            assert RIGHT not in wrong
            for fb in ({"rating": -1}, {"correction": RIGHT}):
                assert httpx.post(url + "/v1/feedback", json={"response_id": r.id, **fb}).status_code == 200
    finally:
        model.worker.close()

    assert main(["feedback", "export", "--db", str(db), "--out", str(tmp_path / "export")]) == 0
    sft = [json.loads(x) for x in (tmp_path / "export" / "sft.jsonl").read_text().splitlines()]
    pref = [json.loads(x) for x in (tmp_path / "export" / "preference.jsonl").read_text().splitlines()]
    assert sft == [{"messages": [*msgs, {"role": "assistant", "content": RIGHT}], "source": "correction"}]
    assert pref[0]["chosen"][0]["content"] == RIGHT and pref[0]["rejected"][0]["content"] == wrong

    tuned = _fine_tune(base, tmp_path / "export" / "sft.jsonl", tmp_path / "tuned")
    model, app = serve(tuned, memory=False)  # the weights alone must now know it
    try:
        with BackgroundServer(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0)
            assert r.choices[0].message.content == RIGHT
    finally:
        model.worker.close()
