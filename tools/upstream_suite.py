"""Convert analytics-python 2.4.0's own test suite (``segment/analytics/test/`` in the
installed wheel) to run against ``segmentry.compat``, changing ONLY its import lines:

    import segment.analytics as analytics         -> import segmentry.compat as analytics
    from segment.analytics.client import Client   -> from segmentry.compat import Client
    from segment.analytics.version import VERSION -> from segmentry.compat import VERSION

Every substitution must match as many times as listed, or the tool fails (exit 1, one
line): a new analytics-python release must be looked at, not converted blindly. Imports of
analytics-python's private modules (``consumer``, ``request``, ``oauth_manager``) are left
as they are: the tests that use them test analytics-python's internals, not its API.

Command: ``python tools/upstream_suite.py OUT_DIR`` writes the converted files there and
prints their paths. tests/test_upstream_suite.py runs them against a local receiver.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

UPSTREAM_VERSION = "2.4.0"
IMPORT_PACKAGE = ("import segment.analytics as analytics", "import segmentry.compat as analytics")
IMPORT_CLIENT = ("from segment.analytics.client import Client",
                 "from segmentry.compat import Client")
IMPORT_VERSION = ("from segment.analytics.version import VERSION",
                  "from segmentry.compat import VERSION")
# file -> (substitution, how many lines it must change)
SUBSTITUTIONS: dict[str, list[tuple[tuple[str, str], int]]] = {
    "test_client.py": [(IMPORT_CLIENT, 1), (IMPORT_VERSION, 1)],
    "test_consumer.py": [(IMPORT_CLIENT, 3)],
    "test_init.py": [(IMPORT_PACKAGE, 1), (IMPORT_CLIENT, 1)],
    "test_module.py": [(IMPORT_PACKAGE, 1)],
    "test_oauth.py": [(IMPORT_CLIENT, 1)],
}


class Mismatch(Exception):
    """A substitution did not match the expected number of lines."""


def upstream_dir() -> str:
    spec = importlib.util.find_spec("segment.analytics")
    if spec is None or not spec.submodule_search_locations:
        raise Mismatch("segment-analytics-python is not installed")
    from segment.analytics.version import VERSION

    if VERSION != UPSTREAM_VERSION:
        raise Mismatch(f"analytics-python {VERSION} is installed; this converts "
                       f"{UPSTREAM_VERSION}'s suite")
    return os.path.join(list(spec.submodule_search_locations)[0], "test")


def convert_text(name: str, text: str) -> str:
    """One file's text with its substitutions made; Mismatch if one does not match."""
    lines = text.splitlines(keepends=True)
    for (old, new), expected in SUBSTITUTIONS[name]:
        hits = [i for i, line in enumerate(lines) if line.strip() == old]
        if len(hits) != expected:
            raise Mismatch(f"{name}: {old!r} matched {len(hits)} line(s), expected {expected}")
        for i in hits:
            lines[i] = lines[i].replace(old, new)
    return "".join(lines)


def convert(out_dir: str) -> list[str]:
    """Write every converted file into ``out_dir``; return their paths."""
    source = upstream_dir()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in SUBSTITUTIONS:
        with open(os.path.join(source, name), encoding="utf-8") as f:
            text = convert_text(name, f.read())
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        paths = convert(args.out_dir)
    except (Mismatch, OSError) as exc:
        print(f"upstream_suite: {exc}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
