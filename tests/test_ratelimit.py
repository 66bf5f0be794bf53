"""Issue 6, rate limiting: the in-memory limiter on a task.Clock, client addresses behind trusted
proxies, the Guard and the WebSocket transport with a limiter that answers later (the shape of a
Redis one), and real gateways: 429 + Retry-After + RateLimit-* on every transport, per identity,
per address, per WebSocket message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mcpgw.auth import Authenticator
from mcpgw.config import (
    AuthConfig,
    ConfigError,
    GatewayConfig,
    StaticToken,
    StdioServer,
    duration_seconds,
    parse,
)
from mcpgw.ratelimit import (
    ClientAddresses,
    Decision,
    IRateLimiter,
    MemoryRateLimiter,
    ip_key,
)
from mcpgw.transports.common import GatewayContext
from mcpgw.web import Guard
from tests import wire
from tests.fake_process import LogCapture
from tests.test_websocket_unit import TEXT, WebSocketTestCase, client_frame
from tests.wire import POST_HEADERS

# -- unit: the limiter ------------------------------------------------------------------------


class MemoryRateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = MemoryRateLimiter(3, 60.0, self.clock, max_keys=100)

    def hit(self, key: str = "a") -> Decision:
        return self.successResultOf(self.limiter.hit(key))

    def test_provides_the_interface(self) -> None:
        verifyObject(IRateLimiter, self.limiter)

    def test_limit_then_refuse(self) -> None:
        """``max`` hits per window; then refused with the time to the window's end."""
        self.assertEqual([self.hit().remaining for _ in range(3)], [2, 1, 0])
        self.clock.advance(20)
        refused = self.hit()
        self.assertEqual((refused.allowed, refused.remaining, refused.reset_after, refused.retry_after), (False, 0, 40.0, 40))

    def test_window_resets(self) -> None:
        for _ in range(4):
            self.hit()
        self.clock.advance(60)
        self.assertTrue(self.hit().allowed)
        self.assertEqual(self.hit().remaining, 1)

    def test_keys_are_separate(self) -> None:
        for _ in range(4):
            self.hit("a")
        self.assertTrue(self.hit("b").allowed)

    def test_expired_windows_are_dropped(self) -> None:
        for i in range(50):
            self.hit(f"k{i}")
        self.clock.advance(61)
        self.hit("new")
        self.assertEqual(len(self.limiter), 1)

    def test_memory_is_bounded(self) -> None:
        """Beyond max_keys live windows the oldest goes (its client starts afresh)."""
        logged = LogCapture(self)
        for i in range(1000):
            self.hit(f"k{i}")
            self.assertLessEqual(len(self.limiter), 100)
        self.assertEqual(self.limiter.evicted, 900)
        self.assertEqual(len(logged.matching(n=1, max=100)), 1)  # logged once, not per eviction
        self.assertTrue(self.hit("k999").allowed)

    def test_refused_hits_do_not_grow_the_count(self) -> None:
        for _ in range(10_000):
            self.hit()
        self.assertLessEqual(self.limiter._windows["a"].count, 4)

    def test_headers(self) -> None:
        self.clock.advance(0.5)
        headers = dict(self.hit().headers())
        self.assertEqual(headers, {b"ratelimit-policy": b"3;w=60", b"ratelimit-limit": b"3",
                                   b"ratelimit-remaining": b"2", b"ratelimit-reset": b"60"})
        for _ in range(3):
            d = self.hit()
        headers = dict(d.headers())
        self.assertEqual((headers[b"retry-after"], headers[b"ratelimit-remaining"]), (b"60", b"0"))


