"""The default, single-instance session store."""

from __future__ import annotations

from typing import Iterator

import attrs
from zope.interface import implementer

from mcpgw.store import ISessionStore, SessionRecord


@implementer(ISessionStore)
@attrs.define
class MemorySessionStore:
    _records: dict[str, SessionRecord] = attrs.field(factory=dict)

    def add(self, record: SessionRecord) -> None:
        self._records[record.id] = record

    def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    def remove(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    def __iter__(self) -> Iterator[SessionRecord]:
        return iter(list(self._records.values()))
