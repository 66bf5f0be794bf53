"""The shared log of every SSE stream's events, so that any instance can replay a stream.

``RedisEventLog`` keeps one bounded Redis stream per SSE stream (``XADD`` with ``MAXLEN``, the
entry id being the event's sequence number), expiring with the session's idle TTL;
``MemoryEventLog`` keeps them in one process's memory, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mcpgw import logs
from mcpgw.store.redis import Keys, RedisConnection, Script

#: KEYS[1] the stream's event log, KEYS[2] the session's set of logs; ARGV seq, event, MAXLEN, TTL ms.
APPEND = Script("""
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1] .. '-0', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""")


class IEventLog(Interface):
    def append(session_id: str, stream: int, seq: int, event: bytes) -> None:
        """Log event ``seq`` of a stream (best effort: a failure is logged, never raised)."""

    def after(session_id: str, stream: int, seq: int) -> defer.Deferred[list[tuple[int, bytes]]]:
        """The logged events of a stream after ``seq``, in order, as (seq, event)."""


@implementer(IEventLog)
class RedisEventLog:
    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, keys: Keys, size: Callable[[], int], ttl: float):
        """``size()``: how many events each stream keeps (``sse.replayEvents``, read at each append:
        a reload changes it)."""
        self._redis = redis
        self._keys = keys
        self._size = size
        self._ttl_ms = int(ttl * 1000)
        self._failures = 0

    def append(self, session_id: str, stream: int, seq: int, event: bytes) -> None:
        if not self._redis.commands.up:
            return
        keys = [self._keys.events(session_id, stream), self._keys.streams(session_id)]
        d = self._redis.eval(APPEND, keys, [seq, event, self._size(), self._ttl_ms])
        d.addCallbacks(self._logged, self._failed)

    def _logged(self, _: Any) -> None:
        self._failures = 0

    def _failed(self, f: Any) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 100 == 0:
            self.log.warn("cluster: event not logged in Redis ({n} so far): {error}", n=self._failures,  # noqa: G010 (twisted.logger)
                          error=f.getErrorMessage())

    def after(self, session_id: str, stream: int, seq: int) -> defer.Deferred[list[tuple[int, bytes]]]:
        d = self._redis.execute("XRANGE", self._keys.events(session_id, stream), f"{seq + 1}-0", "+")
        return d.addCallback(_entries)


def _entries(entries: Any) -> list[tuple[int, bytes]]:
    events = []
    for entry_id, fields in entries or []:
        values = dict(zip(fields[::2], fields[1::2], strict=False))
        events.append((int(bytes(entry_id).split(b"-")[0]), values.get(b"e", b"")))
    return events


@implementer(IEventLog)
class MemoryEventLog:
    """Every stream's events in memory (the last ``size`` of each); ``up`` False: as Redis down."""

    def __init__(self, size: int = 100):
        self.size = size
        self.up = True
        self.streams: dict[tuple[str, int], list[tuple[int, bytes]]] = {}

    def append(self, session_id: str, stream: int, seq: int, event: bytes) -> None:
        if self.up:
            events = self.streams.setdefault((session_id, stream), [])
            events.append((seq, event))
            del events[:-self.size]

    def after(self, session_id: str, stream: int, seq: int) -> defer.Deferred[list[tuple[int, bytes]]]:
        if not self.up:
            return defer.fail(ConnectionError("event log unavailable"))
        return defer.succeed([e for e in self.streams.get((session_id, stream), []) if e[0] > seq])
