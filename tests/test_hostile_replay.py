"""Issue 15, finding 8: a session's replay logs are bounded in bytes (``sse.replayBytes``).

The attack: a 2025-03-26 session sends 40 POSTs, each a JSON-RPC batch of 10 calls answering
500 KB (2025-03-26 basic/transports: a POST of requests may be answered with an SSE stream; each
stream is resumable with ``Last-Event-ID``, §Resumability and Redelivery), and reads every
response. Each batch's answer is a stream of its own, and every stream kept its last
``sse.replayEvents`` events for replay: 154 MiB stayed in the session after every byte had been
read. The session now holds at most ``sse.replayBytes`` of events (plus its newest one), dropping
first what the client acknowledged with a newer ``Last-Event-ID``, then what was delivered.

In memory: the budget, the order of eviction, acknowledgement, the backlog. Against a real
``twistd mcpgw``: the attack at the issue's size, the gateway's RSS, and a legitimate SDK client
calling tools throughout.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ConfigError, GatewayConfig, SseConfig, StdioServer, parse
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import Heartbeat, frame
from mcpgw.transports.streamable import (
    MAX_BACKLOG,
    MAX_STREAMS,
    PostExchange,
    ReplayBudget,
    StreamableOutlet,
    StreamLog,
)
from tests import wire
from tests.gateway_process import fixture_server
from tests.hostile import LegitClient, proc_stats
from tests.test_sse_unit import FakeSession, client_gone, make_request

KIB = 1024
MIB = 1024 * KIB


def answer(id: Any, size: int) -> bytes:
    """A child's response of about ``size`` bytes."""
    return b'{"jsonrpc":"2.0","id":%d,"result":{"text":"%s"}}' % (id, b"x" * size)


def held(outlet: StreamableOutlet) -> int:
    """Bytes of events the outlet's streams really keep (what the budget must account for)."""
    return sum(len(event) for stream in outlet.streams.values() for _, event in stream.replay.events)


class ReplayBudgetTests(SynchronousTestCase):
    """StreamLog and ReplayBudget alone."""

    def test_withinBudgetKeepsEverything(self) -> None:
        budget = ReplayBudget(100)
        log = StreamLog(1, 256, budget)
        for seq in range(1, 5):
            log.append(seq, b"x" * 20)
        self.assertEqual((len(log.after(0)), budget.used), (4, 80))

    def test_overBudgetDropsOldest(self) -> None:
        """Over the budget the oldest events go; what is left fits."""
        budget = ReplayBudget(100)
        log = StreamLog(1, 256, budget)
        for seq in range(1, 11):
            log.append(seq, b"%02d" % seq + b"x" * 18)
        self.assertEqual(budget.used, 100)
        self.assertEqual([e[:2] for e in log.after(0)], [b"06", b"07", b"08", b"09", b"10"])

    def test_newestEventStaysEvenIfLarger(self) -> None:
        """An event larger than the whole budget is kept until the next one (a bound of limit + one event)."""
        budget = ReplayBudget(100)
        log = StreamLog(1, 256, budget)
        log.append(1, b"a" * 10)
        log.append(2, b"b" * 500)
        self.assertEqual(log.after(0), [b"b" * 500])
        log.append(3, b"c" * 10)
        self.assertEqual(log.after(0), [b"c" * 10])
        self.assertEqual(budget.used, 10)

    def test_deliveredGoBeforeUndelivered(self) -> None:
        """An older stream's undelivered events outlive a newer stream's delivered ones."""
        budget = ReplayBudget(100)
        undelivered, delivered = StreamLog(1, 256, budget), StreamLog(2, 256, budget)
        undelivered.append(1, b"u" * 40)
        delivered.delivered = 2
        delivered.append(1, b"d" * 40)
        delivered.append(2, b"d" * 40)
        self.assertEqual(undelivered.after(0), [b"u" * 40])
        self.assertEqual(delivered.after(0), [b"d" * 40])

    def test_acknowledgedDroppedAtOnce(self) -> None:
        """Last-Event-ID N: the client has every event up to N; they leave the budget without pressure."""
        budget = ReplayBudget(1000)
        log = StreamLog(1, 256, budget)
        for seq in range(1, 6):
            log.append(seq, b"x" * 10)
        log.acknowledge(3)
        self.assertEqual((len(log.after(0)), budget.used), (2, 20))

    def test_forgetReleases(self) -> None:
        budget = ReplayBudget(1000)
        log = StreamLog(1, 256, budget)
        log.append(1, b"x" * 10)
        log.forget()
        self.assertEqual((budget.used, dict(budget.logs)), (0, {}))

    def test_countBoundStillHolds(self) -> None:
        """sse.replayEvents still caps a stream's events, and its bytes leave the budget."""
        budget = ReplayBudget(1000)
        log = StreamLog(1, 3, budget)
        for seq in range(1, 8):
            log.append(seq, b"x")
        self.assertEqual((len(log.after(0)), budget.used), (3, 3))


