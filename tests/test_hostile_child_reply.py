"""Issue 15, finding 11: a child's reply that cannot be parsed.

The MCP stdio transport carries UTF-8 JSON-RPC messages, one per line (MCP spec, "Transports:
stdio"). A child that answers a request with a line that is not UTF-8, nested deeper than the
parser takes (1024) or cut short must not leave its caller waiting for limits.requestTimeout: when
the line's top-level members show a response (JSON-RPC 2.0 section 5: ``result`` or ``error``, no
``method``) and its ``id``, that request gets a JSON-RPC error (-32603) at once, the session's
``mcp_gateway_errors_total{kind="upstream_protocol"}`` counts it, and the session goes on.

Real ``twistd mcpgw`` with ``tests/fixtures/hostile_server.py``; the reply logic itself is also
covered in memory below (``ReplyIdTests``, ``UnreadableLineTests`` on the fake process reactor).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import StdioServer
from mcpgw.metrics import NULL_BOUND
from mcpgw.upstream.stdio import StdioUpstream, UnreadableReply, reply_id
from tests import wire
from tests.fake_process import FakeProcessReactor, LogCapture
from tests.gateway_process import Gateway
from tests.hostile import LegitClient, proc_stats

HOSTILE_SERVER = Path(__file__).resolve().parent / "fixtures" / "hostile_server.py"
#: limits.requestTimeout of the gateway under test: what a dropped reply would cost the caller.
REQUEST_TIMEOUT = 30


def protocol_errors(gw: Gateway) -> float:
    text = httpx.get(gw.metrics_url, timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^mcp_gateway_errors_total\{[^}]*kind="upstream_protocol"[^}]*\} (\S+)$', text, re.M))


@pytest.fixture(scope="module")
def gw():
    g = Gateway({"mcpServers": {"hostile": {"command": sys.executable, "args": [str(HOSTILE_SERVER)], "default": True}},
                 "limits": {"requestTimeout": REQUEST_TIMEOUT}})
    yield g
    g.stop()


CASES = [
    ("bad_utf8", {}),
    ("deep", {"depth": 2000}),
    ("deep", {"depth": 100_000}),
    ("truncated", {}),
    ("id_last", {"how": "bad_utf8"}),
    ("id_last", {"how": "deep"}),
]


@pytest.mark.integration
class TestUnparsableReply:
    @pytest.mark.parametrize("tool,arguments", CASES, ids=[f"{t}-{a}" for t, a in CASES])
    def test_request_gets_an_error_at_once_and_the_session_goes_on(self, gw, tool, arguments):
        before = protocol_errors(gw)
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            started = time.monotonic()
            r = c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(7, tool, arguments))
            elapsed = time.monotonic() - started
            [reply] = wire.messages_of(r)
            assert reply["id"] == 7 and reply["error"]["code"] == -32603, reply
            assert "could not be read" in reply["error"]["message"]
            # Far below limits.requestTimeout: one round trip to the child.
            assert elapsed < 1.0 < REQUEST_TIMEOUT, elapsed
            r = c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(8, "echo", {"text": "still here"}))
            [reply] = wire.messages_of(r)
            assert reply["result"]["content"][0]["text"] == "still here"
            assert wire.delete_session(c, sid) == 200
        assert protocol_errors(gw) == before + 1

    def test_a_server_request_that_cannot_be_read_is_not_taken_for_the_answer(self, gw):
        """A line with a top-level ``method`` is the server's own request: dropped (counted), and
        the client's request with the same id still gets the server's real answer."""
        before = protocol_errors(gw)
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            r = c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(5, "server_request"))
            [reply] = wire.messages_of(r)
            assert reply["result"]["content"][0]["text"] == "answered"
            wire.delete_session(c, sid)
        assert protocol_errors(gw) == before + 1

    def test_a_flood_of_unreadable_replies_while_a_client_calls(self, gw):
        """200 broken replies (a mix of every kind) in one session: each answered at once, the
        gateway's RSS bounded (8 MiB: no line is kept), and a legitimate SDK client unaffected."""
        before = proc_stats(gw.proc.pid)
        kinds = [(t, a) for t, a in CASES if a.get("depth", 0) <= 2000]
        with LegitClient(gw.url + "/mcp") as legit, wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            started = time.monotonic()
            for i in range(200):
                tool, arguments = kinds[i % len(kinds)]
                r = c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(100 + i, tool, arguments))
                [reply] = wire.messages_of(r)
                assert reply["error"]["code"] == -32603
            elapsed = time.monotonic() - started
            wire.delete_session(c, sid)
        legit.assert_healthy()
        assert elapsed < 30, elapsed
        grew = proc_stats(gw.proc.pid).grew(before)
        assert grew.rss < 8 * 1024 * 1024, grew


# -- in memory ----------------------------------------------------------------------------------


