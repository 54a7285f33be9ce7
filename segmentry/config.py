"""Options: the names, defaults and validation shared by Client, start(), http.client and
the flusher command line, and the SEGMENTRY_* environment fallback. Every option is checked
here by type and value, so a mistake fails at start in one line naming the option, not at
the first send. Imports nothing foreign (requests only to check a given session or adapter).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any, Callable
from urllib.parse import urlsplit

from .exceptions import ConfigurationError
from .storage import DURABILITY

DEFAULT_API_URL = "https://api.segment.io/v1/"
SENDERS = ("batcher", "immediate")
ON_FULL = ("drop", "raise")
FLUSHERS = ("thread", "process", None)
# The requests_options http.client understands; the first four go to every request as is.
REQUESTS_OPTIONS = ("timeout", "proxies", "verify", "cert", "headers", "session", "adapter")
PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
# RFC 3986 reg-name characters (and "%" escapes); a non-ASCII name is left to IDNA.
_HOST = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=-]+")
# The rules requests applies to a header at every send (requests.utils.check_header_validity).
_HEADER_NAME = re.compile(r"[^:\s][^:\r\n]*")
_HEADER_VALUE = re.compile(r"(\S[^\r\n]*)?")


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
        _bool("send_to_http", self.send_to_http)
        _bool("gzip", self.gzip)
        self.api_url = normalize_url(self.api_url)
        if self.queue_path is not None:  # absolute, so a later chdir is harmless
            self.queue_path = os.path.abspath(_path("queue_path", self.queue_path))
        if self.on_error is not None and not callable(self.on_error):
            raise ConfigurationError("on_error must be a callable(exception, events)")
        check_requests_options(self.requests_options, files=True)
        if self.flusher == "process":
            check_portable(self)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {allowed}, not {value!r}")


def _int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an integer from {low} to {high}, not {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):  # "false" is a true string: never guess
        raise ConfigurationError(f"{name} must be True or False, not {value!r}")


def _path(name: str, value: Any) -> str:
    if isinstance(value, str) and value or isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigurationError(f"{name} must be a path (str or os.PathLike), not {value!r}")


# -- URLs -------------------------------------------------------------------------------


def check_url(name: str, url: Any, schemes: tuple[str, ...] = ("http", "https")) -> None:
    """A URL requests can send to: one of ``schemes``, a host, a numeric port, and no
    space or control character (requests would raise InvalidURL at every send)."""
    example = f"{schemes[0]}://host:port/"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"{name} must be a URL like {example}, not {url!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ConfigurationError(f"{name} has a space or control character: {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes:
        raise ConfigurationError(
            f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL, not {url!r}")
    host = parts.hostname or ""
    if not host or (host.isascii() and not _HOST.fullmatch(host) and not _ipv6(host)):
        raise ConfigurationError(f"{name} has no valid host name: {url!r}")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when it is read)
    except ValueError:
        raise ConfigurationError(f"{name} has an invalid port: {url!r}") from None


def _ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def normalize_url(url: Any, name: str = "api_url") -> str:
    """The receiver's base URL, checked, ending in "/" (``batch`` is joined to it)."""
    check_url(name, url)
    if urlsplit(url).query or "#" in url:
        raise ConfigurationError(f"{name} must have no query or fragment: {url!r}")
    return str(url) if url.endswith("/") else url + "/"


# -- requests_options -----------------------------------------------------------------------


def check_requests_options(options: Any, files: bool = False) -> None:
    """Names, types and values of ``requests_options``; with ``files``, also that the CA
    bundle and certificate files exist and can be read (http.client leaves that to the
    send, which fails without a retry; a Client or flusher checks it at start)."""
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"requests_options must be a dict, not {options!r}")
    unknown = sorted(set(options) - set(REQUESTS_OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown requests option {unknown[0]!r}; known: "
                                 f"{', '.join(sorted(REQUESTS_OPTIONS))}")
    for key, check in _CHECKS.items():
        if key in options:
            check(options[key], files)


def check_timeout(timeout: object, files: bool = False) -> None:
    """Seconds or a (connect, read) pair, all positive: no timeout would let a dead
    connection hang a flusher forever."""
    values = timeout if isinstance(timeout, tuple) and len(timeout) == 2 else (timeout,)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for v in values):
        raise ConfigurationError(
            f"timeout must be seconds > 0 or a (connect, read) pair of them, not {timeout!r}")