class OutletReplayTests(SynchronousTestCase):
    """A Streamable HTTP session's outlet under the issue's attack, in memory."""

    replay_bytes = 1 * MIB

    def setUp(self) -> None:
        self.clock = Clock()
        self.heartbeat = Heartbeat(15.0, self.clock)
        server = StdioServer(name="fx", command="t", executable="/bin/t")
        config = GatewayConfig(servers={"fx": server}, sse=SseConfig(replayBytes=self.replay_bytes))
        ctx = GatewayContext(config=config, sessions=None, heartbeat=self.heartbeat, reactor=self.clock)  # type: ignore[arg-type]
        self.outlet = StreamableOutlet(FakeSession("2025-03-26"), ctx)  # type: ignore[arg-type]

    def batch(self, first_id: int, calls: int = 10, size: int = 50 * KIB, gone_after: int | None = None) -> Any:
        """One batch POST answered on its own stream; the client leaves after ``gone_after`` answers."""
        request = make_request()
        ids = list(range(first_id, first_id + calls))
        exchange = PostExchange(self.outlet, request, ids, batch=True)
        for n, id in enumerate(ids):
            if gone_after is not None and n == gone_after:
                client_gone(request)
            exchange.answer(id, answer(id, size))
        return exchange

    def test_fortyBatchesStayWithinBudget(self) -> None:
        """The issue's attack (40 batches of 10 answers), read in full: the session keeps at most
        sse.replayBytes plus one event, and the accounting matches what is really kept."""
        for n in range(40):
            self.batch(n * 10 + 1)
        event = len(frame(answer(1, 50 * KIB), id=b"40_10"))
        self.assertLessEqual(self.outlet.replay.used, self.replay_bytes + event)
        self.assertEqual(self.outlet.replay.used, held(self.outlet))
        # Without the budget: MAX_STREAMS streams x 10 events of 50 KiB each.
        self.assertLess(self.outlet.replay.used, MAX_STREAMS * 10 * 50 * KIB / 10)

    def test_newestStreamStillResumable(self) -> None:
        """The newest stream's last events are still there for a Last-Event-ID (2025-03-26 §Resumability)."""
        for n in range(40):
            self.batch(n * 10 + 1)
        newest = self.outlet.streams[max(self.outlet.streams)]
        self.assertTrue(newest.log.after(9))

    def test_undeliveredOutlivesDelivered(self) -> None:
        """A stream whose client went away keeps its undelivered answers while later read streams churn."""
        self.batch(1, calls=4, size=100 * KIB, gone_after=2)  # answers 3 and 4 are not delivered
        for n in range(1, 20):
            self.batch(n * 10 + 1)
        first = self.outlet.streams[1]
        missed = first.log.after(2)
        self.assertEqual(len(missed), 2)
        self.assertIn(b'"id":4,', missed[-1])

    def test_lastEventIdAcknowledges(self) -> None:
        """Resuming with Last-Event-ID 1_2: events up to 2 of stream 1 leave the budget; 3 and 4 are replayed."""
        self.batch(1, calls=4, size=10 * KIB, gone_after=2)
        before = self.outlet.replay.used
        resumed = make_request(b"GET")
        self.assertTrue(self.outlet.resume(resumed, 1, 2))
        stream = self.outlet.streams[1]
        self.assertEqual([s for s, _ in stream.replay.events], [3, 4])
        self.assertEqual(before - self.outlet.replay.used, sum(len(frame(answer(i, 10 * KIB), id=b"1_%d" % i)) for i in (1, 2)))

    def test_evictedStreamsLeaveTheBudget(self) -> None:
        """Streams past MAX_STREAMS are forgotten, and so are their bytes."""
        budget = 64 * MIB
        self.outlet.replay.limit = budget
        for n in range(MAX_STREAMS + 8):
            self.batch(n * 10 + 1, calls=1, size=KIB)
        self.assertEqual(len(self.outlet.streams), MAX_STREAMS)
        self.assertEqual(self.outlet.replay.used, held(self.outlet))
        self.assertEqual(len(self.outlet.replay.logs), MAX_STREAMS)

    def test_backlogBoundedInBytes(self) -> None:
        """Server messages for a session with no stream: at most sse.replayBytes (and MAX_BACKLOG) of them."""
        message = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"%s"}}' % (b"y" * 100 * KIB)
        for _ in range(50):
            self.outlet.unbound(message, {"method": "notifications/message"})
        self.assertLessEqual(self.outlet._backlog_bytes, self.replay_bytes)
        self.assertEqual(self.outlet._backlog_bytes, sum(len(m) for m in self.outlet._backlog))
        self.assertLessEqual(len(self.outlet._backlog), MAX_BACKLOG)


