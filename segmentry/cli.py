"""The ``segmentry`` command: queue ``status``, ``dead-letters`` (list / requeue / purge),
``flush`` (the flusher process) and ``track`` / ``identify`` for shell scripts and cron jobs.
Argv and the environment are read here; expected failures print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, NoReturn

from . import service
from .client import Client
from .exceptions import ConfigurationError, InvalidMessage, QueueFull, StorageError
from .flusher import holder_pid
from .storage import (
    DeadLetter,
    DestinationStats,
    Queue,
    SQLiteQueue,
    default_queue_path,
    inspect,
)
from .version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
RESPONSE_CHARS = 120  # enough of the receiver's answer to see why it refused an event
DEFAULT_LIMIT = 100
DESCRIPTION = "Inspect and feed a segmentry queue file; `flush` runs the flusher."
# InvalidMessage names the library's field; say which flag fixes it.
FLAG_HINTS = {
    "user_id": "pass --user-id or --anonymous-id",
    "anonymous_id": "pass --user-id or --anonymous-id",
    "timestamp": "pass --timestamp as ISO-8601 with a zone, e.g. 2024-05-01T12:00:00Z",
    "message_id": "pass a shorter --message-id",
}


_Parser = service.Parser


# -- argument types -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if not 1 <= value < 2**63:  # SQLite's integers
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_value(raw: str) -> Any:
    """JSON when it parses (``10``, ``true``, ``null``, ``"x"``, ``[1]``), else the text.
    NaN and Infinity stay text: they are not JSON and Segment would refuse them."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except ValueError:
        return raw


def parse_pair(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, parse_value(raw)


# -- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segmentry", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"segmentry {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True,
                                     metavar="COMMAND")
    queue = _Parser(add_help=False)
    queue.add_argument("--queue", metavar="PATH",
                       help="queue file (default: $SEGMENTRY_QUEUE, else the per-user one)")
    _add_status(commands, queue)
    _add_dead_letters(commands, queue)
    # Listed for --help only: main() hands "flush ..." to the flusher's own parser.
    commands.add_parser("flush", add_help=False,
                        help="run the flusher (`segmentry flush --help` for its flags)")
    _add_track(commands, queue)
    _add_identify(commands, queue)
    return parser


def _add_status(commands: Any, queue: argparse.ArgumentParser) -> None:
    p = commands.add_parser("status", parents=[queue], help="depth, age, dead letters, flusher")
    p.add_argument("--json", action="store_true", help="one JSON object, for monitoring")
    p.set_defaults(run=cmd_status)


def _add_dead_letters(commands: Any, queue: argparse.ArgumentParser) -> None:
    group = commands.add_parser("dead-letters", help="events the receiver refused")
    verbs = group.add_subparsers(title="actions", dest="action", required=True,
                                 metavar="ACTION")
    listing = verbs.add_parser("list", parents=[queue], help="show dead letters, oldest first")
    listing.add_argument("--limit", type=_positive_int, default=DEFAULT_LIMIT, metavar="N")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    listing.add_argument("--show-body", action="store_true",
                         help="include each event's full JSON (it holds user data)")
    listing.set_defaults(run=cmd_dead_list)
    for verb, run, text in (("requeue", cmd_requeue, "put back at the end of the queue"),
                            ("purge", cmd_purge, "delete for good")):
        p = verbs.add_parser(verb, parents=[queue], help=text)
        p.add_argument("ids", nargs="*", type=_positive_int, metavar="ID")
        p.add_argument("--all", action="store_true", help="every dead letter")
        p.set_defaults(run=run)


def _add_event_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-id", metavar="ID")
    p.add_argument("--anonymous-id", metavar="ID")
    p.add_argument("--context", type=parse_pair, action="append", metavar="KEY=VALUE")
    p.add_argument("--timestamp", metavar="ISO",
                   help="when it happened, ISO-8601 with a zone (2024-05-01T12:00:00Z)")
    p.add_argument("--message-id", metavar="ID",
                   help="a fixed messageId, so a re-run script is de-duplicated by Segment")


def _add_track(commands: Any, queue: argparse.ArgumentParser) -> None:
    p = commands.add_parser("track", parents=[queue], help="enqueue a track event")
    _add_event_options(p)
    p.add_argument("--event", required=True, metavar="NAME")
    p.add_argument("--property", type=parse_pair, action="append", metavar="KEY=VALUE",
                   help="VALUE is JSON when it parses (10, true, \"x\"), else text")
    p.set_defaults(run=cmd_track)


