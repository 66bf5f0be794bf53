"""Session records: what the gateway shares about a session beyond its process.

The live Session (child process, open streams) always lives in one gateway
process, its owning instance; the store holds the record that other parts
(``/servers``, and with Redis the other gateway instances) read.
``MemorySessionStore`` is the default; ``mcpgw.store.redis.RedisSessionStore``
implements the same interface for several instances.

Every method returns a Deferred (the memory store's have already fired), so a
caller never needs to know which store it has. The owning instance never waits
on the store on a session's hot path: it has the live Session in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet import defer
from zope.interface import Interface


@attrs.define
class SessionRecord:
    id: str
    server: str
    transport: str
    created: float
    protocol_version: str | None = None
    #: The gateway instance whose process runs the session's child (None: single instance).
    instance: str | None = None
    #: When the session was last used (seconds, the owning instance's clock).
    last_seen: float | None = None
    #: The authenticated identity that created the session (None: anonymous).
    owner: str | None = None


class ISessionStore(Interface):
    def add(record: SessionRecord) -> defer.Deferred[None]:
        """Remember a new session."""

    def get(session_id: str) -> defer.Deferred[SessionRecord | None]:
        """The record of a session, or None."""

    def update(session_id: str, **fields: Any) -> defer.Deferred[None]:
        """Change fields of a session's record (``protocol_version``, ...)."""

    def touch(seen: Mapping[str, float]) -> defer.Deferred[None]:
        """Sessions used since the last touch: id -> last use; refreshes their idle expiry."""

    def remove(session_id: str) -> defer.Deferred[None]:
        """Forget a session (idempotent)."""
