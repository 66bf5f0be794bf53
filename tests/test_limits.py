"""Issue 6, limits: header size, messages per batch POST, pending requests per session, request
timeout (JSON-RPC error to the client, notifications/cancelled to the child), global and
per-server session caps (503 + Retry-After), and the absolute session lifetime.

Unit tests on a FakeProcessReactor (a task.Clock); integration tests on real gateways.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mcpgw import jsonrpc
from mcpgw.config import (
    ConfigError,
    GatewayConfig,
    LimitsConfig,
    SessionConfig,
    StdioServer,
    parse,
)
from mcpgw.deadlines import DeadlineQueue
from mcpgw.session import Session, SessionManager, SessionRefused
from mcpgw.transports.common import HttpError, parse_messages
from mcpgw.upstream import stdio
from tests import wire
from tests.fake_process import FakeProcessReactor
from tests.gateway_process import fixture_server, wait_until
from tests.wire import POST_HEADERS, raw_http, raw_status, session_headers

SERVER = StdioServer(name="fx", command="fx", executable="/opt/bin/fx")
OTHER = StdioServer(name="fy", command="fy", executable="/opt/bin/fy", maxSessions=1)


class Route:
    """Records what a session sends back for the requests it carried."""

    def __init__(self) -> None:
        self.answers: list[tuple[Any, dict[str, Any]]] = []
        self.forgotten: list[Any] = []

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.answers.append((id, jsonrpc.loads(raw)))

    def deliver(self, raw: bytes) -> None:
        pass

    def forget(self, id: Any) -> None:
        self.forgotten.append(id)


def call(id: Any) -> tuple[dict[str, Any], bytes]:
    msg = {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "sleep", "arguments": {"seconds": 60}}}
    return msg, jsonrpc.dumps(msg)


class ManagerCase(SynchronousTestCase):
    limits = LimitsConfig(requestTimeout=5.0, maxPendingRequests=2, maxSessions=3)
    session_config = SessionConfig(secret="k", idleSeconds=60.0, lifetimeSeconds=5.0)

    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()
        config = GatewayConfig(servers={"fx": SERVER, "fy": OTHER}, session=self.session_config, limits=self.limits)
        self.manager = SessionManager(config, self.reactor)

    def child_of(self, session: Session) -> Any:
        [child] = [t for t in self.reactor.spawned if t.proto is session.upstream]
        return child

    def sent(self, session: Session) -> list[dict[str, Any]]:
        return [jsonrpc.loads(w.rstrip(b"\n")) for w in self.child_of(session).written]


class RequestTimeoutTests(ManagerCase):
    def test_timeout_answers_the_client_and_cancels_in_the_child(self) -> None:
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        session.request(*call(7), route)
        self.reactor.advance(4.9)
        self.assertEqual(route.answers, [])
        self.reactor.advance(0.2)
        [(id, reply)] = route.answers
        self.assertEqual((id, reply["error"]["code"]), (7, jsonrpc.REQUEST_TIMEOUT))
        self.assertIn("limits.requestTimeout", reply["error"]["message"])
        cancel = self.sent(session)[-1]
        self.assertEqual(cancel["method"], "notifications/cancelled")
        self.assertEqual(cancel["params"]["requestId"], 7)
        self.assertFalse(session.has_pending())

    def test_a_late_answer_is_dropped(self) -> None:
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        session.request(*call(7), route)
        self.reactor.advance(6)
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":7,"result":{}}\n')
        self.assertEqual(len(route.answers), 1)

    def test_an_answer_in_time_is_not_timed_out(self) -> None:
        """The timer finds nothing pending at the deadline, and none is left running."""
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        session.request(*call(7), route)
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":7,"result":{}}\n')
        self.reactor.advance(10)
        self.assertEqual([r["result"] for _, r in route.answers], [{}])
        self.assertNotIn("notifications/cancelled", [m.get("method") for m in self.sent(session)])
        self.assertEqual(self.expiry_timers(), [])

    def test_client_cancellation_and_session_end_stop_timers(self) -> None:
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        session.request(*call(1), route)
        session.request(*call(2), route)
        session.notify({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
                       b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}')
        self.assertEqual(len(self.expiry_timers()), 1)  # one timer for the session, not one per request
        session.close()
        self.assertEqual(self.expiry_timers(), [])

    def expiry_timers(self) -> list[Any]:
        """The clock's calls that expire requests (a DeadlineQueue's timer)."""
        return [d for d in self.reactor.getDelayedCalls() if isinstance(getattr(d.func, "__self__", None), DeadlineQueue)]

    def test_one_timer_follows_the_oldest_pending_request(self) -> None:
        """Requests at t=0, 2 and 3 s with a 5 s timeout; the first answered at 1 s: the timer it
        started finds it gone at 5 s and moves to the next deadline; each times out at its own 5 s."""
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        session.request(*call(1), route)
        self.reactor.advance(1)
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":1,"result":{}}\n')
        self.reactor.advance(1)
        session.request(*call(2), route)
        self.reactor.advance(1)
        session.request(*call(3), route)
        self.assertEqual([id for id, _ in route.answers], [1])
        self.reactor.advance(3.9)  # t=6.9
        self.assertEqual([id for id, _ in route.answers], [1])
        self.reactor.advance(0.2)  # t=7.1: request 2 (t=2) is over
        self.assertEqual([id for id, _ in route.answers], [1, 2])
        self.reactor.advance(0.8)  # t=7.9
        self.assertEqual([id for id, _ in route.answers], [1, 2])
        self.reactor.advance(0.2)  # t=8.1: request 3 (t=3) is over
        self.assertEqual([(id, r.get("error", {}).get("code")) for id, r in route.answers],
                         [(1, None), (2, jsonrpc.REQUEST_TIMEOUT), (3, jsonrpc.REQUEST_TIMEOUT)])
        self.assertEqual(self.expiry_timers(), [])


class PendingLimitTests(ManagerCase):
    def test_one_over_the_limit_gets_an_error(self) -> None:
        session = self.manager.create(SERVER, "streamable")
        route = Route()
        for id in (1, 2, 3):
            session.request(*call(id), route)
        [(id, reply)] = route.answers
        self.assertEqual(id, 3)
        self.assertIn("limits.maxPendingRequests", reply["error"]["message"])
        self.assertEqual([m["id"] for m in self.sent(session)], [1, 2])
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":1,"result":{}}\n')
        session.request(*call(4), route)
        self.assertEqual([m["id"] for m in self.sent(session)], [1, 2, 4])


class SessionCapTests(ManagerCase):
    def test_global_cap(self) -> None:
        sessions = [self.manager.create(SERVER, "streamable") for _ in range(3)]
        e = self.assertRaises(SessionRefused, self.manager.create, SERVER, "sse")
        self.assertIn("limits.maxSessions=3", e.reason)
        self.assertEqual((e.retry_after, len(self.reactor.spawned)), (5, 3))
        sessions[0].close()
        self.assertIsNone(self.manager.room_for(SERVER))
        self.manager.create(SERVER, "ws")

    def test_per_server_cap(self) -> None:
        self.manager.create(OTHER, "streamable")
        e = self.assertRaises(SessionRefused, self.manager.create, OTHER, "streamable")
        self.assertIn("server fy", e.reason)
        self.manager.create(SERVER, "streamable")  # the other server still has room


class LifetimeTests(ManagerCase):
    def test_busy_sessions_end_at_max_lifetime(self) -> None:
        """Idle expiry spares a session with pending requests or a live stream; the lifetime cap does not."""
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        busy = self.manager.create(SERVER, "streamable")
        busy.request(*call(1), Route())
        stream = self.manager.create(SERVER, "ws")
        for _ in range(4):
            self.reactor.advance(1)
            for session in (busy, stream):  # in use: idle expiry does not apply
                session.notify({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
                               b'{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}')
        self.assertFalse(busy.ended or stream.ended)
        self.reactor.advance(1)
        self.assertTrue(busy.ended and stream.ended)
        self.assertEqual(busy.end_reason, "older than session.maxLifetime")
        self.assertEqual(self.manager.sessions, {})


class ParseLimitTests(SynchronousTestCase):
    def test_batch_limit(self) -> None:
        body = json.dumps([{"jsonrpc": "2.0", "method": "notifications/initialized"}] * 4).encode()
        self.assertEqual(len(parse_messages(body, max_batch=4)[0]), 4)
        e = self.assertRaises(HttpError, parse_messages, body, True, 3)
        self.assertEqual((e.status, e.code), (413, jsonrpc.INVALID_REQUEST))
        self.assertIn("limits.maxBatchMessages", e.message)

    def test_config(self) -> None:
        base = {"mcpServers": {"s": {"command": "/bin/sh"}}}
        c = parse(base, {})
        self.assertEqual(c.limits, LimitsConfig())
        self.assertEqual((c.limits.maxHeaderBytes, c.limits.maxBatchMessages, c.limits.maxPendingRequests,
                          c.limits.requestTimeout, c.limits.maxSessions, c.session.lifetimeSeconds),
                         (16384, 100, 128, 300.0, None, 86_400.0))
        c = parse({**base, "limits": {"requestTimeout": None, "maxSessions": 10}, "session": {"maxLifetime": None}}, {})
        self.assertEqual((c.limits.requestTimeout, c.limits.maxSessions, c.session.lifetimeSeconds), (None, 10, None))
        c = parse({"mcpServers": {"s": {"command": "/bin/sh", "maxSessions": 2}}}, {})
        self.assertEqual(c.servers["s"].maxSessions, 2)
        for raw, key in [
            ({**base, "limits": {"maxHeader": 1}}, "limits.maxHeader"),
            ({**base, "limits": {"maxHeaderBytes": 100}}, "limits.maxHeaderBytes"),
            ({**base, "limits": {"maxBatchMessages": 0}}, "limits.maxBatchMessages"),
            ({**base, "limits": {"maxPendingRequests": 1.5}}, "limits.maxPendingRequests"),
            ({**base, "limits": {"requestTimeout": "5s"}}, "limits.requestTimeout"),
            ({**base, "limits": {"maxSessions": True}}, "limits.maxSessions"),
            ({**base, "limits": []}, "limits"),
            ({**base, "session": {"maxLifetime": 0}}, "session.maxLifetime"),
            ({"mcpServers": {"s": {"command": "/bin/sh", "maxSessions": 0}}}, "mcpServers.s.maxSessions"),
        ]:
            with self.assertRaises(ConfigError) as ctx:
                parse(raw, {})
            self.assertEqual(ctx.exception.key, key, raw)


# -- integration ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway(wire.config(limits={
        "maxHeaderBytes": 2048, "maxBatchMessages": 3, "maxPendingRequests": 2, "requestTimeout": 0.6,
    }))


def ws_url(gw: Any, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


@pytest.mark.integration
class TestHeaderSize:
    @pytest.mark.parametrize("path", ["/mcp", "/sse", "/ws", "/messages?sessionId=x", "/health"])
    def test_over_the_limit_is_refused_and_closed(self, gw, path):
        request = (f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\nupgrade: websocket\r\n"
                   f"x-padding: {'a' * 2100}\r\n\r\n").encode()
        answer = raw_http(gw.port, request)
        assert raw_status(answer) == 400, answer[:200]

    def test_under_the_limit(self, gw):
        r = httpx.get(gw.url + "/health", headers={"x-padding": "a" * 1500})
        assert r.status_code == 200


@pytest.mark.integration
class TestBatchSize:
    def test_streamable(self, gw):
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c, "2025-03-26")
            headers = session_headers(sid, "2025-03-26")
            r = c.post("/mcp", headers=headers, json=[wire.request(i, "ping") for i in range(4)])
            error = wire.assert_jsonrpc_error(r, 413, -32600)
            assert "limits.maxBatchMessages (3)" in error["message"]
            r = c.post("/mcp", headers=headers, json=[wire.notification("notifications/initialized")] * 3)
            assert r.status_code == 202
            wire.delete_session(c, sid)

    def test_legacy(self, gw):
        stream = wire.RawSseStream(gw.port)
        try:
            r = httpx.post(gw.url + stream.endpoint, json=[wire.notification("notifications/initialized")] * 4)
            wire.assert_jsonrpc_error(r, 413, -32600)
        finally:
            stream.close()


def sleep_call(id: Any, seconds: float) -> dict[str, Any]:
    return wire.tool_call(id, "sleep", {"seconds": seconds})


@pytest.mark.integration
class TestPendingRequests:
    def test_streamable_batch(self, gw):
        """Three calls in one batch with two allowed in flight: the third is refused at once."""
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c, "2025-03-26")
            r = c.post("/mcp", headers=session_headers(sid, "2025-03-26"), json=[sleep_call(i, 0.2) for i in (1, 2, 3)])
            replies = {m["id"]: m for m in wire.messages_of(r)}
            assert "limits.maxPendingRequests" in replies[3]["error"]["message"]
            assert replies[1]["result"]["content"][0]["text"] == "slept 0.2" and "result" in replies[2]
            wire.delete_session(c, sid)

    def test_websocket(self, gw):
        async def go() -> None:
            async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
                await ws.send(json.dumps(wire.initialize()))
                await ws.recv()
                for i in (1, 2, 3):
                    await ws.send(json.dumps(sleep_call(i, 0.2)))
                first = json.loads(await ws.recv())
                assert first["id"] == 3 and "limits.maxPendingRequests" in first["error"]["message"]
                rest = {json.loads(await ws.recv())["id"] for _ in range(2)}
                assert rest == {1, 2}
        asyncio.run(go())


@pytest.mark.integration
class TestRequestTimeout:
    def assert_cancelled_in_child(self, gw: Any, id: Any) -> None:
        assert wait_until(lambda: f"request {id!r} cancelled" in gw.log(), 5), gw.log()[-2000:]

    def test_streamable(self, gw):
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            r = c.post("/mcp", headers=session_headers(sid), json=sleep_call("slow-mcp", 30))
            [reply] = wire.messages_of(r)
            assert reply["id"] == "slow-mcp" and reply["error"]["code"] == -32001
            assert "timed out" in reply["error"]["message"]
            self.assert_cancelled_in_child(gw, "slow-mcp")
            # the session goes on
            r = c.post("/mcp", headers=session_headers(sid), json=wire.request(9, "ping"))
            assert wire.messages_of(r)[0]["result"] == {}
            wire.delete_session(c, sid)

    def test_legacy(self, gw):
        stream = wire.RawSseStream(gw.port)
        try:
            httpx.post(gw.url + stream.endpoint, json=sleep_call("slow-sse", 30))
            assert wait_until(lambda: b"slow-sse" in bytes(stream.received), 5)
            assert b"-32001" in bytes(stream.received)
            self.assert_cancelled_in_child(gw, "slow-sse")
        finally:
            stream.close()

    def test_websocket(self, gw):
        async def go() -> dict[str, Any]:
            async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
                await ws.send(json.dumps(wire.initialize()))
                await ws.recv()
                await ws.send(json.dumps(sleep_call("slow-ws", 30)))
                return json.loads(await asyncio.wait_for(ws.recv(), 5))
        reply = asyncio.run(go())
        assert reply["id"] == "slow-ws" and reply["error"]["code"] == -32001
        self.assert_cancelled_in_child(gw, "slow-ws")


@pytest.fixture(scope="class")
def capped(make_module_gateway):
    """One gateway for TestSessionCaps: fx takes one session, the gateway two (a module-level function: pytest 10
    refuses class-scoped fixtures defined as methods)."""
    return make_module_gateway({
        "mcpServers": {"fx": fixture_server(maxSessions=1, default=True), "fy": fixture_server()},
        "limits": {"maxSessions": 2},
    })


@pytest.mark.integration
class TestSessionCaps:
    def test_per_server_then_global(self, capped):
        with wire.http_client(capped.url) as c:
            sid = wire.open_session(c)
            for r in (c.post("/mcp", headers=POST_HEADERS, json=wire.initialize()),
                      c.get("/sse", headers={"accept": "text/event-stream"})):
                error = wire.assert_jsonrpc_error(r, 503)
                assert r.headers["retry-after"] == "5" and "server fx" in error["message"]

            async def ws_refused(path: str) -> int:
                with pytest.raises(InvalidStatus) as info:
                    async with connect(ws_url(capped, path), subprotocols=["mcp"]):
                        pass
                assert info.value.response.headers["retry-after"] == "5"
                return info.value.response.status_code
            assert asyncio.run(ws_refused("/ws")) == 503

            other = wire.open_session(c, path="/servers/fy/mcp")  # fy has room; now the gateway is full
            r = c.post("/servers/fy/mcp", headers=POST_HEADERS, json=wire.initialize())
            assert "limits.maxSessions=2" in wire.assert_jsonrpc_error(r, 503)["message"]
            assert asyncio.run(ws_refused("/servers/fy/ws")) == 503
            assert capped.child_pids().__len__() == 2

            assert wire.delete_session(c, sid) == 200
            assert wire.delete_session(c, other, path="/servers/fy/mcp") == 200
            sid = wire.open_session(c)  # room again
            assert wire.delete_session(c, sid) == 200
        assert wait_until(lambda: capped.child_pids() == [], 5)


@pytest.mark.integration
def test_max_lifetime_ends_a_busy_session(make_gateway):
    """A session used all the time still ends at session.maxLifetime; its child goes with it."""
    gw = make_gateway(wire.config(session={"maxAge": 60_000, "maxLifetime": 1_000}))
    with wire.http_client(gw.url) as c:
        sid = wire.open_session(c)
        [child] = gw.child_pids()

        def gone() -> bool:
            r = c.post("/mcp", headers=session_headers(sid), json=wire.request(1, "ping"))
            return r.status_code == 404
        assert wait_until(gone, 6, interval=0.2)
        assert wait_until(lambda: child not in gw.child_pids(), 5)
    assert "older than session.maxLifetime" in gw.log()
