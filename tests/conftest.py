"""Shared fixtures. Tests use the built-in world corpus and small fixtures they write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project (development and CI only); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (only present in development and CI)")
    return SHARED_DATA


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
