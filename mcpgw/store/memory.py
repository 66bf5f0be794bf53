"""The default, single-instance session store."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from zope.interface import implementer

from mcpgw.store import ISessionStore, SessionRecord


@implementer(ISessionStore)
@attrs.define
class MemorySessionStore:
    _records: dict[str, SessionRecord] = attrs.field(factory=dict)

    def add(self, record: SessionRecord) -> defer.Deferred[None]:
        self._records[record.id] = record
        return defer.succeed(None)

    def get(self, session_id: str) -> defer.Deferred[SessionRecord | None]:
        return defer.succeed(self._records.get(session_id))

    def update(self, session_id: str, **fields: Any) -> defer.Deferred[None]:
        record = self._records.get(session_id)
        if record is not None:
            for name, value in fields.items():
                setattr(record, name, value)
        return defer.succeed(None)

    def touch(self, seen: Mapping[str, float]) -> defer.Deferred[None]:
        for session_id, when in seen.items():
            record = self._records.get(session_id)
            if record is not None:
                record.last_seen = when
        return defer.succeed(None)

    def remove(self, session_id: str) -> defer.Deferred[None]:
        self._records.pop(session_id, None)
        return defer.succeed(None)

    def __iter__(self) -> Iterator[SessionRecord]:
        return iter(list(self._records.values()))
