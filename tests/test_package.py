"""The package as a user meets it: what `import segmentry` gives and costs, the files a
legal or release review reads, and the README's recipes run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import segmentry
from segmentry.storage import SQLiteQueue

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def run_python(code, env=None, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_import_segmentry_reaches_http_and_testing_without_importing_requests():
    code = """if True:
        import sys
        import segmentry
        assert "requests" not in sys.modules, "import segmentry imported requests"
        assert {"http", "testing"} <= set(dir(segmentry))
        http = segmentry.http.client("KEY")
        assert type(http).__name__ == "HTTPClient"
        assert segmentry.testing.Stub and "requests" in sys.modules
        try:
            segmentry.no_such_thing
        except AttributeError as exc:
            print(exc)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "has no attribute 'no_such_thing'" in result.stdout


def test_the_license_file_is_the_mit_license_pyproject_declares():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the segmentry authors" in text
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject


def test_the_changelog_has_an_entry_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {segmentry.__version__}" in changelog


def test_the_python_versions_stated_agree_with_each_other_and_include_this_one():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    classified = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject)
    minimum = re.search(r'requires-python = ">=(3\.\d+)"', pyproject).group(1)
    stated = re.search(r"Python (3\.\d+) to (3\.\d+)", README)
    assert stated, "the README states the Python versions near the top"
    assert classified[0] == minimum == stated.group(1) and classified[-1] == stated.group(2)
    assert classified == [f"3.{n}" for n in range(int(minimum[2:]), int(classified[-1][2:]) + 1)]
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in classified


def django_recipe():
    """The README's Django AppConfig, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    recipes = [b for b in blocks if "AppConfig" in b]
    assert len(recipes) == 1, "the README has one Django recipe"
    return recipes[0]


# Runs the recipe with a stand-in for django.apps (Django is not a test dependency): the
# AppConfig as Django would (ready() once, at start), then a call, as a view or a signal
# handler inside a management command would make it.
RUN_RECIPE = """if True:
    import json, sys, types
    apps = types.ModuleType("django.apps")
    apps.AppConfig = type("AppConfig", (), {"__init__": lambda self, name, module: None})
    sys.modules.update(django=types.ModuleType("django"), **{"django.apps": apps})
    namespace = {}
    exec(sys.argv[1], namespace)
    namespace["YourAppConfig"]("yourapp", None).ready()
    import segmentry
    client = segmentry.default_client()
    track = segmentry.track("u1", "Image Built") if sys.argv[2] == "track" else None
    print(json.dumps({"flusher": client.options.flusher, "id": track}))
"""


def recipe_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SEGMENTRY_", "SEGMENT_WRITE_KEY"))}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), **extra)
    return env


def test_the_django_recipe_works_in_a_manage_py_command_without_a_write_key(tmp_path):
    result = run_python(RUN_RECIPE, recipe_env(tmp_path), django_recipe(), "track")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["flusher"] is None and out["id"]  # stored, not dropped, no key needed
    queue = SQLiteQueue(str(tmp_path / "state" / "segmentry" / "queue.db"))
    try:
        assert queue.stats(time.time()).depth == 1  # waiting for a process with the key
    finally:
        queue.close()


def test_the_django_recipe_delivers_from_the_process_when_a_key_is_set(tmp_path):
    env = recipe_env(tmp_path, SEGMENT_WRITE_KEY="KEY",
                     SEGMENTRY_API_URL="http://127.0.0.1:9/")  # never reached: no event
    result = run_python(RUN_RECIPE, env, django_recipe(), "no event")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["flusher"] == "thread"


@pytest.mark.parametrize("path", ["segmentry", "tools", "benchmarks", "tests", "README.md"])
def test_nothing_refers_to_a_design_document_outside_the_repository(path):
    files = [ROOT / path] if (ROOT / path).is_file() else (ROOT / path).rglob("*.py")
    name = "DESIGN" + ".md"  # spelled in two parts, so that this file does not match
    assert [str(f) for f in files if name in f.read_text(encoding="utf-8")] == []
