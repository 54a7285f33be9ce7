"""Shared test setup: tools/ (the fake Segment receiver) is importable from the tests."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


@pytest.fixture
def queue_path(tmp_path):
    """A queue file path in the test's own directory (the file is not created)."""
    return str(tmp_path / "q.db")


@pytest.fixture(autouse=True)
def no_write_key_from_the_caller(monkeypatch):
    """Client falls back on SEGMENT_WRITE_KEY: a developer's own must not change a test."""
    monkeypatch.delenv("SEGMENT_WRITE_KEY", raising=False)

