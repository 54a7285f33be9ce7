"""The short chaos run as a test: producers and the flusher are SIGKILLed at random while
the receiver fails on purpose, and every property of "the promise" must hold
(tools/chaos.py documents P1-P6)."""

from __future__ import annotations

import pytest
from helpers import run_harness

pytestmark = pytest.mark.slow

PROPERTIES = ("P1", "P2", "P3", "P4", "P5", "P6")


@pytest.fixture(scope="module")
def chaos_run():
    return run_harness("tools/chaos.py", "--seconds", "30", "--seed", "1")


def test_the_short_chaos_run_passes(chaos_run):
    done, report = chaos_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["pass"] is True, report.get("verdict")


@pytest.mark.parametrize("prop", PROPERTIES)
def test_property_holds(chaos_run, prop):
    _, report = chaos_run
    assert report["properties"][prop], (report.get("violations", {}).get(prop),
                                        report.get("verdict"))


def test_the_run_really_was_chaotic(chaos_run):
    """A run without kills, faults or traffic would pass vacuously."""
    _, report = chaos_run
    assert report["returned"] > 1000
    assert report["kills"] >= 5 and report["flusher_kills"] >= 1
    assert report["faults"] >= 3
    assert report["integrity_checks"] >= report["kills"]