def _check_proxies(proxies: Any, files: bool) -> None:
    if not isinstance(proxies, Mapping):
        raise ConfigurationError(f"proxies must be a dict like {{'https': URL}}, not {proxies!r}")
    for scheme, url in proxies.items():
        if url is not None:  # None: no proxy for that scheme, as in requests
            check_url(f"proxy {scheme!r}", url, PROXY_SCHEMES)


def _check_verify(verify: Any, files: bool) -> None:
    if isinstance(verify, bool):
        return
    path = _path("verify (True, False or a CA bundle path)", verify)
    if files:
        check_readable("verify: CA bundle", path, directory_ok=True)


def _check_cert(cert: Any, files: bool) -> None:
    paths = cert if isinstance(cert, tuple) and len(cert) == 2 else (cert,)
    for path in paths:
        path = _path("cert (a PEM path or a (cert, key) pair of them)", path)
        if files:
            check_readable("cert: file", path)


def check_readable(what: str, path: str, directory_ok: bool = False) -> None:
    """A file (or, if ``directory_ok``, a directory) that exists and can be read."""
    if not os.path.exists(path):
        raise ConfigurationError(f"{what} {path} does not exist")
    if os.path.isdir(path) and not directory_ok:
        raise ConfigurationError(f"{what} {path} is a directory")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"{what} {path} cannot be read (permission denied)")


def _check_headers(headers: Any, files: bool) -> None:
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a dict, not {headers!r}")
    for name, value in headers.items():
        if not (_header_ok(name, _HEADER_NAME) and _header_ok(value, _HEADER_VALUE)):
            raise ConfigurationError(  # never the value: it may be a secret
                f"header {name!r}: its name and value must be strings (or bytes) without "
                f"line breaks or leading spaces")


def _header_ok(text: Any, rule: re.Pattern[str]) -> bool:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return isinstance(text, str) and rule.fullmatch(text) is not None


def _check_session(session: Any, files: bool) -> None:
    # Whoever made a Session imported requests already: importing it here costs nothing.
    if not isinstance(session, _requests().Session):
        raise ConfigurationError(f"session must be a requests.Session, not {session!r}")


def _check_adapter(adapter: Any, files: bool) -> None:
    if not isinstance(adapter, _requests().adapters.BaseAdapter):
        raise ConfigurationError(
            f"adapter must be a requests.adapters.BaseAdapter, not {adapter!r}")


def _requests() -> Any:
    import requests.adapters

    return requests


_CHECKS: dict[str, Callable[[Any, bool], None]] = {
    "timeout": check_timeout, "proxies": _check_proxies, "verify": _check_verify,
    "cert": _check_cert, "headers": _check_headers, "session": _check_session,
    "adapter": _check_adapter}


# -- handing the options to a flusher process ------------------------------------------------


def check_portable(options: Options) -> None:
    """flusher="process" hands the options to another process (``to_settings``): what
    lives only in this one (a callable, a Session, an adapter) cannot go."""
    unportable = [name for name, given in (
        ("on_error", options.on_error is not None),
        ("requests_options['session']", "session" in options.requests_options),
        ("requests_options['adapter']", "adapter" in options.requests_options)) if given]
    if unportable:
        raise ConfigurationError(
            f"{unportable[0]} cannot go with flusher='process': the flusher runs in another "
            f"process, where this one's objects do not exist; use flusher='thread'")


def to_settings(options: Options) -> dict[str, Any]:
    """The options as JSON-ready data, for a flusher process (see ``from_settings``)."""
    settings = {name: getattr(options, name) for name in OPTION_NAMES if name != "on_error"}
    settings["requests_options"] = dict(options.requests_options)
    headers = options.requests_options.get("headers")
    if headers:  # names and values may be bytes (see _check_headers), which JSON has not
        settings["requests_options"]["headers"] = {
            _text(name): _text(value) for name, value in headers.items()}
    return settings


def from_settings(settings: Mapping[str, Any]) -> Options:
    """``to_settings``'s inverse: JSON turned the (connect, read) timeout and the (cert,
    key) pair into lists, which requests does not take."""
    fields = dict(settings)
    fields["requests_options"] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in fields.get("requests_options", {}).items()}
    return Options(**fields)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


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
