"""The systemd side of the flusher service: the notify protocol against a socket of the
test's own, and the example unit checked by systemd-analyze where it exists."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from segmentry._systemd import Notifier

UNIT = Path(__file__).resolve().parent.parent / "tools" / "segmentry-flusher.service"


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    yield sock
    sock.close()


def received(sock):
    return sock.recv(4096).decode()


def test_ready_status_on_change_only_and_stopping_reach_the_socket(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.getsockname()})
    notifier.ready("standby")
    notifier.status("standby")  # unchanged: not sent
    notifier.status("delivering")
    notifier.stopping()
    assert received(notify_socket) == "READY=1\nSTATUS=standby"
    assert received(notify_socket) == "STATUS=delivering"
    assert received(notify_socket) == "STOPPING=1\nSTATUS=stopping"


def test_the_watchdog_is_pinged_at_half_its_interval_and_only_for_our_pid(notify_socket):
    now = [0.0]
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "10000000",
           "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier(env, clock=lambda: now[0])
    notifier.alive()
    now[0] = 4.9
    notifier.alive()  # too soon: not sent
    now[0] = 5.0
    notifier.alive()
    notifier.ready("x")
    assert [received(notify_socket) for _ in range(3)] == [
        "WATCHDOG=1", "WATCHDOG=1", "READY=1\nSTATUS=x"]
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_s == 0


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("standby")
    notifier.alive()


def test_an_abstract_socket_address_is_used_as_linux_spells_it():
    assert Notifier({"NOTIFY_SOCKET": "@segmentry/x"}).address == "\0segmentry/x"


def _analyze(tmp_path, *args):
    """systemd-analyze on a copy of the unit whose ExecStart names this interpreter:
    verify checks that the command exists, and /opt/segmentry is a host's, not ours."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not found: apt-get install systemd (.ci/run installs it)")
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "ExecStart=/opt/segmentry/bin/python " in text
    unit.write_text(text.replace("/opt/segmentry/bin/python", sys.executable))
    return subprocess.run([tool, *args, str(unit)], capture_output=True, text=True, timeout=60)


def test_the_example_unit_verifies_cleanly(tmp_path):
    result = _analyze(tmp_path, "verify")
    # verify exits 0 on ignored bad keys too: any line about our file is a finding.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert UNIT.name not in result.stdout, result.stdout


def test_the_example_unit_is_hardened_to_an_exposure_of_2_5_or_lower(tmp_path):
    result = _analyze(tmp_path, "security", "--offline=true", "--threshold=25")
    assert result.returncode == 0, result.stdout[-2000:]
