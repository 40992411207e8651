"""A bounded schemathesis run against the server's own OpenAPI document (issue 15): whatever a client sends to any
route — odd types, huge numbers, empty bodies, unknown fields — the answer is never a 5xx.

Loopback only: the server runs on 127.0.0.1 in this process; each route gets a fixed number of generated cases.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from danlu.serve.app import ServeOptions, create_app  # noqa: E402
from danlu.serve.feedback import FeedbackStore  # noqa: E402
from danlu.serve.memory import CorrectionMemory  # noqa: E402
from danlu.serve.routing import load_served_model  # noqa: E402
from danlu.serve.server import BackgroundServer  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402

CASES_PER_ROUTE = 20  # per route and per mode (schema-valid, schema-violating)


@pytest.fixture(scope="module")
def served_url(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fuzz_ckpt"), tiny_tokenizer, context=128)
    model = load_served_model("m", str(ckpt))
    db = tmp_path_factory.mktemp("fuzz_db") / "feedback.sqlite3"
    options = ServeOptions(feedback=FeedbackStore(db), memory=CorrectionMemory(0.8), admin_key="admin-key")
    with BackgroundServer(create_app([model], options)) as url:
        assert url.startswith("http://127.0.0.1:")
        yield url
    model.worker.close()


def _bounded(case) -> None:  # noqa: ANN001 (schemathesis' Case)
    """Generation is kept short so the run stays bounded; every other field keeps what was generated."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "n"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 8:
                body[key] = 8


def test_no_request_makes_the_server_fail(served_url: str) -> None:
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{served_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= labels, labels
    sent: dict[str, int] = {}
    for op in operations:
        for mode in schemathesis.GenerationMode:  # requests the schema allows, and requests that break it
            label = f"{op.label} ({mode.value})"

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=CASES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)  # fmt: skip
            def run(case) -> None:  # noqa: ANN001
                _bounded(case)
                case.call_and_validate(checks=[not_a_server_error], timeout=60)
                sent[label] = sent.get(label, 0) + 1  # noqa: B023 (run() is called in this iteration)

            try:
                run()
            except Unsatisfiable:  # nothing to break in a route without parameters or body (GET /health)
                assert mode is schemathesis.GenerationMode.NEGATIVE, op.label
    print(f"schemathesis: {sum(sent.values())} requests: {sent}")
    body_routes = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/feedback")
    for route in body_routes:  # bodies were generated both ways for the routes that take one
        assert sent.get(f"{route} (positive)", 0) >= 5 and sent.get(f"{route} (negative)", 0) >= 5, sent
