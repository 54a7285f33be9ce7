"""The flusher as a process (``python -m segmentry.flusher``, ``segmentry flush``): argv and
environment, logging to stderr, signals, the lock, --once / --drain with progress, and the
exit codes. Expected failures print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, NoReturn

from . import telemetry
from ._progress import Progress
from ._systemd import Notifier
from .config import (
    DEFAULT_API_URL,
    PROXY_SCHEMES,
    SENDERS,
    Options,
    check_readable,
    check_url,
    from_settings,
    normalize_url,
    resolve,
)
from .exceptions import ConfigurationError, StorageError
from .flusher import Flusher, Lock, holder_pid, make_http
from .http import DEFAULT_TIMEOUT_S
from .storage import DURABILITY, SQLiteQueue, default_queue_path
from .version import __version__

logger = logging.getLogger("segmentry.flusher")

EXIT_OK, EXIT_UNDELIVERED, EXIT_CONFIG = 0, 1, 2
PARENT_POLL_S = 0.5  # --from-client: how often the flusher checks that its Client's process lives
GRACE_S = 10.0  # SIGTERM: time for the batches in flight to settle (systemd TimeoutStopSec > this)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``segmentry: ...`` line (exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"segmentry: {message} (see `{self.prog} --help`)\n")


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, not {text!r}")
    return value


FLUSHER_PROG = "python -m segmentry.flusher"


def build_parser(prog: str = FLUSHER_PROG) -> argparse.ArgumentParser:
    d = Options()  # the defaults each flag's help names
    p = Parser(
        prog=prog,
        description="Deliver a segmentry queue file to Segment (or any /v1/batch receiver). "
                    "An option not given falls back on its SEGMENTRY_<NAME> variable, then "
                    "on the default shown. Exit codes: 0 done; 1 could not deliver, "
                    "dead-lettered, or the queue was refused; 2 bad configuration.")
    p.add_argument("--version", action="version", version=f"segmentry {__version__}")
    p.add_argument("--queue", metavar="PATH",
                   help="queue file; its directory must exist (default: $SEGMENTRY_QUEUE, "
                        "else the per-user one)")
    p.add_argument("--api-url", metavar="URL", help=f"receiver (default: {DEFAULT_API_URL})")
    p.add_argument("--write-key-file", metavar="PATH",
                   help="file holding the write key for the events that carry none (from a "
                        "producer without a key, or an older queue file); each other event "
                        "goes with the key and URL of the client that enqueued it. Without "
                        "any, only those go; the others stay queued (default: "
                        "$SEGMENT_WRITE_KEY)")
    p.add_argument("--write-key", metavar="KEY",
                   help="the write key, visible in ps: prefer the file or the environment "
                        "(default: $SEGMENT_WRITE_KEY)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="one claim/send cycle, then exit (default: run until stopped)")
    mode.add_argument("--drain", action="store_true",
                      help="send until the queue is empty, then exit (default: run until "
                           "stopped)")
    p.add_argument("--drain-timeout", type=seconds, metavar="S",
                   help="with --drain: give up after S seconds (default: no limit)")
    p.add_argument("--wait", action="store_true",
                   help="if another flusher holds the queue, stand by instead of exiting 1 "
                        "(default: exit 1)")
    for name, meaning in (
            ("max-batch-size", "events in one request"),
            ("batch-every-ms", "longest wait to fill a batch, in ms"),
            ("max-in-flight", "requests sent at once"),
            ("retry-attempts", "retries of a failed request before it is retried later"),
            ("retry-start", "first retry delay, in ms"),
            ("retry-expiry", "longest retry delay, in ms"),
            ("max-queue-bytes", "queue file size cap, in bytes")):
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=int, metavar="N",
                       help=f"{meaning} (default: {default})")
    p.add_argument("--sender", choices=SENDERS,
                   help=f"immediate: send each event at once (default: {d.sender})")
    p.add_argument("--durability", choices=tuple(DURABILITY),
                   help=f"full: fsync every commit (default: {d.durability})")
    p.add_argument("--timeout", type=seconds, metavar="S",
                   help=f"HTTP request timeout, seconds (default: {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--proxy", metavar="URL",
                   help="HTTP(S) proxy, e.g. http://proxy:3128 (default: $HTTPS_PROXY etc.)")
    p.add_argument("--ca-bundle", metavar="PATH",
                   help="CA certificates to verify the receiver with (default: "
                        "$REQUESTS_CA_BUNDLE, else certifi's)")
    p.add_argument("--cert", metavar="PATH",
                   help="client certificate (PEM), for mutual TLS (default: none)")
    p.add_argument("--cert-key", metavar="PATH",
                   help="its private key, if not in --cert (default: none)")
    p.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                   help="an extra request header, repeatable (default: none)")
    p.add_argument("--gzip", action=argparse.BooleanOptionalAction, default=None,
                   help="gzip request bodies; --no-gzip overrides SEGMENTRY_GZIP "
                        "(default: off)")
    p.add_argument("--no-send", action="store_true",
                   help="do not send: log at DEBUG and treat every batch as delivered "
                        "(default: send)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="(default: %(default)s)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="with --drain: a bar on a terminal, log lines otherwise "
                        "(default: %(default)s)")
    p.add_argument("--summary-every", type=seconds, default=60.0, metavar="S",
                   help="running as a service: one summary log line every S seconds "
                        "(default: %(default)g)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics; needs "
                        "segmentry[prometheus] (default: none)")
    p.add_argument("--metrics-address", metavar="ADDR",
                   help="with --metrics-port: the address to listen on (default: 127.0.0.1)")
    p.add_argument("--from-client", type=int, metavar="PID",
                   help="started by a Client(flusher='process') of process PID: its key and "
                        "options come as JSON on stdin (the other options are ignored), "
                        "stand by for the lock, stop when PID exits (default: none)")
    return p


def options_from_args(args: Any, environ: Any) -> Options:
    if args.api_url is not None:
        normalize_url(args.api_url, "--api-url")  # named as the user typed it
    given = {
        "queue_path": args.queue, "api_url": args.api_url, "sender": args.sender,
        "max_batch_size": args.max_batch_size, "batch_every_ms": args.batch_every_ms,
        "max_in_flight": args.max_in_flight, "retry_attempts": args.retry_attempts,
        "retry_start": args.retry_start, "retry_expiry": args.retry_expiry,
        "max_queue_bytes": args.max_queue_bytes, "durability": args.durability,
        "gzip": args.gzip, "send_to_http": False if args.no_send else None,
        "requests_options": _requests_options(args) or None,
    }
    return resolve({k: v for k, v in given.items() if v is not None}, environ)


def _requests_options(args: Any) -> dict[str, Any]:
    """The requests_options the transport flags give (http.client checks their values)."""
    options: dict[str, Any] = {}
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.proxy:
        check_url("--proxy", args.proxy, PROXY_SCHEMES)
        options["proxies"] = {"http": args.proxy, "https": args.proxy}
    if args.ca_bundle:
        check_readable("--ca-bundle", args.ca_bundle, directory_ok=True)
        options["verify"] = args.ca_bundle
    if args.cert_key and not args.cert:
        raise ConfigurationError("--cert-key goes with --cert")
    for flag, path in (("--cert", args.cert), ("--cert-key", args.cert_key)):
        if path:
            check_readable(flag, path)
    if args.cert:
        options["cert"] = (args.cert, args.cert_key) if args.cert_key else args.cert
    headers = {}
    for header in args.header or ():
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ConfigurationError(f"--header must be 'NAME: VALUE', not {header!r}")
        headers[name.strip()] = value.strip()
    if headers:
        options["headers"] = headers
    return options


def read_write_key(args: Any, environ: Any) -> str | None:
    if args.write_key_file:
        try:
            with open(args.write_key_file) as f:
                return f.read().strip() or None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read --write-key-file {args.write_key_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"--write-key-file {args.write_key_file} is not UTF-8 text") from None
    if args.write_key:
        logger.warning("--write-key is visible to every user in ps; "
                       "prefer SEGMENT_WRITE_KEY or --write-key-file")
        return str(args.write_key)
    return environ.get("SEGMENT_WRITE_KEY") or None


def read_client_settings(stream: IO[str]) -> tuple[Options, str | None, ClientLink]:
    """--from-client: the Client's options and key, as JSON on stdin (never in argv or the
    environment, which other users' ps may show), and the socket to report to."""
    try:
        settings = json.load(stream)
        link = ClientLink(int(settings["status_fd"]))
        return from_settings(settings["options"]), settings["write_key"], link
    except OSError as exc:
        raise ConfigurationError(f"--from-client: no status socket ({exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"--from-client: unreadable settings on stdin ({exc})") \
            from None


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
         prog: str = FLUSHER_PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # bad value: exit 2
    env = os.environ if environ is None else environ
    setup_logging(args.log_level)
    try:
        link = None
        if args.from_client is not None:
            options, write_key, link = read_client_settings(sys.stdin)
            args.wait = True
        else:
            options = options_from_args(args, env)
            write_key = read_write_key(args, env)
        if args.drain_timeout is not None and not args.drain:
            raise ConfigurationError("--drain-timeout goes with --drain")
        if args.metrics_port is not None or args.metrics_address is not None:
            from .prometheus import serve_flusher  # an optional extra: loaded only when asked
            serve_flusher(args.metrics_port, args.metrics_address,
                          options.queue_path or default_queue_path(), options.api_url,
                          write_key or "")
        # A Client's flusher is not the unit's service: the parent's $NOTIFY_SOCKET is not ours.
        notifier = Notifier({} if args.from_client is not None else env)
        return run(args, options, write_key or "", notifier, link)
    except ConfigurationError as exc:
        print(f"segmentry: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageError as exc:
        print(f"segmentry: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED


def setup_logging(level: str) -> None:
    """The service logs to stderr (journald adds the time); the library never configures."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("segmentry")
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level)
    if level == "DEBUG":  # every claim, batch, retry and drop, as log lines (never bodies)
        telemetry.detach("segmentry-service-log")
        telemetry.attach("segmentry-service-log", telemetry.ALL_EVENTS,
                         telemetry.log_bridge(logging.DEBUG))


def run(args: Any, options: Options, write_key: str, notifier: Notifier | None = None,
        link: ClientLink | None = None) -> int:
    # Built first: a setting requests refuses fails now, not when a standby takes over,
    # and before a mistyped --queue creates a file.
    http_client = make_http(write_key, options) if write_key or not options.send_to_http \
        else None  # no key of its own: only the events that carry theirs go
    if http_client is None:
        logger.info("no write key of our own: delivering the events that carry their "
                    "destination; any that carry none stay queued")
    path = options.queue_path or default_queue_path()
    if options.queue_path is not None:
        _check_directory(path)
    queue = SQLiteQueue(path, options.durability)
    queue.stats(time.time())  # open now: a bad file is refused before we take the lock
    lock = Lock(path)
    flusher = Flusher(queue, http_client, options)
    # Signal handlers before the lock: an operator may send SIGUSR1 at any time (a Client
    # sends it only once this flusher reported that it holds the queue).
    stop, wake = _on_signals(flusher, getattr(args, "from_client", None))
    notifier = notifier or Notifier({})
    notifier.status(f"standby: waiting for the lock of {path}")
    if not _acquire(lock, args.wait, stop, path):
        return EXIT_OK if stop.is_set() else EXIT_UNDELIVERED  # a standby told to stop
    deadline = None if args.drain_timeout is None else time.monotonic() + args.drain_timeout
    try:
        flusher.take_over()
        notifier.ready(_state(flusher))  # the queue is open and its lock ours
        if link is not None:
            link.report(flusher)
        if notifier.enabled or link is not None:
            flusher.on_cycle = lambda: _report(notifier, flusher, link)
        return _work(args, flusher, stop, wake, deadline)
    finally:
        notifier.stopping()
        # --drain-timeout bounds the whole run: past it, no grace for batches in flight
        # (finish gives their rows back at once, for the next flusher).
        grace = GRACE_S if deadline is None else min(GRACE_S, deadline - time.monotonic())
        flusher.finish(max(0.0, grace))
        lock.release()
        queue.close()
        logger.info("stopped: %d sent, %d dead-lettered", flusher.counts.sent,
                    flusher.counts.buried)


def _report(notifier: Notifier, flusher: Flusher, link: ClientLink | None = None) -> None:
    """From the loop: systemd's watchdog, and the state when it changes (to systemd, and
    to the Client that started this flusher)."""
    notifier.alive()
    notifier.status(_state(flusher))
    if link is not None:
        link.report(flusher)


class ClientLink:
    """--from-client: what the Client's flush() must know of this flusher, as one JSON
    datagram on the socket the Client passed, whenever it changes: the first says the
    queue is ours (SIGUSR1 is safe from then on), each says what is misconfigured or
    failing, as a flusher thread's would."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self._sent: dict[str, str | None] | None = None

    def report(self, flusher: Flusher) -> None:
        state = {"misconfigured": flusher.misconfigured(), "failing": flusher.failing()}
        if state == self._sent:
            return
        try:
            self.sock.send(json.dumps(state).encode())
            self._sent = state
        except OSError:  # full (the Client reads at its next event or flush) or gone:
            pass  # sent at the next cycle


def _state(flusher: Flusher) -> str:
    """The service's state in a few words, for `systemctl status` (never a key)."""
    wrong = flusher.counts.misconfigured
    if wrong:
        return f"misconfigured: {wrong}; check the write key, --api-url and --ca-bundle"
    until = flusher.paused_until()
    if until > flusher.clock():
        return f"paused until {time.strftime('%H:%M:%S', time.gmtime(until))} UTC"
    return "delivering"


def _check_directory(path: str) -> None:
    """A queue given by --queue or $SEGMENTRY_QUEUE must be in a directory that exists: a
    typo must not create a tree, an empty queue and a flusher idling on it. (The per-user
    default directory is created, as a producer creates it.)"""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise StorageError(f"no directory {directory} for the queue file {path}: check "
                           "--queue or $SEGMENTRY_QUEUE (the flusher never creates one)")


def _acquire(lock: Lock, wait: bool, stop: threading.Event, path: str) -> bool:
    if lock.acquire(timeout=0):
        return True
    if not wait:
        print(f"segmentry: another flusher (pid {holder_pid(path)}) holds {path}; "
              "pass --wait to stand by", file=sys.stderr)
        return False
    logger.info("standing by: another flusher holds %s", path)
    while not stop.is_set():
        if lock.acquire(timeout=0.5):
            return True
    return False


def _work(args: Any, flusher: Flusher, stop: threading.Event, wake: threading.Event,
          deadline: float | None) -> int:
    if args.once:
        flusher.run_once()
        failed = flusher.counts.misconfigured or flusher.counts.released
        return EXIT_UNDELIVERED if failed or _keyless(flusher) or _buried(flusher) else EXIT_OK
    if not args.drain:
        with Progress(flusher, "log", every=args.summary_every):  # one line per interval
            flusher.run(stop, wake)
        return EXIT_OK
    with Progress(flusher, args.progress):
        drained = flusher.run(stop, threading.Event(), drain=True, deadline=deadline)
    if _keyless(flusher):
        return EXIT_UNDELIVERED
    if flusher.counts.misconfigured:
        print(f"segmentry: {flusher.counts.misconfigured}: check the write key, --api-url "
              "and --ca-bundle; nothing was dropped", file=sys.stderr)
        return EXIT_UNDELIVERED
    if not drained:  # a drain that stops short did not deliver: scripts must not go on
        left = flusher.queue.stats(time.time()).depth
        why = "stopped by a signal" if stop.is_set() else "--drain-timeout reached"
        print(f"segmentry: {why} with {left} events left in the queue", file=sys.stderr)
        return EXIT_UNDELIVERED
    return EXIT_UNDELIVERED if _buried(flusher) else EXIT_OK


def _keyless(flusher: Flusher) -> bool:
    """Events that carry no destination, and no key to send them with: say so."""
    if flusher.settler.keyless_waiting:
        print("segmentry: the queue holds events that carry no destination and no write key "
              "was given for them: set SEGMENT_WRITE_KEY or pass --write-key-file PATH; "
              "nothing was dropped", file=sys.stderr)
    return flusher.settler.keyless_waiting


def _buried(flusher: Flusher) -> bool:
    """Events the receiver refused are not delivered: say so, and where they are."""
    buried = flusher.counts.buried
    if buried:
        print(f"segmentry: {buried} events were refused by the receiver and dead-lettered; "
              "see `segmentry dead-letters list`", file=sys.stderr)
    return bool(buried)


def _on_signals(flusher: Flusher, parent: int | None) -> tuple[threading.Event, threading.Event]:
    """The ``stop`` and ``wake`` events of the loop. Signals only set them; the loop
    notices between cycles. SIGTERM/SIGINT: stop. SIGUSR1: send what is queued now, full
    batches or not (`kill -USR1`, or a Client's flush()). With ``parent`` (--from-client),
    the end of that process, whatever killed it, stops the flusher too."""
    stop, wake = threading.Event(), threading.Event()

    def stop_now(*_: object) -> None:
        stop.set()
        wake.set()  # the loop may be waiting for batch_every_ms

    def send_now(*_: object) -> None:
        flusher.hurry.set()
        wake.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_now)
        signal.signal(signal.SIGUSR1, send_now)
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent, stop, stop_now), daemon=True,
                         name="segmentry-parent").start()
    return stop, wake


def _watch_parent(parent: int, stop: threading.Event, stop_now: Callable[[], None]) -> None:
    """Once the Client's process is gone (this one is then reparented), stop as on
    SIGTERM: what is not delivered stays queued for the next flusher."""
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent:
            logger.info("the process that started this flusher (pid %d) is gone: stopping",
                        parent)
            stop_now()
