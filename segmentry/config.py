"""Options: the names, defaults and validation shared by Client, start() and the flusher
command line, and the SEGMENTRY_* environment fallback. Imports nothing foreign.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Callable

from .exceptions import ConfigurationError
from .storage import DURABILITY

DEFAULT_API_URL = "https://api.segment.io/v1/"
SENDERS = ("batcher", "immediate")
ON_FULL = ("drop", "raise")
FLUSHERS = ("thread", None)


@dataclasses.dataclass
class Options:
    sender: str = "batcher"
    max_batch_size: int = 100
    batch_every_ms: int = 2000
    max_in_flight: int = 8
    retry_attempts: int = 3
    retry_start: int = 100
    retry_expiry: int = 10_000
    send_to_http: bool = True
    requests_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    api_url: str = DEFAULT_API_URL
    gzip: bool = False
    on_error: Callable[[BaseException, list[dict[str, Any]]], None] | None = None
    queue_path: str | None = None
    flusher: str | None = "thread"
    durability: str = "normal"
    max_queue_bytes: int = 1 << 30
    on_full: str = "drop"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("sender", self.sender, SENDERS)
        _choice("flusher", self.flusher, FLUSHERS)
        _choice("durability", self.durability, tuple(DURABILITY))
        _choice("on_full", self.on_full, ON_FULL)
        _int("max_batch_size", self.max_batch_size, 1, 2500)
        _int("batch_every_ms", self.batch_every_ms, 0, 24 * 3600 * 1000)
        _int("max_in_flight", self.max_in_flight, 1, 64)
        _int("retry_attempts", self.retry_attempts, 0, 100)
        _int("retry_start", self.retry_start, 1, 3600 * 1000)
        _int("retry_expiry", self.retry_expiry, self.retry_start, 3600 * 1000)
        _int("max_queue_bytes", self.max_queue_bytes, 64 * 1024, 1 << 50)
        if not isinstance(self.api_url, str) or not self.api_url.startswith(
                ("http://", "https://")):
            raise ConfigurationError(f"api_url must be an http(s) URL, not {self.api_url!r}")
        if not self.api_url.endswith("/"):
            self.api_url += "/"
        if self.queue_path is not None:  # str or os.PathLike; absolute, so chdir is harmless
            self.queue_path = os.path.abspath(os.fspath(self.queue_path))
        if not isinstance(self.requests_options, Mapping):
            raise ConfigurationError("requests_options must be a dict")
        if self.on_error is not None and not callable(self.on_error):
            raise ConfigurationError("on_error must be a callable(exception, events)")


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {allowed}, not {value!r}")


def _int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an integer from {low} to {high}, not {value!r}")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))
# Options that have a SEGMENTRY_<NAME> environment fallback (callables and dicts do not).
ENV_OPTIONS = tuple(n for n in OPTION_NAMES if n not in ("on_error", "requests_options"))


def parse_env_value(name: str, text: str) -> Any:
    """Turn one environment or command-line string into the option's type."""
    default = getattr(Options, name, None) if name != "flusher" else "thread"
    if name == "flusher":
        return None if text.lower() in ("", "none", "off") else text
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{name} must be true or false, not {text!r}")
    if isinstance(default, int):
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigurationError(f"{name} must be an integer, not {text!r}") from None
    return text


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The SEGMENTRY_* variables that are set, parsed (SEGMENTRY_QUEUE for queue_path)."""
    found: dict[str, Any] = {}
    for name in ENV_OPTIONS:
        key = "SEGMENTRY_QUEUE" if name == "queue_path" else f"SEGMENTRY_{name.upper()}"
        if environ.get(key):  # set but empty (`SEGMENTRY_QUEUE=` in a unit file): unset
            found[name] = parse_env_value(name, environ[key])
    return found


def resolve(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Options:
    """Keyword arguments win over SEGMENTRY_* variables, which win over defaults."""
    unknown = sorted(set(kwargs) - set(OPTION_NAMES))
    if unknown:
        raise ConfigurationError(f"unknown option(s): {', '.join(unknown)}")
    merged = {**from_env(os.environ if environ is None else environ), **kwargs}
    return Options(**merged)
