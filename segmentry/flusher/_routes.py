"""The destinations a flusher delivers, each on its own ``Route``: its HTTP client (its
key, its URL, its Retry-After pause), its pause after failures, its misconfiguration.
One destination's 401, 429 or outage pauses that one only: the loop's claims skip the
rows of the paused ones (``Routes.paused``)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

from .. import http
from ..config import Options
from ..storage import NO_DESTINATION, Queue, destination

logger = logging.getLogger("segmentry.flusher")  # the package's name: one logger for users

Connect = Callable[[str, str], http.HTTPClient]  # (write_key, api_url) -> a client


def make_http(write_key: str, options: Options) -> http.HTTPClient:
    if not options.send_to_http:
        write_key = write_key or "no-send"  # nothing is sent: no key is needed
    return http.client(
        write_key, options.api_url, retry_attempts=options.retry_attempts,
        retry_start=options.retry_start, retry_expiry=options.retry_expiry, gzip=options.gzip,
        send_to_http=options.send_to_http, **options.requests_options)


def connector(options: Options) -> Connect:
    """Clients for the destinations events carry: the flusher's options (retries,
    timeouts, proxies, CA bundle), their own key and URL."""
    return lambda key, url: make_http(key, dataclasses.replace(options, api_url=url))


class Route:
    """One destination's delivery state, for the ids it has in the file (``dests``: 0 too
    when it is the flusher's own key and URL). ``http_client`` None: events without a
    destination, and a flusher without a key of its own: they wait."""

    def __init__(self, dest: int, client: http.HTTPClient | None, name: str) -> None:
        self.dests, self.http_client, self.name = [dest], client, name
        self.pause_until = 0.0  # epoch seconds: no claim of its rows before
        self.failing: str | None = None  # the transient failure since its last 2xx
        self.misconfigured: str | None = None  # what is wrong, while it lasts
        self.misconfigured_in_a_row = 0
        self.owns_backoffs = False  # (dest 0) whether the file names us the backoffs' owner
        self.gate_seen = client.paused_until() if client is not None else 0.0

    def paused(self, now: float) -> bool:
        """No claim for it now: no key, a pause, or its client's Retry-After."""
        client = self.http_client
        return (client is None or self.pause_until > now
                or client.paused_until() > client.clock())

    def new_gate(self) -> bool:
        """Whether its client was asked to pause (429, an outage) since last asked."""
        if self.http_client is None:
            return False
        gate = self.http_client.paused_until()
        if gate > self.gate_seen:
            self.gate_seen = gate
            return True
        return False

    def paused_until(self, now: float) -> float:
        """Until when (epoch seconds) it is paused; in the past when it is not."""
        if self.http_client is None:
            return now
        gate = self.http_client.paused_until() - self.http_client.clock()
        return max(self.pause_until, now + gate)


class Routes:
    """The routes of a flusher, by destination id: 0 (events that carry none) goes with
    the flusher's own client; the others are made on first sight, from the file's
    destinations table."""

    def __init__(self, queue: Queue, own: http.HTTPClient | None, connect: Connect) -> None:
        self.queue, self.own, self._connect = queue, own, connect
        name = (destination(own.api_url, own.write_key) if own is not None
                else NO_DESTINATION)
        self._routes = {0: Route(0, own, name)}
        self._lock = threading.Lock()  # senders look routes up from their threads

    def get(self, dest: int) -> Route:
        with self._lock:
            route = self._routes.get(dest)
        if route is None:
            known = self.queue.destinations()
            with self._lock:
                for i, (key, url) in known.items():
                    if i not in self._routes:
                        self._routes[i] = self._new(i, key, url)
                route = self._routes.get(dest) or Route(dest, None, f"destination {dest}")
        return route

    def _new(self, dest: int, key: str, url: str) -> Route:
        """A route for a destination first seen; the flusher's own key and URL (a Client's
        events, delivered by its own thread) share the own route: one state, one client."""
        own = self._routes[0]
        if self.own is not None and (key, url) == (self.own.write_key, self.own.api_url):
            own.dests.append(dest)
            return own
        return Route(dest, self._connect(key, url), destination(url, key))

    def all(self) -> list[Route]:
        with self._lock:
            return list({id(r): r for r in self._routes.values()}.values())

    def refresh(self) -> list[Route]:
        """Every destination in the file, with a route."""
        for dest in self.queue.destinations():
            self.get(dest)
        return self.all()

    def paused(self, now: float) -> list[int]:
        """The destinations whose rows no claim may take now."""
        return [d for r in self.all() if r.paused(now) for d in r.dests]

    def keyless(self) -> list[int]:
        """The destinations no key can send to (none, and no key of our own)."""
        return [d for r in self.all() if r.http_client is None for d in r.dests]

    def misconfigured(self) -> str | None:
        """What is wrong with one misconfigured destination, None when none is."""
        wrong = [r for r in self.all() if r.misconfigured]
        if not wrong:
            return None
        if len(self.all()) == 1:
            return wrong[0].misconfigured
        return "; ".join(f"{r.name}: {r.misconfigured}" for r in wrong)

    def close(self) -> None:
        for route in self.all():
            if route.http_client is not None:
                route.http_client.close()
