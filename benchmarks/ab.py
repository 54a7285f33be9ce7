"""Two checkouts of segmentry side by side: `track()` with the default flusher thread,
alternated run by run in fresh processes against one receiver, the ratio taken per pair.
On a shared, noisy machine a change of a few percent shows in paired runs long before it
shows in medians taken apart.

    git worktree add /tmp/before <commit>
    python benchmarks/ab.py /tmp/before . [--pairs 10] [--events 20000] [--options '{}']

Each run: `Client(api_url=<receiver>, **options)` from that checkout, 500 untimed calls,
then ``--events`` timed `track()` calls and a flush: the rate of the calls, and end to end,
of the calls and the flush together (until every event was delivered). With
``--replay``: a backlog of ``--events`` enqueued untimed (``flusher=None``), then drained
by that checkout's ``python -m segmentry.flusher --drain``, timed from spawn to exit.
Prints each pair and the median of B/A; B wins when its rate is higher.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.common import Receiver  # noqa: E402

CHILD = """
import json, os, sys, time
sys.path.insert(0, os.path.abspath(sys.argv[1]))
import segmentry
url, queue, events = sys.argv[2], sys.argv[3], int(sys.argv[4])
client = segmentry.Client("KEY", api_url=url, queue_path=queue, **json.loads(sys.argv[5]))
assert segmentry.__file__.startswith(os.path.abspath(sys.argv[1])), segmentry.__file__
for i in range(500):
    client.track("warm-up", "Bench Event", {"i": i})
start = time.perf_counter()
for i in range(events):
    client.track(f"user-{i}", "Bench Event", {"plan": "pro", "i": i})
calls = time.perf_counter() - start
if sys.argv[6] == "fill":  # a backlog for --replay: nothing delivers it here
    client.close()
    raise SystemExit(0)
assert client.flush(timeout=120), "not delivered"
e2e = time.perf_counter() - start
client.close()
print(json.dumps({"track": events / calls, "end to end": events / e2e}))
"""


def run(root: str, rx: Receiver, workdir: str, events: int, options: str,
        replay: bool) -> dict[str, float]:
    queue = os.path.join(tempfile.mkdtemp(dir=workdir), "queue.db")
    rx.reset()
    if replay:
        options = json.dumps({**json.loads(options), "flusher": None})
    out = subprocess.run([sys.executable, "-c", CHILD, root, rx.url, queue, str(events),
                          options, "fill" if replay else "time"], env=common.child_env(),
                         capture_output=True, text=True, check=True).stdout
    if not replay:
        return {k: float(v) for k, v in json.loads(out).items()}
    env = {**common.child_env(), "PYTHONPATH": os.path.abspath(root),
           "SEGMENT_WRITE_KEY": "KEY"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segmentry.flusher", "--queue", queue, "--drain",
                    "--api-url", rx.url, "--progress", "none"], env=env, check=True,
                   capture_output=True)
    return {"replay": events / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the checkout to compare against (A)")
    parser.add_argument("b", help="the checkout compared (B)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--options", default="{}", help="Client options, as JSON")
    parser.add_argument("--replay", action="store_true",
                        help="time a flusher process draining a backlog of --events")
    args = parser.parse_args(argv)
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as workdir, Receiver(workdir) as rx:
        for pair in range(args.pairs):
            order = (args.a, args.b) if pair % 2 == 0 else (args.b, args.a)
            runs = {root: run(root, rx, workdir, args.events, args.options, args.replay)
                    for root in order}
            line = []
            for measure, a in runs[args.a].items():
                b = runs[args.b][measure]
                ratios.setdefault(measure, []).append(b / a)
                line.append(f"{measure}: A {a:,.0f}  B {b:,.0f}  B/A {b / a:.3f}")
            print(f"pair {pair + 1}: " + ";  ".join(line), flush=True)
    for measure, values in ratios.items():
        wins = sum(r > 1 for r in values)
        print(f"{measure}: median B/A {statistics.median(values):.3f} "
              f"(B faster in {wins} of {len(values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