def _add_identify(commands: Any, queue: argparse.ArgumentParser) -> None:
    p = commands.add_parser("identify", parents=[queue], help="enqueue an identify event")
    _add_event_options(p)
    p.add_argument("--trait", type=parse_pair, action="append", metavar="KEY=VALUE",
                   help="VALUE is JSON when it parses (10, true, \"x\"), else text")
    p.set_defaults(run=cmd_identify)


# -- status ---------------------------------------------------------------------------------


def queue_path(args: argparse.Namespace) -> str:
    path = args.queue or os.environ.get("SEGMENTRY_QUEUE") or default_queue_path()
    return os.path.abspath(path)


def status(path: str, now: float) -> dict[str, Any]:
    """The status report, read without writing anything. A file that does not exist yet is
    an empty queue, and stays absent; one that cannot be read is a StorageError."""
    report: dict[str, Any] = {
        "queue_path": path, "exists": False, "depth": 0, "bytes": 0, "oldest_age_s": None,
        "in_flight": 0, "dead_letters": 0, "flusher_pid": None, "disk_bytes": 0,
        "destinations": []}
    found = inspect(path, now)
    if found is None:
        return report
    stats = found.stats
    created = stats.oldest_created
    oldest = None if created is None else round(max(0.0, now - created), 3)
    report.update(exists=True, depth=stats.depth, bytes=stats.bytes, oldest_age_s=oldest,
                  in_flight=stats.in_flight, dead_letters=stats.dead_letters,
                  flusher_pid=_flusher_pid(path), disk_bytes=found.disk_bytes,
                  destinations=[_destination_view(d, now) for d in found.destinations])
    return report


def _destination_view(found: DestinationStats, now: float) -> dict[str, Any]:
    """One destination's counts, named by its URL and a hash of its key (never the key)."""
    created = found.oldest_created
    return {"name": found.name, "depth": found.depth, "bytes": found.bytes,
            "oldest_age_s": None if created is None else round(max(0.0, now - created), 3),
            "dead_letters": found.dead_letters}


def _flusher_pid(path: str) -> int | None:
    # No lock file: no flusher ever ran. Probing would create one, with our user and mode.
    if not os.path.exists(path + ".lock"):
        return None
    return holder_pid(path)


def format_status(report: dict[str, Any]) -> str:
    absent = "" if report["exists"] else "  (no file yet: empty)"
    age = report["oldest_age_s"]
    pid = report["flusher_pid"]
    flying = f"{report['in_flight']} in flight" if pid is not None or not report["in_flight"] \
        else f"{report['in_flight']} leased by a flusher that stopped: the next one resends them"
    return "\n".join([
        f"queue:        {report['queue_path']}{absent}",
        f"depth:        {report['depth']} events, {report['bytes']} bytes ({flying})",
        f"oldest event: {'-' if age is None else f'{age:.1f} s ago'}",
        f"dead letters: {report['dead_letters']}",
        f"flusher:      {'none running' if pid is None else f'pid {pid}'}",
        f"disk:         {report['disk_bytes']} bytes (file and WAL)",
        *_destination_lines(report["destinations"]),
    ])


def _destination_lines(views: list[dict[str, Any]]) -> list[str]:
    lines = ["destinations:"] if views else []
    for view in views:
        age = view["oldest_age_s"]
        lines.append(f"  {view['name']}: {view['depth']} events, {view['bytes']} bytes, "
                     f"oldest {'-' if age is None else f'{age:.1f} s ago'}, "
                     f"{view['dead_letters']} dead letters")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    report = status(queue_path(args), time.time())
    print(json.dumps(report) if args.json else format_status(report))
    return EXIT_OK


# -- dead letters ---------------------------------------------------------------------------


def _existing_queue(path: str) -> Queue:
    """Open a queue that must exist: a typo in --queue must not create a new, empty one."""
    if not os.path.exists(path):
        raise StorageError(f"no queue file at {path}; check --queue or $SEGMENTRY_QUEUE")
    return SQLiteQueue(path)


