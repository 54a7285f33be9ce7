"""A failed request in a few words for the log line: the status, or what stood in the way
of an answer (DNS, TLS, proxy, refused, timed out), read from the error's chain."""

from __future__ import annotations

import re
import urllib.parse

from ..exceptions import HTTPStatusError, NetworkError


def describe(error: Exception, api_url: str = "") -> str:
    """The failure in a few words for the log line: the status, or what stood in the
    way of an answer."""
    if isinstance(error, HTTPStatusError):
        return f"HTTP {error.status_code}"
    if isinstance(error, NetworkError) and not error.retryable:
        return str(error)  # why no retry can help: a refused certificate, a bad header
    cause = _cause(error, api_url)
    return f"{type(error).__name__}: {cause}" if cause else type(error).__name__


_DNS_FAILURES = ("Name or service not known", "nodename nor servname", "getaddrinfo failed",
                 "Temporary failure in name resolution", "No address associated",
                 "gaierror")
_PROXY_FAILURES = ("ProxyError", "Unable to connect to proxy", "Tunnel connection failed")
_TLS_VERIFY = re.compile(r"certificate verify failed: ([^()'\"]+)")
_CA_PATH = re.compile(r"invalid path: ([^\s()'\"]+)")


def _cause(error: BaseException, api_url: str) -> str:
    """What stood in the way of an answer, from the texts of the error's chain: the
    exceptions below requests carry neither a request body nor the write key (which
    travels in a header only). Empty when nothing is known."""
    chain = _chain(error)
    text = " ".join(f"{type(e).__name__} {e}" for e in chain)
    where = _host_port(api_url)
    innermost = _short(str(chain[-1]))
    if verify := _TLS_VERIFY.search(text):
        return f"TLS verification failed for {where}: {verify.group(1).strip()}"
    if "CA certificate bundle" in text:
        path = _CA_PATH.search(text)
        return f"CA bundle missing: {path.group(1) if path else innermost}"
    if any(s in text for s in _PROXY_FAILURES):
        return f"cannot go through the proxy: {innermost}"
    if any(s in text for s in _DNS_FAILURES):
        return f"DNS lookup failed for {where.rsplit(':', 1)[0]}: {innermost}"
    if "Connection refused" in text:
        return f"connection refused by {where}"
    if "timed out" in text.lower() or "Timeout" in text:
        return f"timed out talking to {where}"
    if "SSL" in text:
        return f"TLS failed with {where}: {innermost}"
    return innermost if chain[-1] is not error else ""


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what caused it, outermost first (a cycle is cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _short(text: str) -> str:
    return re.sub(r"^\[Errno -?\d+\] ", "", text)[:200]


def _host_port(api_url: str) -> str:
    parts = urllib.parse.urlsplit(api_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return parts.netloc
    return f"{parts.hostname}:{port}"

