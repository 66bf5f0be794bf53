"""The zope interfaces at mcpgw's boundaries are really provided."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from mcpgw.store import ISessionStore, SessionRecord
from mcpgw.store.memory import MemorySessionStore


class MemorySessionStoreInterfaceTests(SynchronousTestCase):
    def test_verifyObject(self) -> None:
        """A MemorySessionStore provides ISessionStore."""
        self.assertTrue(verifyObject(ISessionStore, MemorySessionStore()))

    def test_verifyClass(self) -> None:
        """MemorySessionStore declares that it implements ISessionStore."""
        self.assertTrue(verifyClass(ISessionStore, MemorySessionStore))


class MemorySessionStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemorySessionStore()
        self.record = SessionRecord("sid", "time", "streamable", 1.0)

    def test_addGet(self) -> None:
        """An added record can be read back by id."""
        self.store.add(self.record)
        self.assertIs(self.successResultOf(self.store.get("sid")), self.record)

    def test_getUnknown(self) -> None:
        """An unknown id gives None."""
        self.assertIsNone(self.successResultOf(self.store.get("nope")))

    def test_removeIdempotent(self) -> None:
        """remove() forgets a record, and removing again is harmless."""
        self.store.add(self.record)
        self.store.remove("sid")
        self.store.remove("sid")
        self.assertIsNone(self.successResultOf(self.store.get("sid")))

    def test_iterateWhileRemoving(self) -> None:
        """Iteration is over a snapshot, so records may be removed meanwhile."""
        self.store.add(self.record)
        self.store.add(SessionRecord("other", "time", "sse", 2.0))
        seen = []
        for record in self.store:
            seen.append(record.id)
            self.store.remove(record.id)
        self.assertEqual(sorted(seen), ["other", "sid"])
        self.assertEqual(list(self.store), [])
