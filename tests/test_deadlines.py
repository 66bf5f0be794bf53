"""mcpgw.deadlines.DeadlineQueue on a Clock: one timer, entries expire in start order at start + timeout."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from mcpgw.deadlines import DeadlineQueue


class DeadlineQueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table: dict[str, float] = {}
        self.expired: list[str] = []
        self.queue = DeadlineQueue(self.clock, 10.0, lambda: self.table.items(), self._expire)

    def _expire(self, key: str) -> None:
        self.expired.append(key)
        del self.table[key]

    def add(self, key: str) -> None:
        self.table[key] = self.clock.seconds()
        self.queue.added()

    def test_entries_expire_at_their_own_deadline_on_one_timer(self) -> None:
        self.add("a")
        self.clock.advance(4)
        self.add("b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(6)
        self.assertEqual(self.expired, ["a"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # moved on to b's deadline
        self.clock.advance(3.9)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_answered_entry_never_expires(self) -> None:
        self.add("a")
        self.clock.advance(1)
        self.add("b")
        del self.table["a"]
        self.clock.advance(9)  # the timer meant for a finds b, one second short of its deadline
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])

    def test_every_entry_past_its_deadline_expires_at_once(self) -> None:
        for key in "abc":
            self.add(key)
        self.clock.advance(30)
        self.assertEqual(self.expired, ["a", "b", "c"])
        self.assertFalse(self.queue.armed)

    def test_stop_cancels_and_added_rearms(self) -> None:
        self.add("a")
        self.queue.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual(self.expired, [])
        self.queue.added()
        self.clock.advance(10)
        self.assertEqual(self.expired, ["a"])

    def test_no_timeout_no_timer(self) -> None:
        self.queue.timeout = None
        self.add("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