class WindowTests(SynchronousTestCase):
    def test_durations(self) -> None:
        self.assertEqual([duration_seconds(w) for w in ("15m", "1h", "30s", "250ms")], [900, 3600, 30, 0.25])

    def test_config(self) -> None:
        config = parse({"mcpServers": {"s": {"command": "/bin/sh"}}, "rateLimit": {"enabled": True, "window": "30s", "maxKeys": 10}}, {})
        self.assertEqual((config.rateLimit.window_seconds, config.rateLimit.maxKeys), (30.0, 10))
        for bad, key in [({"window": "0s"}, "rateLimit.window"), ({"window": "1d"}, "rateLimit.window"),
                         ({"maxKeys": 0}, "rateLimit.maxKeys"), ({"maxKeys": "1"}, "rateLimit.maxKeys")]:
            with self.assertRaises(ConfigError) as ctx:
                parse({"mcpServers": {"s": {"command": "/bin/sh"}}, "rateLimit": bad}, {})
            self.assertEqual(ctx.exception.key, key)

    def test_trusted_proxies_config(self) -> None:
        config = parse({"mcpServers": {"s": {"command": "/bin/sh"}}, "trustedProxies": ["10.0.0.0/8", "::1"]}, {})
        self.assertEqual(config.trustedProxies, ("10.0.0.0/8", "::1"))
        with self.assertRaises(ConfigError) as ctx:
            parse({"mcpServers": {"s": {"command": "/bin/sh"}}, "trustedProxies": ["10.0.0.0/8", "nginx"]}, {})
        self.assertEqual(ctx.exception.key, "trustedProxies[1]")


class ClientAddressTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addresses = ClientAddresses(["10.0.0.0/8", "127.0.0.1"])

    def client(self, peer: str, xff: list[bytes] | None = None, real: bytes | None = None) -> str:
        return self.addresses.client(peer, xff, real)

    def test_untrusted_peer_headers_are_ignored(self) -> None:
        self.assertEqual(self.client("203.0.113.9", [b"1.2.3.4"], b"5.6.7.8"), "203.0.113.9")
        self.assertEqual(ClientAddresses([]).client("127.0.0.1", [b"1.2.3.4"], None), "127.0.0.1")

    def test_trusted_proxy_forwarded_for(self) -> None:
        """The right-most address that is not a trusted proxy (the left part can be forged)."""
        self.assertEqual(self.client("10.1.1.1", [b"6.6.6.6, 198.51.100.7"]), "198.51.100.7")
        self.assertEqual(self.client("10.1.1.1", [b"6.6.6.6, 198.51.100.7, 10.2.2.2"]), "198.51.100.7")
        self.assertEqual(self.client("127.0.0.1", [b"6.6.6.6", b"198.51.100.7"]), "198.51.100.7")

    def test_only_proxies_or_garbage(self) -> None:
        self.assertEqual(self.client("10.1.1.1", [b"10.3.3.3"]), "10.3.3.3")
        self.assertEqual(self.client("10.1.1.1", [b"not-an-ip, 10.3.3.3"]), "10.3.3.3")

    def test_real_ip(self) -> None:
        self.assertEqual(self.client("10.1.1.1", None, b"198.51.100.8"), "198.51.100.8")
        self.assertEqual(self.client("10.1.1.1", None, b"junk"), "10.1.1.1")

    def test_keys(self) -> None:
        """IPv6 clients by /64; IPv4-mapped addresses as IPv4."""
        self.assertEqual(ip_key("2001:db8::1"), ip_key("2001:db8::ffff"))
        self.assertEqual(ip_key("2001:db8::1"), "ip:2001:db8::/64")
        self.assertEqual(ip_key("::ffff:198.51.100.7"), "ip:198.51.100.7")


# -- unit: the Guard with a limiter that answers later ----------------------------------------


@implementer(IRateLimiter)
class LaterLimiter:
    """Decisions the test hands out when it likes (a Redis round trip)."""

    limit = 1
    window = 60.0

    def __init__(self) -> None:
        self.pending: list[tuple[str, defer.Deferred[Decision]]] = []

    def hit(self, key: str) -> defer.Deferred[Decision]:
        d: defer.Deferred[Decision] = defer.Deferred()
        self.pending.append((key, d))
        return d

    def decide(self, allowed: bool) -> None:
        _, d = self.pending.pop(0)
        d.callback(Decision(allowed, 1, 0, 30.0, 60.0))


