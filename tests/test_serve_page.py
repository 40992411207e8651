"""The chat page in headless Chromium (Debian `chromium`, driven by Playwright): send, stream, rate, correct.

CI installs Chromium (`apt-get install -y chromium`); where /usr/bin/chromium is absent the test skips.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.slow
def test_page_chat_stream_thumbs_down_and_correction(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip("Chromium not installed at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import torch

    from danlu.io import save_model_dir
    from danlu.model import ModelConfig, Transformer
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.feedback import FeedbackStore
    from danlu.serve.routing import load_served_model
    from danlu.serve.server import BackgroundServer
    from danlu.tokenizer import Tokenizer

    tok = Tokenizer.train(["中国最高的山是珠穆朗玛峰。The capital of Japan is Tokyo."] * 20, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, depth=1, max_position_embeddings=256)
    torch.manual_seed(0)
    save_model_dir(tmp_path / "ckpt", Transformer(cfg).state_dict(), cfg, tok, {"stage": "test"}, chat=True)
    model = load_served_model("tiny", str(tmp_path / "ckpt"))
    db = tmp_path / "feedback.sqlite3"
    app = create_app([model], ServeOptions(feedback=FeedbackStore(db)))
    try:
        with BackgroundServer(app) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#model option[value=tiny]", state="attached")
            page.fill("#max_tokens", "24")
            page.fill("#input", "中国最高的山是什么?")
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            answer.locator("[data-testid=thumbs-down]").wait_for(timeout=30_000)  # shown once the stream ends
            assert page.locator(".msg.user .content").first.inner_text() == "中国最高的山是什么?"
            assert answer.locator(".content").inner_text().strip(), "no streamed text on the page"
            assert "tok/s" in answer.locator(".meta").inner_text()
            answer.locator("[data-testid=thumbs-down]").click()
            page.locator(".msg.assistant [data-testid=thumbs-down].on").wait_for()
            page.locator(".msg.assistant [data-testid=correct]").click()
            page.fill("[data-testid=correction-text]", "珠穆朗玛峰。")
            page.click("[data-testid=correction-save]")
            page.locator(".msg.assistant .correction").wait_for()
            # regenerate replaces the answer; edit-and-resend replaces the question and what followed it
            page.click("[data-testid=regenerate]")
            page.locator(".msg.assistant [data-testid=thumbs-down]:not(.on)").wait_for(timeout=30_000)
            assert page.locator(".msg").count() == 2
            page.click(".msg.user [data-testid=edit]")
            page.fill("[data-testid=edit-text]", "日本的首都是哪里?")
            page.click("[data-testid=edit-save]")
            page.locator(".msg.assistant [data-testid=thumbs-up]").wait_for(timeout=30_000)
            assert page.locator(".msg.user .content").all_inner_texts() == ["日本的首都是哪里?"]
            with page.expect_download() as download:
                page.click("#export")
            exported = json.loads(Path(download.value.path()).read_text())
            assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
            browser.close()
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT r.messages, t.rating, c.correction FROM responses r JOIN ratings t ON t.response_id = r.id "
                "JOIN corrections c ON c.response_id = r.id"
            ).fetchall()
        assert len(rows) == 1  # three answers stored; the first one rated and corrected
        messages, rating, correction = rows[0]
        assert "中国最高的山是什么?" in messages and rating == -1 and correction == "珠穆朗玛峰。"
    finally:
        model.worker.close()
