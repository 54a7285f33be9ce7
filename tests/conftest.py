"""Shared test setup: tools/ (the fake Segment receiver) is importable from the tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
