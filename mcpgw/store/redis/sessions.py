"""The session store: session records in Redis hashes that expire after ``session.maxAge`` of idleness.

The owning instance never waits on Redis for its own sessions: it keeps their
records in memory, refreshes the expiry of the ones used in batches
(``mcpgw.store.redis.registry``), and writes them all again whenever the
connection comes back (a restarted Redis may have lost them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import logs
from mcpgw.store import ISessionStore, SessionRecord
from mcpgw.store.redis.connection import RedisConnection, reply_text
from mcpgw.store.redis.keys import REMOVE, TOUCH, UPDATE, WRITE, Keys


def record_from_hash(session_id: str, flat: list[Any]) -> SessionRecord | None:
    fields = {reply_text(flat[i]): reply_text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    try:
        return SessionRecord(
            id=session_id, server=fields["server"], transport=fields["transport"], created=float(fields["created"]),
            protocol_version=fields.get("proto") or None, instance=fields.get("instance") or None,
            last_seen=float(fields["seen"]) if fields.get("seen") else None, owner=fields.get("owner") or None,
        )
    except (KeyError, ValueError):
        return None


def record_fields(record: SessionRecord) -> list[Any]:
    flat: list[Any] = [
        "server", record.server, "transport", record.transport, "created", repr(record.created),
        "seen", repr(record.last_seen if record.last_seen is not None else record.created),
    ]
    if record.instance is not None:
        flat += ["instance", record.instance]
    if record.protocol_version is not None:
        flat += ["proto", record.protocol_version]
    if record.owner is not None:
        flat += ["owner", record.owner]
    return flat


#: Transports whose sessions live as long as their connection: never idle-expired while owned.
CONNECTED_TRANSPORTS = ("sse", "ws")


@implementer(ISessionStore)
class RedisSessionStore:
    """Session records in Redis hashes; this instance's own records also in memory.

    A record expires ``session.maxAge`` after its last use plus ``grace`` (the
    owner refreshes it in batches, so a crashed owner's records go away by
    themselves). Redis errors propagate as failed Deferreds; callers that only
    record something log them, and ``restore()`` writes every owned record again
    once Redis is back.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, keys: Keys, instance: str, idle_seconds: float, reactor: Any,
                 grace: float = 60.0):
        self._redis = redis
        self.keys = keys
        self.instance = instance
        self._max_age = idle_seconds
        self._reactor = reactor
        self.grace = grace
        self._local: dict[str, SessionRecord] = {}
        #: Told when one of this instance's sessions ends (mcpgw.cluster tells the other instances).
        self.on_remove: Callable[[str], None] | None = None

    def owned(self) -> list[SessionRecord]:
        return list(self._local.values())

    def local(self, session_id: str) -> SessionRecord | None:
        """This instance's own record of a session (what Redis was last told), or None."""
        return self._local.get(session_id)

    def ttl_ms(self, record: SessionRecord) -> int:
        now = self._reactor.seconds()
        if record.transport in CONNECTED_TRANSPORTS:
            left = self._max_age
        else:
            seen = record.last_seen if record.last_seen is not None else record.created
            left = max(0.0, self._max_age - (now - seen))
        return max(1, int((left + self.grace) * 1000))

    def _write(self, record: SessionRecord) -> defer.Deferred[None]:
        d = self._redis.eval(WRITE, [self.keys.session(record.id)], [self.ttl_ms(record), *record_fields(record)])
        return d.addCallback(lambda _: None)

    # ISessionStore

    def add(self, record: SessionRecord) -> defer.Deferred[None]:
        if record.instance is None:
            record.instance = self.instance
        if record.last_seen is None:
            record.last_seen = record.created
        self._local[record.id] = record
        return self._write(record)

    def get(self, session_id: str) -> defer.Deferred[SessionRecord | None]:
        local = self._local.get(session_id)
        if local is not None:
            return defer.succeed(local)
        d = self._redis.execute("HGETALL", self.keys.session(session_id))
        return d.addCallback(lambda flat: record_from_hash(session_id, flat) if flat else None)

    def update(self, session_id: str, **fields: Any) -> defer.Deferred[None]:
        record = self._local.get(session_id)
        if record is not None:
            for name, value in fields.items():
                setattr(record, name, value)
        names = {"protocol_version": "proto", "last_seen": "seen", "owner": "owner", "instance": "instance"}
        flat: list[Any] = []
        for name, value in fields.items():
            if name in names and value is not None:
                flat += [names[name], value if isinstance(value, str) else repr(value)]
        if not flat:
            return defer.succeed(None)
        return self._redis.eval(UPDATE, [self.keys.session(session_id)], flat).addCallback(lambda _: None)

    def touch(self, seen: Mapping[str, float]) -> defer.Deferred[None]:
        keys: list[str] = []
        args: list[Any] = []
        records: list[SessionRecord] = []
        for session_id, when in seen.items():
            record = self._local.get(session_id)
            if record is None:
                continue
            record.last_seen = when
            records.append(record)
            keys.append(self.keys.session(session_id))
            args += [repr(when), self.ttl_ms(record)]
        if not keys:
            return defer.succeed(None)

        def rewrite(missing: list[int]) -> Any:
            # Gone from Redis (a restart without persistence, an eviction): write them whole again.
            again = [self._write(records[i - 1]) for i in missing or [] if records[i - 1].id in self._local]
            return defer.gatherResults(again, consumeErrors=True).addCallback(lambda _: None) if again else None

        return self._redis.eval(TOUCH, keys, args).addCallback(rewrite)

    def remove(self, session_id: str) -> defer.Deferred[None]:
        if self._local.pop(session_id, None) is not None and self.on_remove is not None:
            self.on_remove(session_id)
        d = self._redis.eval(REMOVE, [self.keys.session(session_id), self.keys.streams(session_id)])
        return d.addCallback(lambda _: None)

    # for the registry

    def restore(self) -> defer.Deferred[None]:
        """Write every owned record again (Redis came back, maybe empty)."""
        writes = [self._write(record) for record in self.owned()]
        return defer.gatherResults(writes, consumeErrors=True).addCallback(lambda _: None)
