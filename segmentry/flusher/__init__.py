"""The flusher: delivers a queue file. ``python -m segmentry.flusher`` runs it as a
process (see service.py); a Client runs it as a thread (``Background``). Only the holder
of the queue's ``Lock`` delivers.

Its parts, private: ``_policy`` (an answer in, a decision out: a pure function),
``_settle`` (send a claim, settle its rows as the policy decides),
``_loop`` (claim, hand to senders, settle), ``_routes`` (each destination's client
and pause), ``_lock``, ``_background`` (the thread),
``_failures`` (a failure in a few words for the log).
"""

from __future__ import annotations

from ._background import Background
from ._lock import Lock, holder_pid
from ._loop import LEASE_S, Flusher, Window
from ._routes import make_http
from ._settle import Counts, destination

__all__ = ["LEASE_S", "Background", "Counts", "Flusher", "Lock", "Window", "destination",
           "holder_pid", "main", "make_http"]


def main(argv: list[str] | None = None) -> int:
    """``python -m segmentry.flusher``: see service.py."""
    from ..service import main as service_main

    return service_main(argv)
