"""Count the hops of one event from ``Client.track`` to its DELETE, in a checkout.

    python tools/hops.py [CHECKOUT] [-v]

A hop is a call of a segmentry function (code under CHECKOUT/segmentry) whose arguments
carry the event: its messageId in a str or bytes reachable from an argument (through
lists, dicts, tuples and segmentry or requests objects, 3 levels deep), or its row id in a
list, tuple or set (the ids of a claim or a delete). The trip: ``track()`` on a client
without a flusher; then a Flusher (deferred deletes on, as in the running loop) whose
``run_once()`` sends it to ``tools/fake_segment.py`` on 127.0.0.1 over segmentry's own
transport, and a second ``run_once()`` whose claim deletes it. ``-v`` lists the hops.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE_ID = "msg-4f1c0ffee-hop"
DEPTH = 3


class Tracer:
    """A ``sys.setprofile`` hook: every segmentry call, and those carrying the event."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.row: int | None = None  # the event's row id, once stored
        self.hops: list[str] = []
        self.calls = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(self.package):
            return
        self.calls += 1
        count = (code.co_argcount + code.co_kwonlyargcount
                 + bool(code.co_flags & 4) + bool(code.co_flags & 8))  # *args, **kwargs
        if any(self.carries(frame.f_locals.get(name)) for name in code.co_varnames[:count]):
            where = os.path.relpath(code.co_filename, self.package)
            self.hops.append(f"{where}:{getattr(code, 'co_qualname', code.co_name)}")

    def carries(self, value: Any, depth: int = 0, in_ids: bool = False) -> bool:
        if isinstance(value, str):
            return MESSAGE_ID in value
        if isinstance(value, (bytes, bytearray)):
            return MESSAGE_ID.encode() in value
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return in_ids and value == self.row
        if depth >= DEPTH:
            return False
        if isinstance(value, dict):
            return any(self.carries(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple, set, frozenset)):
            return any(self.carries(v, depth + 1, True) for v in list(value)[:200])
        fields = getattr(value, "__dict__", None)
        if isinstance(fields, dict) and type(value).__module__.startswith(
                ("segmentry", "requests")):
            return any(self.carries(v, depth + 1) for k, v in fields.items()
                       if not k.startswith("__"))
        return False


def receiver(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = os.path.join(workdir, "receiver.ready")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_segment.py"),
                             "--port", "0", "--ready-file", ready], stdout=subprocess.DEVNULL)
    while not os.path.exists(ready):  # written whole, by a rename, once it listens
        if proc.poll() is not None:
            raise SystemExit("tools/fake_segment.py did not start")
        time.sleep(0.05)
    with open(ready) as f:
        return proc, f.read().strip()


def trip(tracer: Tracer, path: str, url: str) -> None:
    import segmentry
    from segmentry.config import Options
    from segmentry.flusher import Flusher, make_http
    from segmentry.storage import SQLiteQueue

    with segmentry.Client(queue_path=path, flusher=None) as client:
        sys.setprofile(tracer)
        client.track("user-1", "Signed Up", {"plan": "pro"}, message_id=MESSAGE_ID)
        sys.setprofile(None)
    with sqlite3.connect(path) as db:
        tracer.row = db.execute("SELECT MAX(id) FROM events").fetchone()[0]
    options = Options(queue_path=path, api_url=url)
    queue = SQLiteQueue(path)
    flusher = Flusher(queue, make_http("KEY", options), options)
    if hasattr(flusher, "settler"):  # as the loop runs it: deletes wait for its next claim
        flusher.settler.deferred.switch(True)
    else:  # segmentry before the flusher package (f9ad10d)
        flusher._batch_deletes(True)
    sys.setprofile(tracer)
    sent = flusher.run_once()
    flusher.run_once()  # its claim deletes what the first one delivered
    sys.setprofile(None)
    if sent != 1 or queue.stats(time.time()).depth:
        raise SystemExit("the event was not delivered and deleted")


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "-v"]
    root = os.path.abspath(args[0] if args else os.path.dirname(HERE))
    sys.path.insert(0, root)
    tracer = Tracer(os.path.join(root, "segmentry"))
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = receiver(workdir)
        try:
            trip(tracer, os.path.join(workdir, "q.db"), url)
        finally:
            proc.terminate()
            proc.wait()
    print(f"hops (calls carrying the event): {len(tracer.hops)}; "
          f"segmentry calls on the way: {tracer.calls}")
    if "-v" in sys.argv:
        print("\n".join(tracer.hops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
