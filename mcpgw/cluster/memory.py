"""Several cluster instances in one process, for tests: what Redis holds, in memory.

``MemoryWorld(clock)`` is the shared part (the bus, the session records, the heartbeats, the event
log); ``world.backend(instance)`` is one instance's ``Backend`` on it, to give to ``Cluster``.
``kill(instance)`` plays a process killed by the kernel: its connection is gone at once (nobody
hears its channel, ``alive(connected=True)`` is false) while its heartbeat and records stay until
``expire(instance)``, as a heartbeat key's TTL runs out. A stopped instance deletes its heartbeat
(its registry's ``stopService``), as the Redis registry does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from zope.interface import implementer

from mcpgw.cluster.eventlog import MemoryEventLog
from mcpgw.cluster.pubsub import MemoryBus, MemoryPubSub
from mcpgw.cluster.service import Backend
from mcpgw.store import ISessionStore, SessionRecord


class MemoryWorld:
    """What every instance shares (Redis, in a real deployment)."""

    def __init__(self, clock: Any, timeout: float = 1.0, replay_events: int = 100):
        self.clock = clock
        self.timeout = timeout
        self.bus = MemoryBus(clock)
        self.records: dict[str, SessionRecord] = {}
        #: Instances whose heartbeat is there.
        self.heartbeats: set[str] = set()
        #: Instances that hold a connection.
        self.connected: set[str] = set()
        self.events = MemoryEventLog(replay_events)
        self.pubsubs: dict[str, MemoryPubSub] = {}

    def backend(self, instance: str) -> Backend:
        pubsub = self.pubsubs[instance] = self.bus.connect()
        registry = MemoryRegistry(self, instance, pubsub)
        store = MemoryRecordStore(self, instance, pubsub)

        def problem() -> str | None:
            return None if pubsub.available else "redis: connection refused"

        return Backend(instance=instance, pubsub=pubsub, store=store, registry=registry, events=self.events,
                       channel=lambda name: f"to:{name}", problem=problem, timeout=self.timeout,
                       services=(registry,), describe="memory")

    def kill(self, instance: str) -> None:
        """The process is gone; its heartbeat and records are not (yet)."""
        self.connected.discard(instance)
        self.pubsubs[instance].set_available(False, notify=False)

    def expire(self, instance: str) -> None:
        """The heartbeat of ``instance`` runs out."""
        self.heartbeats.discard(instance)


@implementer(ISessionStore)
class MemoryRecordStore:
    """One instance's view of the shared records (RedisSessionStore's interface)."""

    def __init__(self, world: MemoryWorld, instance: str, pubsub: MemoryPubSub):
        self._world = world
        self._pubsub = pubsub
        self.instance = instance
        self.grace = 0.0
        self._local: dict[str, SessionRecord] = {}
        self.on_remove: Any = None

    def _check(self) -> None:
        if not self._pubsub.available:
            raise ConnectionError("store unavailable")

    def local(self, session_id: str) -> SessionRecord | None:
        return self._local.get(session_id)

    def add(self, record: SessionRecord) -> defer.Deferred[None]:
        if record.instance is None:
            record.instance = self.instance
        self._local[record.id] = record
        return defer.maybeDeferred(self._write, record)

    def _write(self, record: SessionRecord) -> None:
        self._check()
        self._world.records[record.id] = attrs.evolve(record)

    def get(self, session_id: str) -> defer.Deferred[SessionRecord | None]:
        def read() -> SessionRecord | None:
            self._check()
            record = self._world.records.get(session_id)
            return None if record is None else attrs.evolve(record)

        return defer.maybeDeferred(read)

    def update(self, session_id: str, **fields: Any) -> defer.Deferred[None]:
        local = self._local.get(session_id)
        if local is not None:
            for name, value in fields.items():
                setattr(local, name, value)
            return defer.maybeDeferred(self._write, local)
        return defer.succeed(None)

    def touch(self, seen: Mapping[str, float]) -> defer.Deferred[None]:
        return defer.succeed(None)

    def remove(self, session_id: str) -> defer.Deferred[None]:
        if self._local.pop(session_id, None) is not None and self.on_remove is not None:
            self.on_remove(session_id)

        def delete() -> None:
            self._check()
            self._world.records.pop(session_id, None)

        return defer.maybeDeferred(delete)


class MemoryRegistry(Service):
    """One instance's heartbeat, and its view of the others' (InstanceRegistry's ``alive``)."""

    def __init__(self, world: MemoryWorld, instance: str, pubsub: MemoryPubSub):
        self._world = world
        self._pubsub = pubsub
        self.instance = instance
        #: The sessions whose records InstanceRegistry would refresh (no record expires here).
        self.sessions: Callable[[], Iterable[Any]] = lambda: ()

    def refresh_records_of(self, sessions: Callable[[], Iterable[Any]]) -> None:
        """As InstanceRegistry's."""
        self.sessions = sessions

    def startService(self) -> None:
        super().startService()
        self._world.heartbeats.add(self.instance)
        self._world.connected.add(self.instance)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._world.heartbeats.discard(self.instance)
        self._world.connected.discard(self.instance)
        return defer.succeed(None)

    def alive(self, instance: str, connected: bool = False) -> defer.Deferred[bool]:
        if instance == self.instance:
            return defer.succeed(True)
        if not self._pubsub.available:
            return defer.fail(ConnectionError("registry unavailable"))
        beating = instance in self._world.heartbeats
        return defer.succeed(beating and (not connected or instance in self._world.connected))