class ReplyIdTests(SynchronousTestCase):
    """reply_id: the id of a response line the parser rejected, found without parsing it."""

    def test_head(self) -> None:
        self.assertEqual(reply_id(b'{"jsonrpc":"2.0","id":12,"result":{"t":"\xff"}}', True), 12)
        self.assertEqual(reply_id(b' {"jsonrpc" : "2.0", "id" : "a\\"b", "error": {', False), 'a"b')

    def test_nested_id_is_not_the_reply_id(self) -> None:
        self.assertIsNone(reply_id(b'{"result":{"id":3,"x":"\xff"}', False))
        self.assertIsNone(reply_id(b'{"result":{"x":{"id":3}', False))  # cut short: the tail is not trusted

    def test_id_last(self) -> None:
        line = b'{"result":{"v":' + b"[" * 5000 + b"]" * 5000 + b'},"jsonrpc":"2.0","id":41}'  # longer than HEAD_SCAN
        self.assertEqual(reply_id(line, True), 41)
        self.assertIsNone(reply_id(line, False))

    def test_requests_and_notifications_are_not_replies(self) -> None:
        self.assertIsNone(reply_id(b'{"jsonrpc":"2.0","id":1,"method":"sampling/createMessage","params":"\xff"}', True))
        self.assertIsNone(reply_id(b'{"jsonrpc":"2.0","method":"notifications/message","params":"\xff"}', True))

    def test_not_an_object_or_no_usable_id(self) -> None:
        for line in (b'["\xff"]', b'"\xff"', b'{"jsonrpc":"2.0","id":null,"error":{}', b'{"id":true,"result":1',
                     b'{"id":{"a":1},"result":1', b'{"result":"' + b"x" * 10_000):
            self.assertIsNone(reply_id(line, True), line[:40])

    def test_cost_is_bounded_by_the_head(self) -> None:
        """A 16 MiB line of brackets: only HEAD_SCAN bytes are walked."""
        line = b'{"result":' + b"[" * (16 << 20)
        started = time.perf_counter()
        self.assertIsNone(reply_id(line, True))
        self.assertLess(time.perf_counter() - started, 0.05)


class RecordingDelegate:
    routes_on_view = True

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Any]] = []

    def upstreamMessage(self, raw: bytes, msg: Any) -> None:
        self.messages.append((raw, msg))

    def upstreamProtocolError(self, reason: str) -> None:
        raise AssertionError(reason)

    def upstreamEnded(self, reason: str) -> None:
        pass


class CountingMetrics(type(NULL_BOUND)):  # type: ignore[misc]
    """The metrics a session binds, counting only errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, kind: str) -> None:
        self.errors.append(kind)


class UnreadableLineTests(SynchronousTestCase):
    """StdioUpstream on the fake process reactor: what the delegate gets for a broken line."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.reactor = FakeProcessReactor()
        self.delegate = RecordingDelegate()
        server = StdioServer(name="h", command="h", executable="/bin/true")
        self.upstream = StdioUpstream(server, self.delegate, self.reactor)
        self.upstream.metrics = self.metrics = CountingMetrics()  # type: ignore[assignment]
        self.upstream.spawn()
        self.addCleanup(self.reactor.spawned[-1].exit)

    def test_error_in_place_of_the_reply(self) -> None:
        for i, line in enumerate((b'{"jsonrpc":"2.0","id":1,"result":"\xff"}',
                                  b'{"jsonrpc":"2.0","id":2,"result":' + b"[" * 1100 + b"]" * 1100 + b"}",
                                  b'{"jsonrpc":"2.0","id":3,"result":"' + b"a" * 100_000)):  # large: route_view
            self.upstream.outReceived(line + b"\n")
            raw, msg = self.delegate.messages[i]
            self.assertIsInstance(msg, UnreadableReply)
            self.assertEqual((msg["id"], msg["error"]["code"]), (i + 1, -32603))
            self.assertEqual(wire_loads(raw), dict(msg))
        self.assertEqual(self.metrics.errors, ["upstream_protocol"] * 3)
        self.assertEqual(len(self.logs.formats("the request gets an error")), 3)

    def test_unrecognisable_line_is_dropped_and_counted(self) -> None:
        self.upstream.outReceived(b'garbage \xff\n{"jsonrpc":"2.0","method":"x","params":"\xff"}\n[1,2]\n')
        self.assertEqual(self.delegate.messages, [])
        self.assertEqual(self.metrics.errors, ["upstream_protocol"] * 3)


def wire_loads(raw: bytes) -> Any:
    import json

    return json.loads(raw)


class SessionCountsItOnceTests(SynchronousTestCase):
    """The Session answers the request with the gateway's error and counts upstream_protocol only
    (not also upstream_error, which is the server's own JSON-RPC error)."""

    def test_counted_once(self) -> None:
        from mcpgw.session import Session

        reactor = FakeProcessReactor()
        metrics = CountingMetrics()
        server = StdioServer(name="h", command="h", executable="/bin/true")
        session = Session("s1", server, "streamable", reactor, lambda s: None, metrics=metrics)  # type: ignore[arg-type]
        session.start()
        answers: list[tuple[Any, bytes]] = []

        class Route:
            def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
                answers.append((id, raw))

            def deliver(self, raw: bytes) -> None:
                pass

            def forget(self, id: Any) -> None:
                pass

        session.request({"jsonrpc": "2.0", "id": 4, "method": "tools/call"}, b"{}", Route())
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":4,"result":"\xc3\x28"}\n')
        [(id, raw)] = answers
        self.assertEqual((id, wire_loads(raw)["error"]["code"]), (4, -32603))
        self.assertEqual(metrics.errors, ["upstream_protocol"])
        reactor.spawned[-1].exit()
