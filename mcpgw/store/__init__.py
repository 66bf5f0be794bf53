"""Session records: what the gateway shares about a session beyond its process.

The live Session (child process, open streams) always lives in one gateway
process; the store holds the record other parts (``/servers``, and later
Redis-backed instances) read. ``MemorySessionStore`` is the default; a Redis
store implements the same interface.
"""

from __future__ import annotations

from typing import Iterator

import attrs
from zope.interface import Interface


@attrs.define
class SessionRecord:
    id: str
    server: str
    transport: str
    created: float
    protocol_version: str | None = None


class ISessionStore(Interface):
    def add(record: SessionRecord) -> None:
        """Remember a new session."""

    def get(session_id: str) -> SessionRecord | None:
        """The record of a session, or None."""

    def remove(session_id: str) -> None:
        """Forget a session (idempotent)."""

    def __iter__() -> Iterator[SessionRecord]:
        """Every record."""
