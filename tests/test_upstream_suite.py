"""analytics-python 2.4.0's own tests of its public API, run against segmentry.compat
with only their import lines changed (tools/upstream_suite.py), against a local receiver
that accepts any write key. The exact set of passes is asserted, so that a regression
fails here; every test expected to fail is listed with its reason (and in the README)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import upstream_suite
from fake_segment import FakeSegment

ROOT = Path(__file__).resolve().parent.parent

# The tests that exercise the public API: three files whole, the OAuth integration
# tests, and the three of test_consumer.py that only build a Client.
SELECTED = [
    "test_client.py",
    "test_init.py",
    "test_module.py",
    "test_oauth.py::TestOauthIntegration",
    "test_consumer.py::TestConsumer::test_none_max_total_backoff_duration_rejected_by_client",
    "test_consumer.py::TestConsumer::test_none_max_rate_limit_duration_rejected_by_client",
    "test_consumer.py::TestConsumer::test_client_defaults_to_the_documented_rate_limit_budget",
]
EXPECTED_FAILURES = {
    # mock.patch analytics-python's private modules, which segmentry does not use:
    "test_client.py::TestClient::test_user_defined_upload_size":
        "patches segment.analytics.consumer.post",
    "test_client.py::TestClient::test_proxies": "patches segment.analytics.request._session",
    # OAuth is not supported (ConfigurationError at construction):
    "test_oauth.py::TestOauthIntegration::test_oauth_integration_success": "OAuth",
    "test_oauth.py::TestOauthIntegration::test_oauth_integration_failure": "OAuth",
    "test_oauth.py::TestOauthIntegration::test_oauth_integration_recovery": "OAuth",
    "test_oauth.py::TestOauthIntegration::test_oauth_integration_fail_bad_key": "OAuth",
}
EXPECTED_PASSES = 49  # of the 55 selected

# Loaded first by the converted suite: any connection but to the loopback fails.
GUARD = '''
import socket

_connect = socket.socket.connect


def _loopback_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1", "::1"):
        raise OSError("test guard: connection to %r refused (tests stay on 127.0.0.1)"
                      % (address[0],))
    return _connect(self, address)


socket.socket.connect = _loopback_only
'''


def run_converted(tmp_path: Path, receiver_url: str) -> dict[str, str]:
    """Convert, run the selection in a fresh interpreter; {test id: outcome}."""
    suite = tmp_path / "upstream"
    upstream_suite.convert(str(suite))
    (suite / "conftest.py").write_text(GUARD)
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEGMENTRY_API_URL": receiver_url,
           "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "home"),
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    env.pop("SEGMENTRY_QUEUE", None)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--timeout", "300", f"--junitxml={report}", *SELECTED],
        cwd=suite, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=600, check=False)
    return _outcomes(report)


def _outcomes(report: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module, cls = case.get("classname", "").rsplit(".", 1)
        test_id = f"{module.replace('.', '/')}.py::{cls}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[test_id] = "failed" if failed else (
            "skipped" if case.find("skipped") is not None else "passed")
    return outcomes


@pytest.mark.timeout(600)
def test_analytics_pythons_own_suite_passes_against_compat(tmp_path: Path) -> None:
    with FakeSegment(record=True) as receiver:  # no write_key: any key is accepted
        outcomes = run_converted(tmp_path, receiver.url)
        received = receiver.stats()["events"]
    failed = {test for test, outcome in outcomes.items() if outcome != "passed"}
    assert failed == set(EXPECTED_FAILURES)
    assert len(outcomes) - len(failed) == EXPECTED_PASSES
    assert received >= 2000  # test_flush and test_shutdown's 1,000 events each, at least


def test_the_converter_fails_when_an_import_line_does_not_match() -> None:
    with pytest.raises(upstream_suite.Mismatch, match="test_module.py"):
        upstream_suite.convert_text("test_module.py", "import segment.analytics\n")


def test_the_converter_changes_only_the_listed_import_lines() -> None:
    text = ("import mock\nimport segment.analytics as analytics\n\n"
            "from segment.analytics.consumer import Consumer\n")
    assert upstream_suite.convert_text("test_module.py", text) == (
        "import mock\nimport segmentry.compat as analytics\n\n"
        "from segment.analytics.consumer import Consumer\n")


def test_the_converter_command_fails_with_one_line_when_a_line_does_not_match(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(upstream_suite.SUBSTITUTIONS, "test_module.py",
                        [(upstream_suite.IMPORT_PACKAGE, 2)])
    assert upstream_suite.main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matched 1 line(s), expected 2" in err
