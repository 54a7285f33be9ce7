"""The quick-start demo: crash-prone workers enqueue events and are SIGKILLed part way,
then the flusher drains the queue into a local receiver; prints what was enqueued,
delivered and lost. No network: the receiver (tools/fake_segment.py) is on 127.0.0.1.

    python tools/demo.py [--workers 4] [--events 20000] [--queue PATH]

Exits 0 when nothing whose call returned was lost.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_segment import FakeSegment  # noqa: E402

KEY = "demo-write-key"

# A worker: the default Client (durable queue + in-process flusher thread), printing each
# messageId once track() has returned it. It never exits by itself: it gets SIGKILLed.
WORKER = """
import sys, segmentry
client = segmentry.Client(sys.argv[1], queue_path=sys.argv[2], api_url=sys.argv[3],
                          batch_every_ms=200)
i = 0
while True:
    print(client.track("user-%d" % (i % 1000), "Demo Event", {"i": i}), flush=True)
    i += 1
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--events", type=int, default=20_000, help="total, across the workers")
    p.add_argument("--queue", help="queue file (default: a new temporary one)")
    return p.parse_args()


def run_worker(queue: str, url: str, quota: int) -> list[str]:
    """Start a worker, read the messageIds it returns, SIGKILL it after ``quota``."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, KEY, queue, url],
                            stdout=subprocess.PIPE, text=True)
    returned = []
    assert proc.stdout is not None
    for line in proc.stdout:
        returned.append(line.strip())
        if len(returned) >= quota:
            break
    proc.send_signal(signal.SIGKILL)  # mid-stream: mid-enqueue, mid-send, whatever it was doing
    proc.wait()
    return returned


def drain(queue: str, url: str) -> int:
    env = {**os.environ, "SEGMENT_WRITE_KEY": KEY}
    cmd = [sys.executable, "-m", "segmentry.flusher", "--queue", queue, "--api-url", url,
           "--drain", "--drain-timeout", "120", "--progress", "none", "--log-level", "WARNING"]
    return subprocess.run(cmd, env=env).returncode


def main() -> int:
    args = parse_args()
    queue = args.queue or os.path.join(tempfile.mkdtemp(prefix="segmentry-demo-"), "queue.db")
    started = time.monotonic()
    with FakeSegment(write_key=KEY, record=True) as receiver:
        print(f"receiver on {receiver.url}, queue file {queue}")
        share = args.events // args.workers
        quotas = [random.randint(share // 2, share * 3 // 2) for _ in range(args.workers)]
        with ThreadPoolExecutor(args.workers) as pool:  # the workers run side by side
            results = list(pool.map(lambda q: run_worker(queue, receiver.url, q), quotas))
        returned = [mid for ids in results for mid in ids]
        for n, ids in enumerate(results):
            print(f"worker {n + 1}: {len(ids)} events enqueued, then SIGKILLed")
        before = receiver.stats()["unique"]
        # A worker enqueues on past its quota until the SIGKILL lands: only the messageIds
        # read back count as enqueued, so this can be the larger number.
        print(f"delivered by the workers' own flusher threads before they died: {before} "
              f"(events enqueued after the last messageId read back included)")
        code = drain(queue, receiver.url)
        delivered = {e["messageId"] for e in receiver.events()}
        stats = receiver.stats()
    dropped = returned.count("None")  # on_full="drop": a storage failure, counted apart
    returned = [mid for mid in returned if mid != "None"]
    lost = [mid for mid in returned if mid not in delivered]
    print(f"enqueued {len(returned)}  delivered {len(delivered & set(returned))}  "
          f"lost {len(lost)}  dropped {dropped}  (duplicates {stats['duplicates']}, "
          f"flusher exit {code}, {time.monotonic() - started:.1f} s)")
    for mid in lost[:10]:
        print(f"lost: {mid}")
    return 0 if not lost and not dropped and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