class ReplayBytesConfigTests(SynchronousTestCase):
    def test_default(self) -> None:
        self.assertEqual(parse({"mcpServers": {"fx": fixture_server()}}, {}).sse.replayBytes, 4 * MIB)

    def test_invalid(self) -> None:
        for bad in (0, -1, "4MB", 1.5):
            with self.assertRaises(ConfigError) as e:
                parse({"mcpServers": {"fx": fixture_server()}, "sse": {"replayBytes": bad}}, {})
            self.assertIn("sse.replayBytes", str(e.exception))


# -- the attack against a real gateway ---------------------------------------------

#: sse.replayBytes for the attack: the default.
REPLAY_BYTES = 4 * MIB
POSTS, CALLS, ANSWER = 40, 10, 500_000
#: What one batch needs while it is in flight and the allocator keeps for the next one: its 5 MB
#: of answers in a few copies at most (the child's lines, their parsed views, the framed events,
#: the transport's buffer). Measured: +7 MiB in all with the budget; +155 MiB with it set out of
#: reach (replayBytes 1 GiB), the issue's 154 MiB.
WORKING_SET = 32 * MIB


@pytest.mark.integration
def test_forty_batches_of_500k_answers_leave_the_session_bounded(make_gateway) -> None:
    """Finding 8 at its size: 40 POSTs x a batch of 10 calls x 500 KB answers (200 MB through the
    gateway), every response read. The RSS the attack leaves is bounded by sse.replayBytes plus
    one batch's working set (the ceiling without the byte budget: 154 MiB and more), and it stops
    growing once the first batches have warmed the allocator: the last 30 POSTs (150 MB) add less
    than sse.replayBytes. A legitimate SDK client keeps calling tools throughout."""
    gw = make_gateway(wire.config(sse={"keepalive": 0.2, "replayBytes": REPLAY_BYTES}))
    pid = gw.proc.pid
    with wire.http_client(gw.url, timeout=60) as attacker, LegitClient(gw.url + "/mcp") as legit:
        sid = wire.open_session(attacker, version="2025-03-26")
        headers = wire.session_headers(sid, "2025-03-26")
        before = proc_stats(pid)
        readings = []
        for post in range(POSTS):
            batch = [wire.tool_call(post * CALLS + i, "big", {"size": ANSWER}) for i in range(CALLS)]
            r = attacker.post("/mcp", headers=headers, json=batch)
            assert r.status_code == 200, r.text[:200]
            replies = wire.messages_of(r)
            assert len(replies) == CALLS and all(len(m["result"]["content"][0]["text"]) == ANSWER for m in replies)
            readings.append(proc_stats(pid))
        after = proc_stats(pid)
        legit.assert_healthy()
    growth = after.grew(before)
    plateau = after.rss - readings[9].rss
    print(f"\nreplay attack: RSS {before.rss / MIB:.1f} -> {after.rss / MIB:.1f} MiB (+{growth.rss / MIB:.1f}), "
          f"POST 10 -> 40: {plateau / MIB:+.1f} MiB, fds {growth.fds:+d}, legit p99 {legit.report.p99 * 1000:.0f} ms "
          f"over {len(legit.report.latencies)} calls")
    assert growth.rss < REPLAY_BYTES + WORKING_SET, json.dumps([r.rss // MIB for r in readings])
    assert plateau < REPLAY_BYTES, json.dumps([r.rss // MIB for r in readings])
    assert growth.fds <= 2  # the attacker's and the legit client's connections at most