class Inner(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"inner"


class GuardTests(SynchronousTestCase):
    def guard(self, limiter: Any, auth: AuthConfig | None = None) -> Guard:
        config = GatewayConfig(servers={"fx": StdioServer(name="fx", command="fx")}, host="0.0.0.0")
        ctx = GatewayContext(config=config, sessions=None, heartbeat=None, reactor=Clock(),  # type: ignore[arg-type]
                             auth=Authenticator(auth or AuthConfig(), Clock()), limiter=limiter)
        return Guard(Inner(), ctx)

    def request(self, **headers: str) -> DummyRequest:
        request = DummyRequest([b"mcp"])
        request.client = IPv4Address("TCP", "198.51.100.7", 40000)
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        return request

    def test_decision_later_allowed(self) -> None:
        limiter = LaterLimiter()
        guard = self.guard(limiter)
        request = self.request()
        self.assertIs(guard.render(request), NOT_DONE_YET)
        self.assertEqual(limiter.pending[0][0], "ip:198.51.100.7")
        limiter.decide(True)
        self.assertEqual((request.written, request.finished), ([b"inner"], 1))

    def test_decision_later_refused(self) -> None:
        limiter = LaterLimiter()
        guard = self.guard(limiter)
        request = self.request()
        guard.render(request)
        limiter.decide(False)
        self.assertEqual(request.responseCode, 429)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"30"])
        self.assertIn(b"Too Many Requests", b"".join(request.written))

    def test_limiter_failure_lets_the_request_through(self) -> None:
        limiter = LaterLimiter()
        guard = self.guard(limiter)
        request = self.request()
        guard.render(request)
        limiter.pending.pop()[1].errback(RuntimeError("redis is down"))
        self.assertEqual(request.written, [b"inner"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_counted_per_identity_and_before_the_401(self) -> None:
        """An identity has its own bucket; a bad token is counted against the address."""
        limiter = MemoryRateLimiter(1, 60, Clock())
        guard = self.guard(limiter, AuthConfig(enabled=True, bearerTokens=(StaticToken("alice", "a" * 20),)))
        self.assertEqual(guard.render(self.request(authorization="Bearer " + "a" * 20)), b"inner")
        r = self.request(authorization="Bearer wrong-wrong-wrong")
        guard.render(r)
        self.assertEqual(r.responseCode, 401)
        r = self.request(authorization="Bearer wrong-wrong-wrong")
        guard.render(r)
        self.assertEqual(r.responseCode, 429)
        self.assertEqual(sorted(limiter._windows), ["id:token:alice", "ip:198.51.100.7"])


class WebSocketMessageTests(WebSocketTestCase):
    """Each message is a hit; with a limiter that answers later, messages keep their order."""

    def test_messages_wait_for_their_decision_in_order(self) -> None:
        limiter = LaterLimiter()
        self.ctx.limiter = limiter
        proto, transport, child = self.open()
        for i in (1, 2, 3):
            proto.dataReceived(client_frame(TEXT, json.dumps({"jsonrpc": "2.0", "id": i, "method": "ping"}).encode()))
        self.assertEqual(child.written, [])
        self.assertEqual(len(limiter.pending), 1)  # the next hit waits for the first decision
        limiter.decide(True)
        limiter.decide(False)
        limiter.decide(True)
        self.assertEqual([json.loads(line)["id"] for line in b"".join(child.written).splitlines()], [1, 3])
        [refused] = self.texts(transport)
        self.assertEqual(refused["id"], 2)
        self.assertEqual(refused["error"]["data"], {"retryAfter": 30})

    def test_memory_limiter_counts_every_message(self) -> None:
        self.ctx.limiter = MemoryRateLimiter(2, 60, self.reactor)
        proto, transport, child = self.open()
        for i in (1, 2, 3):
            proto.dataReceived(client_frame(TEXT, json.dumps({"jsonrpc": "2.0", "id": i, "method": "ping"}).encode()))
        self.assertEqual(len(child.written), 2)
        [refused] = self.texts(transport)
        self.assertEqual((refused["id"], refused["error"]["code"]), (3, -32000))
        self.assertIn("Too Many Requests", refused["error"]["message"])


# -- integration ------------------------------------------------------------------------------

TOKENS = {name: f"{name}-token-0123456789abcdef" for name in ("alice", "bob", "carol", "dave", "erin", "frank")}
MAX = 4


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[name]}"}


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway(wire.config(
        auth={"bearerTokens": [{"name": n, "token": t} for n, t in TOKENS.items()]},
        rateLimit={"enabled": True, "max": MAX, "window": "1h"},
    ))


def assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, (r.status_code, r.text)
    assert 3500 <= int(r.headers["retry-after"]) <= 3600
    assert r.headers["ratelimit-limit"] == str(MAX) and r.headers["ratelimit-remaining"] == "0"
    assert r.headers["ratelimit-policy"] == f"{MAX};w=3600"
    assert r.json()["error"]["message"].startswith("Too Many Requests")


@pytest.mark.integration
class TestEveryTransportIsCounted:
    def test_streamable_post(self, gw):
        """Every request counts (initialize, notifications, DELETE); headers on each answer."""
        with wire.http_client(gw.url) as c:
            remaining = []
            for _ in range(MAX):
                r = c.post("/mcp", headers={**POST_HEADERS, **auth("alice")}, json=wire.request(1, "ping"))
                remaining.append(r.headers["ratelimit-remaining"])
            assert remaining == [str(MAX - i) for i in range(1, MAX + 1)]
            assert_429(c.post("/mcp", headers={**POST_HEADERS, **auth("alice")}, json=wire.initialize()))
            assert_429(c.get("/servers/fx/mcp", headers={"accept": "text/event-stream", **auth("alice")}))
            # another identity is not affected
            assert c.post("/mcp", headers={**POST_HEADERS, **auth("bob")}, json=wire.initialize()).status_code == 200

    def test_legacy(self, gw):
        with wire.http_client(gw.url) as c:
            with c.stream("GET", "/sse", headers={"accept": "text/event-stream", **auth("carol")}) as r:
                assert r.status_code == 200 and r.headers["ratelimit-remaining"] == str(MAX - 1)
                events = wire.sse_events(r)
                endpoint = next(events).data
                for _ in range(MAX - 1):
                    assert c.post(endpoint, json=wire.request(1, "ping"), headers=auth("carol")).status_code == 202
                assert_429(c.post(endpoint, json=wire.request(1, "ping"), headers=auth("carol")))
            assert_429(c.get("/sse", headers={"accept": "text/event-stream", **auth("carol")}))

    def test_websocket_upgrade_and_messages(self, gw):
        async def go() -> None:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            async with connect(url, subprotocols=["mcp"], additional_headers=auth("dave")) as ws:  # hit 1
                for i in range(MAX - 1):  # hits 2..MAX
                    await ws.send(json.dumps(wire.request(i, "ping")))
                    assert "result" in json.loads(await ws.recv())
                await ws.send(json.dumps(wire.request("over", "ping")))
                refused = json.loads(await ws.recv())
                assert refused["id"] == "over" and refused["error"]["message"].startswith("Too Many Requests")
                assert 3500 <= refused["error"]["data"]["retryAfter"] <= 3600
                await ws.send(json.dumps(wire.request("still-open", "ping")))  # the socket stays open
                assert json.loads(await ws.recv())["id"] == "still-open"
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, subprotocols=["mcp"], additional_headers=auth("dave")):
                    pass
            assert info.value.response.status_code == 429
            assert info.value.response.headers["retry-after"]
        asyncio.run(go())

    def test_anonymous_by_address_before_401(self, gw):
        """Guessing tokens: 401s count against the client's address, then 429."""
        with wire.http_client(gw.url) as c:
            statuses = [c.post("/mcp", headers={**POST_HEADERS, "authorization": f"Bearer guess-{i:020d}"},
                               json=wire.initialize()).status_code for i in range(MAX + 2)]
        assert statuses == [401] * MAX + [429, 429]

    def test_health_is_not_limited(self, gw):
        for _ in range(MAX * 3):
            r = httpx.get(gw.url + "/health")
            assert r.status_code == 200 and "ratelimit-limit" not in r.headers


@pytest.mark.integration
@pytest.mark.parametrize("trusted", [True, False])
def test_forwarded_for_only_from_trusted_proxies(make_gateway, trusted):
    """Behind a trusted proxy each X-Forwarded-For client has its own bucket; otherwise the
    header is ignored (any client could write it) and the peer address counts."""
    gw = make_gateway(wire.config(rateLimit={"enabled": True, "max": 2, "window": "1h"},
                                  trustedProxies=["127.0.0.1"] if trusted else []))
    with wire.http_client(gw.url) as c:
        def status(client_ip: str) -> int:
            return c.post("/mcp", headers={**POST_HEADERS, "x-forwarded-for": client_ip}, json=wire.request(1, "ping")).status_code
        first = [status("198.51.100.1") for _ in range(3)]
        other = status("198.51.100.2")
        real_ip = c.post("/mcp", headers={**POST_HEADERS, "x-real-ip": "198.51.100.3"}, json=wire.request(1, "ping")).status_code
    assert first == [400, 400, 429]  # 400: a ping without a session; the limiter counts it anyway
    assert (other, real_ip) == ((400, 400) if trusted else (429, 429))