def _clip(text: str, limit: int = RESPONSE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def letter_view(letter: DeadLetter, show_body: bool, clip: bool = True) -> dict[str, Any]:
    """What an operator needs to triage one dead letter; the body (user data) on request.
    The table clips the receiver's response to a line; JSON gives it whole."""
    try:
        event = json.loads(letter.body)
    except ValueError:
        event = {}
    view = {
        "id": letter.id, "buried_at": _iso(letter.buried_at), "status": letter.status,
        "attempts": letter.attempts, "type": event.get("type"),
        "event": event.get("event") or event.get("name"), "messageId": event.get("messageId"),
        "response": _clip(letter.response) if clip else letter.response,
        "destination": letter.destination}
    if show_body:
        view["body"] = event or letter.body
    return view


COLUMNS = ("id", "buried_at", "status", "type", "event", "messageId", "response")


def letter_table(views: list[dict[str, Any]]) -> list[str]:
    """Aligned columns; the response, last and clipped, may run past the terminal."""
    rows = [[c.upper() for c in COLUMNS]]
    rows += [["-" if v[c] is None else str(v[c]) for c in COLUMNS] for v in views]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return ["  ".join([*(f.ljust(w) for f, w in zip(r, widths)), r[-1]]) for r in rows]


def cmd_dead_list(args: argparse.Namespace) -> int:
    path = queue_path(args)
    found = inspect(path, time.time(), args.limit)  # like status: no file yet is empty
    letters = [] if found is None else found.dead_letters
    total = 0 if found is None else found.stats.dead_letters
    views = [letter_view(letter, args.show_body, clip=not args.json) for letter in letters]
    if args.json:
        by = {} if found is None else {d.name: d.dead_letters for d in found.destinations
                                       if d.dead_letters}
        print(json.dumps({"queue_path": path, "total": total, "by_destination": by,
                          "dead_letters": views}))
        return EXIT_OK
    header, *lines = letter_table(views)
    print(header)
    for view, line in zip(views, lines):
        print(line)
        if args.show_body:
            print(f"    {json.dumps(view['body'])}")
    print(f"{len(views)} of {total} dead letters shown" +
          (" (raise --limit to see more)" if total > len(views) else ""))
    return EXIT_OK


def _chosen_ids(args: argparse.Namespace) -> list[int] | None:
    """The ids to act on (None: all). Acting on everything must be asked for."""
    if args.all == bool(args.ids):
        raise ConfigurationError(
            f"dead-letters {args.action}: give dead-letter IDs (see `dead-letters list`) "
            "or --all, not both")
    return None if args.all else sorted(set(args.ids))


def _act(args: argparse.Namespace, verb: str, act: Callable[[Queue, Any], int]) -> int:
    ids = _chosen_ids(args)
    queue = _existing_queue(queue_path(args))
    try:
        done = act(queue, ids)
    finally:
        queue.close()
    print(f"{verb} {done} dead letters")
    if ids is not None and done < len(ids):  # a mistyped id: a script must notice
        return _fail(f"{len(ids) - done} of the given ids are not dead letters (see "
                     "`segmentry dead-letters list`)", EXIT_ERROR)
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    return _act(args, "requeued", lambda queue, ids: queue.requeue(ids))


def cmd_purge(args: argparse.Namespace) -> int:
    return _act(args, "purged", lambda queue, ids: queue.purge(ids))


# -- track and identify ---------------------------------------------------------------------


def _dict(pairs: list[tuple[str, Any]] | None) -> dict[str, Any] | None:
    return None if pairs is None else dict(pairs)


def _enqueue(args: argparse.Namespace, call: Callable[[Client, dict[str, Any]], Any]) -> int:
    """Store one event durably, never touching the network, and print its messageId."""
    common = {"anonymous_id": args.anonymous_id, "timestamp": args.timestamp,
              "message_id": args.message_id}
    client = Client(queue_path=queue_path(args), flusher=None, on_full="raise")
    try:
        message_id = call(client, {k: v for k, v in common.items() if v is not None})
    finally:
        client.close()
    print(message_id)
    return EXIT_OK


def cmd_track(args: argparse.Namespace) -> int:
    return _enqueue(args, lambda client, common: client.track(
        args.user_id, args.event, _dict(args.property), _dict(args.context), **common))


def cmd_identify(args: argparse.Namespace) -> int:
    return _enqueue(args, lambda client, common: client.identify(
        args.user_id, _dict(args.trait), _dict(args.context), **common))


# -- main -----------------------------------------------------------------------------------


def _fail(problem: object, code: int) -> int:
    print(f"segmentry: {problem}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["flush"]:
        return service.main(words[1:], prog="segmentry flush")  # the flusher process
    args = build_parser().parse_args(words)  # a bad option value exits 2, in one line
    service.setup_logging("WARNING")
    try:
        return int(args.run(args))
    except InvalidMessage as exc:  # bad input: fix the command line
        hint = FLAG_HINTS.get(exc.field or "")
        return _fail(f"{exc} ({hint})" if hint else exc, EXIT_USAGE)
    except ConfigurationError as exc:
        return _fail(exc, EXIT_USAGE)
    except (StorageError, QueueFull) as exc:  # the file, the disk or the cap: exit 1
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `segmentry dead-letters list | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return EXIT_ERROR
