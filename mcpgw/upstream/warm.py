"""``warmPool``: pre-spawned children of a per-client stdio server.

A new session takes a child that is already running (no fork/exec, no interpreter
start-up on its path). Replacements for every child taken are spawned together, once the
session that took one has finished its handshake (``settled``: its client's
``notifications/initialized``; the spawn then no longer competes with the handshake), and at
the latest REFILL_DELAY after a take. A warm child says
nothing before ``initialize`` (its stderr is logged by the StdioUpstream anyway), so
its placeholder delegate buffers nothing; one that exits while waiting is dropped
and replaced after a doubling backoff on the injected reactor, so a broken command
does not spin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import logs
from mcpgw.config import ServerConfig, StdioServer
from mcpgw.interfaces import IUpstreamDelegate
from mcpgw.upstream.stdio import ServerActivity, StdioUpstream

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: Seconds from a take to its replacement's spawn at the latest. Not 0: a spawn on the reactor and
#: an interpreter starting beside the taken child while it answers ``initialize`` cost that session
#: ~5 ms of its setup on 2 cores (docs/performance.md); takes within this window share one refill.
REFILL_DELAY = 0.05
#: Seconds from a taker's ``notifications/initialized`` (``settled``) to the refill: one reactor
#: turn, so the reply to that POST is written before the spawn blocks the reactor.
SETTLED_DELAY = 0.001


def warmable(server: ServerConfig) -> TypeGuard[StdioServer]:
    """A server whose sessions can take warm children: per-client stdio, ``warmPool`` > 0."""
    return server.kind == "stdio" and server.warmPool > 0 and server.sessions == "per-client"


@implementer(IUpstreamDelegate)
class _Waiting:
    """The delegate of a warm child nobody has taken yet."""

    routes_on_view = False

    def __init__(self, pool: WarmChildren, child: StdioUpstream):
        self._pool = pool
        self._child = child

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        self._pool.log.debug("warm child {server} pid={pid} spoke before its session; dropped",
                             server=self._pool.server.name, pid=self._child.pid)

    def upstreamProtocolError(self, reason: str) -> None:
        self._child.stop()

    def upstreamEnded(self, reason: str) -> None:
        self._pool._died(self._child, reason)


class WarmChildren:
    """``server.warmPool`` running children of one server, ready to be taken by a session."""

    log = Logger(observer=logs.observer)

    def __init__(self, server: StdioServer, reactor: Any, activity: ServerActivity | None = None,
                 make: Callable[..., StdioUpstream] = StdioUpstream):
        self.server = server
        self.size = server.warmPool
        self._reactor = reactor
        self._activity = activity
        self._make = make
        self.ready: list[StdioUpstream] = []
        self._stopping = False
        self._backoff = BACKOFF_FIRST
        self._timer: Any = None

    def start(self) -> None:
        self._fill()

    def take(self) -> StdioUpstream | None:
        """A running child for a new session (its delegate still to be set), or None (the pool is
        empty: the session spawns its own). Either way the pool is refilled: at ``settled()`` or
        REFILL_DELAY from now, whichever comes first, every missing child at once."""
        child = None
        while self.ready and child is None:
            candidate = self.ready.pop(0)
            if not candidate.ended and not candidate._stopping:
                child = candidate
        if child is not None:
            self._backoff = BACKOFF_FIRST  # it lived until used: the command works
        if self._timer is None and not self._stopping and len(self.ready) < self.size:
            self._timer = self._reactor.callLater(REFILL_DELAY, self._refill)
        return child

    def settled(self) -> None:
        """A session that took a child (or found none) has finished its handshake: refill now rather
        than at REFILL_DELAY, so that back-to-back sessions find replacements that started sooner.
        A refill waiting out a backoff (a child that died) is not hurried."""
        timer = self._timer
        if timer is not None and timer.active() and self._backoff == BACKOFF_FIRST \
                and timer.getTime() - self._reactor.seconds() > SETTLED_DELAY:
            timer.reset(SETTLED_DELAY)

    def stop(self) -> defer.Deferred[None]:
        """Stop every waiting child; fires once they have all exited."""
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        children, self.ready = self.ready, []
        return defer.DeferredList([c.stop() for c in children]).addCallback(lambda _: None)

    def _fill(self) -> None:
        while not self._stopping and len(self.ready) < self.size:
            child = self._make(self.server, None, self._reactor)
            child.delegate = _Waiting(self, child)
            child.activity = self._activity
            try:
                child.spawn()
            except Exception as e:  # noqa: BLE001 - a spawn fails in many ways (OSError, exec, setuid); each backs off and retries
                self.log.error("warm child {server} could not be spawned: {error}", server=self.server.name, error=str(e))
                self._retry()
                return
            if child.ended:  # exited already (a fake reactor, or an instant failure): _died has scheduled a retry
                return
            self.ready.append(child)

    def _died(self, child: StdioUpstream, reason: str) -> None:
        if child in self.ready:
            self.ready.remove(child)
        if self._stopping:
            return
        self.log.warn("warm child {server} pid={pid} {reason} while waiting; replacing it in {delay}s",
                      server=self.server.name, pid=child.pid, reason=reason, delay=self._backoff)
        self._retry()

    def _retry(self) -> None:
        if self._stopping or self._timer is not None:
            return
        delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        self._timer = self._reactor.callLater(delay, self._refill)

    def _refill(self) -> None:
        self._timer = None
        self._fill()
