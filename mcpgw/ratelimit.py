"""Rate limiting: a fixed window per client, behind ``IRateLimiter`` so a shared store can replace it.

A client is its authenticated identity, else its IP address (an IPv6 client
by its /64, which one host usually holds whole). ``X-Forwarded-For`` and
``X-Real-IP`` are believed only from ``trustedProxies``.

``mcpgw.web.Guard`` counts one hit per HTTP request to an MCP endpoint, and
the WebSocket transport one per message, with the same limiter and key.

Writing another limiter (Redis, for several replicas): implement
``IRateLimiter.hit`` to count the hit and fire with a ``Decision``. A fixed
window maps onto ``INCR key`` + ``PEXPIRE key window NX`` + ``PTTL key``
in one MULTI or script: ``count = INCR``, ``reset_after = PTTL / 1000``,
``allowed = count <= limit``. The Deferred may fire later (the Guard then
answers asynchronously) or at once; an errback is logged and the request
is let through (fail open), so an outage of the store is not an outage of
the gateway.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mcpgw import logs


@attrs.frozen
class Decision:
    """The outcome of one hit."""

    allowed: bool
    #: Hits allowed per window.
    limit: int
    #: Hits left in the current window (0 when refused).
    remaining: int
    #: Seconds until the current window ends and the count starts again.
    reset_after: float
    #: The window's length in seconds (for ``RateLimit-Policy``).
    window: float

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait (at least 1) before a refused client tries again."""
        return max(1, math.ceil(self.reset_after))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``RateLimit-*`` (draft-ietf-httpapi-ratelimit-headers, the fields express-rate-limit sends)
        and, when refused, ``Retry-After``."""
        out = [
            (b"ratelimit-policy", b"%d;w=%d" % (self.limit, math.ceil(self.window))),
            (b"ratelimit-limit", b"%d" % self.limit),
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", b"%d" % max(0, math.ceil(self.reset_after))),
        ]
        if not self.allowed:
            out.append((b"retry-after", b"%d" % self.retry_after))
        return out


class IRateLimiter(Interface):
    """Counts hits per key in windows of ``window`` seconds, ``limit`` hits each."""

    limit = Attribute("int: hits allowed per key per window")
    window = Attribute("float: the window's length in seconds")

    def hit(key: str) -> defer.Deferred[Decision]:
        """Count one hit for ``key``; fires with its Decision.

        A refused hit is a Decision with ``allowed`` False, never an errback;
        an errback means the limiter itself failed (the caller lets the hit through).
        """


@attrs.define
class _Window:
    count: int
    ends: float


@implementer(IRateLimiter)
class MemoryRateLimiter:
    """Fixed windows in one process, at most ``max_keys`` of them.

    Every window has the same length, so insertion order is expiry order:
    expired windows are dropped from the front in amortised O(1) per hit, and
    beyond ``max_keys`` live keys the oldest window is dropped (its client
    starts a fresh count: the bound is on memory, not on who gets refused).
    """

    log = Logger(observer=logs.observer)

    def __init__(self, limit: int, window: float, clock: Any, max_keys: int = 100_000):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._windows)

    def decide(self, key: str) -> Decision:
        """``hit`` without the Deferred (this limiter always knows at once)."""
        now = self._clock.seconds()
        windows = self._windows
        while windows:
            first = next(iter(windows.values()))
            if first.ends > now:
                break
            windows.popitem(last=False)
        w = windows.get(key)
        if w is None:
            if len(windows) >= self.max_keys:
                windows.popitem(last=False)
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 10_000 == 0:
                    self.log.warn("rate limiter: {n} client windows dropped early (rateLimit.maxKeys={max})",  # noqa: G010 (twisted.logger)
                                  n=self.evicted, max=self.max_keys)
            w = windows[key] = _Window(0, now + self.window)
        if w.count <= self.limit:
            w.count += 1
        allowed = w.count <= self.limit
        return Decision(allowed, self.limit, self.limit - w.count if allowed else 0, w.ends - now, self.window)

    def hit(self, key: str) -> defer.Deferred[Decision]:
        return defer.succeed(self.decide(key))


class ClientAddresses:
    """The client's IP address of a request, believing forwarding headers from trusted proxies only."""

    def __init__(self, trusted: Iterable[str]):
        self._trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def trusted(self, address: Any) -> bool:
        return any(address.version == net.version and address in net for net in self._trusted)

    def client(self, peer: str, forwarded_for: list[bytes] | None, real_ip: bytes | None) -> str:
        """``peer`` (the TCP peer) unless it is a trusted proxy; then the right-most
        untrusted address of X-Forwarded-For, else X-Real-IP, else the peer."""
        address = _ip(peer)
        if address is None or not self._trusted or not self.trusted(address):
            return peer
        if forwarded_for:
            hops = [h.strip() for v in forwarded_for for h in v.decode("latin-1").split(",")]
            for hop in reversed(hops):
                hop_ip = _ip(hop)
                if hop_ip is None:
                    return str(address)  # a forged or garbled list: stop at what is known
                if not self.trusted(hop_ip):
                    return str(hop_ip)
                address = hop_ip
            return str(address)
        if real_ip:
            real = _ip(real_ip.decode("latin-1").strip())
            if real is not None:
                return str(real)
        return str(address)


def _ip(text: str) -> Any:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_key(ip: str) -> str:
    """The rate-limit key of an anonymous client: its IPv4 address, or its IPv6 /64."""
    address = _ip(ip)
    if address is None:
        return "ip:" + ip
    if address.version == 6:
        return "ip:" + str(ipaddress.ip_network(f"{address}/64", strict=False))
    return "ip:" + str(address)
