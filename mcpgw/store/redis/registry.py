"""The instance registry: this instance's heartbeat, and whether another instance is alive.

The heartbeat is a key with a TTL that says the instance is alive, written every
``redis.heartbeat`` seconds; the same loop refreshes the expiry of the owned
session records in batches.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw import jsonrpc, logs
from mcpgw.store.redis.connection import RedisConnection
from mcpgw.store.redis.keys import client_name
from mcpgw.store.redis.sessions import CONNECTED_TRANSPORTS, RedisSessionStore


class InstanceRegistry(Service):
    """This instance's heartbeat key, and the batched refresh of its sessions' records.

    Every ``interval`` seconds: ``SET PREFIX instance:ID ... PX ttl`` and a PING on the
    pub/sub connection (so a silent network drop is noticed); every
    ``touch_interval`` seconds: one TOUCH script for the owned sessions used
    since the last one (and every SSE/WebSocket session, which live as long as
    their connection). When Redis comes back: the heartbeat and every owned
    record at once.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, store: RedisSessionStore, reactor: Any, interval: float = 1.0,
                 sessions: Callable[[], Iterable[Any]] = lambda: (), touch_interval: float = 30.0):
        self._redis = redis
        self.store = store
        self.keys = store.keys
        self.instance = store.instance
        self._reactor = reactor
        self.interval = interval
        self.ttl = max(3 * interval, interval + 1.0)
        self.touch_interval = max(interval, touch_interval)
        #: The owned sessions whose records ``touch`` refreshes (``refresh_records_of``).
        self._sessions = sessions
        self._loop: LoopingCall | None = None
        self._last_touch = 0.0
        #: The rewrite of every owned record after the last reconnect.
        self.restoring: defer.Deferred[None] = defer.succeed(None)
        self.started = reactor.seconds()
        self._info = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started}
        self._failures = 0

    def refresh_records_of(self, sessions: Callable[[], Iterable[Any]]) -> None:
        """``touch`` refreshes the records of the sessions ``sessions()`` lists (a SessionManager's live
        sessions). The gateway's SessionManager is built after its registry, so it is given here."""
        self._sessions = sessions

    def startService(self) -> None:
        super().startService()
        self._redis.on_change(self._changed)
        self._last_touch = self._reactor.seconds()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(lambda f: self.log.failure("registry loop stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self._redis.commands.up:
            return defer.succeed(None)
        # Gone at once for the others (not after the TTL): their requests for our sessions get 404.
        d = self._redis.execute("DEL", self.keys.instance(self.instance))
        return d.addErrback(lambda f: self.log.debug("registry: heartbeat key not deleted: {e}", e=f.getErrorMessage()))

    def _changed(self, available: bool) -> None:
        if available and self.running:
            self.beat(force_touch=True)
            self.restoring = self.store.restore().addErrback(self._failed, "restoring session records")

    def beat(self, force_touch: bool = False) -> None:
        if not self._redis.commands.up:
            return
        self._redis.execute("SET", self.keys.instance(self.instance), self.heartbeat(), "PX", int(self.ttl * 1000)) \
            .addCallbacks(self._ok, self._failed, errbackArgs=("heartbeat",))
        if self._redis.pubsub.up:
            self._redis.ping_pubsub().addErrback(self._failed, "pub/sub ping")
        now = self._reactor.seconds()
        if force_touch or now - self._last_touch >= self.touch_interval:
            self._last_touch = now
            self.touch()

    def heartbeat(self) -> bytes:
        """The heartbeat key's value; ``redis``: the Redis run it is written to (see ``alive``)."""
        return jsonrpc.dumps({**self._info, "redis": self._redis.run_id})

    def touch(self) -> defer.Deferred[None]:
        """Refresh the records of the sessions used since the last touch."""
        now = self._reactor.seconds()
        seen: dict[str, float] = {}
        for session in self._sessions():
            record = self.store.local(session.id)
            if record is None:
                continue
            if session.transport in CONNECTED_TRANSPORTS:
                seen[session.id] = now
            elif session.last_seen != record.last_seen:
                seen[session.id] = session.last_seen
        if not seen:
            return defer.succeed(None)
        return self.store.touch(seen).addErrback(self._failed, "refreshing session records")

    def alive(self, instance: str, connected: bool = False) -> defer.Deferred[bool]:
        """Whether ``instance`` has written its heartbeat within its TTL; with ``connected``, also
        whether its process still holds a connection to Redis.

        ``connected`` is for the moment a publish to ``instance`` reached nobody: a killed process
        loses its connections at once (the kernel closes them), while its heartbeat key lasts up to
        its TTL. A live instance that only lost its pub/sub connection still has its command
        connection (named with ``CLIENT SETNAME``), so it is not taken for dead. A heartbeat written
        to an earlier run of Redis (a persistent Redis restarted, the instance not reconnected yet),
        or a Redis that refuses CLIENT LIST: the heartbeat alone decides.
        """
        if instance == self.instance:
            return defer.succeed(True)
        if not connected:
            return self._redis.execute("EXISTS", self.keys.instance(instance)).addCallback(lambda n: bool(n))
        return self._redis.execute("GET", self.keys.instance(instance)).addCallback(self._connected, instance)

    def _connected(self, heartbeat: Any, instance: str) -> Any:
        if heartbeat is None:
            return False
        try:
            written_to = jsonrpc.loads(heartbeat).get("redis")
        except (ValueError, AttributeError):
            written_to = None
        if written_to is None or written_to != self._redis.run_id:
            return True
        name = client_name(self.keys, instance).encode()
        return self._redis.connected_names().addCallbacks(lambda names: names is None or name in names,
                                                         lambda f: True)

    def _ok(self, _: Any) -> None:
        self._failures = 0

    def _failed(self, f: Any, what: str) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 60 == 0:
            self.log.warn("registry: {what} failed: {error}", what=what, error=f.getErrorMessage())  # noqa: G010 (twisted.logger)
