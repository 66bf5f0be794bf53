"""mcpgw.channel in memory (issue 15, findings 1-3): head and body deadlines on a Clock, bodies
refused before they are read, the Guard on the head, pipelining bounded, obs-fold, connection caps
and shedding under descriptor pressure. No sockets: StringTransport and task.Clock."""

from __future__ import annotations

import fcntl
import select
import struct
import termios
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcpgw import _fast
from mcpgw.auth import Authenticator
from mcpgw.channel import ChannelLimits, Connections, GatewayChannel
from mcpgw.config import AuthConfig, GatewayConfig, StaticToken, StdioServer
from mcpgw.connections import DESCRIPTORS, ClosedAtOnce
from mcpgw.ratelimit import Decision
from mcpgw.request import HeadChecked
from mcpgw.transports.common import GatewayContext
from mcpgw.web import GatewaySite, Guard

TOKEN = "a-token-of-sixteen-chars"


class Reply(Resource):
    """Answers now with ``body`` (by default what it saw of the request body), or, ``later``, when
    the test says (a request still being answered); ``start`` writes the head first (an SSE-like
    response: the head now, the body later, chunked)."""

    isLeaf = True

    def __init__(self, body: bytes | None = None, later: bool = False, content_type: bytes | None = None,
                 start: bool = False) -> None:
        super().__init__()
        self.body, self.later, self.content_type, self.start = body, later, content_type, start
        self.seen: list[bytes] = []
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        if self.content_type is not None:
            request.setHeader(b"content-type", self.content_type)
        if self.later:
            if self.start:
                request.write(b"")
            self.waiting.append(request)
            return NOT_DONE_YET
        body = request.content.getvalue()
        self.seen.append(body)
        return self.body if self.body is not None else b"ok:%d" % len(body)


class LaterLimiter:
    limit = 1
    window = 60.0

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Decision]] = []

    def hit(self, key: str) -> defer.Deferred[Decision]:
        d: defer.Deferred[Decision] = defer.Deferred()
        self.pending.append(d)
        return d


def head(method: str = "GET", path: str = "/mcp", body: bytes | None = None, token: bool = True,
         extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:3000"]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return text.encode() + (body or b"")


def fast_paths(case: SynchronousTestCase, on: bool) -> None:
    """mcpgw._fast's switch for this test (``fastPaths`` in the config), restored after it."""
    case.addCleanup(setattr, _fast, "_enabled", _fast.enabled())
    _fast.configure(on)


class ChannelTestCase(SynchronousTestCase):
    """Run once with the fast paths as configured; tests/test_fast_web.py runs them again with them off."""

    limits = ChannelLimits(max_body_bytes=1000, header_timeout=10.0, body_timeout=30.0, max_pipelined=4)
    #: None: the fast paths as the environment says; False: off (the public paths).
    fast: bool | None = None

    def setUp(self) -> None:
        if self.fast is not None:
            fast_paths(self, self.fast)
        self.clock = Clock()
        self.echo = Reply()
        self.later = Reply(later=True)
        self.limiter: Any = None
        root = Resource()
        root.putChild(b"open", self.echo)
        root.putChild(b"later", self.later)
        self.root = root
        self.site = GatewaySite(root, reactor=self.clock)
        self.site.limits = self.limits
        self.site.connections = Connections(self.clock, nofile=100000)
        self.guard()

    def guard(self, limiter: Any = None) -> None:
        config = GatewayConfig(servers={"fx": StdioServer(name="fx", command="fx")}, host="0.0.0.0")
        auth = Authenticator(AuthConfig(enabled=True, bearerTokens=(StaticToken("alice", TOKEN),)), self.clock)
        ctx = GatewayContext(config=config, sessions=None, heartbeat=None, reactor=self.clock,  # type: ignore[arg-type]
                             auth=auth, limiter=limiter)
        guard = Guard(self.echo, ctx)
        self.root.putChild(b"mcp", HeadChecked(guard, guard))  # as mcpgw.web._guarded marks it

    def connect(self, host: str = "127.0.0.1", port: int = 40000) -> tuple[GatewayChannel, StringTransport]:
        address = IPv4Address("TCP", host, port)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport


class HeadDeadlineTests(ChannelTestCase):
    def test_whole_head_within_header_timeout_not_reset_by_bytes(self) -> None:
        """Slowloris: a byte a second keeps the idle timeout alive but not the head deadline."""
        channel, transport = self.connect()
        for byte in b"GET /open HTTP/1.1\r\nX-A: ":
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.3)
            if self.clock.seconds() >= 9.5:
                break
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10.0 - self.clock.seconds())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), transport.value())
        self.assertIn(b"limits.headerTimeout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_silent_connection_closed_without_an_answer(self) -> None:
        channel, transport = self.connect()
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_prompt_requests_never_see_the_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/open", b"{}"))
        self.assertIn(b"ok:2", transport.value())
        self.clock.advance(9)
        channel.dataReceived(head("POST", "/open", b"{}"))
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"ok:2"), 2)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds() <= 60, True)

    def test_keep_alive_head_deadline_starts_with_its_first_byte(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("GET", "/open"))
        self.clock.advance(20)  # idle between requests: the idle timeout's business, not the head's
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET /open HT")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_body_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/open", b"x" * 10)[:-5])
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertIn(b"408 Request Timeout", transport.value())
        self.assertIn(b"limits.bodyTimeout", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.echo.seen, [])


class BodyTests(ChannelTestCase):
    def test_declared_length_over_the_limit_is_413_before_the_body(self) -> None:
        """The 413 is written with the head alone; 100-continue is never sent."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
                             + b"\r\nExpect: 100-continue\r\nContent-Length: 209715200\r\n\r\n")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertIn(b"request body of 209715200 bytes exceeds the limit of 1000 bytes", out)
        self.assertIn(b"Connection: close", out)
        channel.dataReceived(b"x" * 5000)  # what the client still sends is dropped
        self.assertEqual(self.echo.seen, [])

    def test_chunked_body_cut_when_it_passes_the_limit(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertIn(b"request body exceeds the limit of 1000 bytes", out)
        self.assertEqual(self.echo.seen, [])
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.echo.seen, [])

    def test_chunked_body_under_the_limit(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3e8\r\n" + b"a" * 1000 + b"\r\n0\r\n\r\n")
        self.assertIn(b"ok:1000", transport.value())
        self.assertEqual(self.site.getContentFile(10**9).__class__.__name__, "BytesIO")

    def test_unauthenticated_body_never_accepted(self) -> None:
        """401 on the head, the same answer as before, then close: no body byte reaches the endpoint."""
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/mcp", None, token=False, extra="Content-Length: 900\r\nExpect: 100-continue\r\n"))
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertIn(b'WWW-Authenticate: Bearer realm="mcpgw"', out)
        self.assertNotIn(b"100 Continue", out)
        self.assertIn(b"Connection: close", out)
        channel.dataReceived(b"x" * 900)
        self.assertEqual(self.echo.seen, [])
        self.assertTrue(transport.disconnecting)

    def test_admin_without_its_token_is_401_before_the_body(self) -> None:
        """/admin has its own token, checked on the head as the Guard's are: a POST without it is
        answered 401 and none of its (here 1 GB) body is read."""
        from mcpgw.admin import AdminAuth, AdminResource

        self.root.putChild(b"admin", AdminResource(None, None, AdminAuth("an-admin-token-0123456789")))  # type: ignore[arg-type]
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/admin/servers", None, token=False, extra="Content-Length: 1000000000\r\n"))
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertIn(b'WWW-Authenticate: Bearer realm="mcpgw-admin"', out)
        self.assertIn(b"Connection: close", out)
        channel.dataReceived(b"x" * 100000)
        self.assertEqual(channel.requests, [])
        self.assertTrue(transport.disconnecting)

    def test_unauthenticated_get_keeps_the_connection(self) -> None:
        """No body to refuse: the 401 is what it was, on a connection that stays open."""
        channel, transport = self.connect()
        channel.dataReceived(head("GET", "/mcp", token=False))
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertNotIn(b"Connection: close", out)
        self.assertFalse(transport.disconnecting)

    def test_authenticated_body_read_after_100_continue(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/mcp", None, extra="Content-Length: 2\r\nExpect: 100-continue\r\n"))
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"{}")
        self.assertIn(b"ok:2", transport.value())

    def test_reading_paused_until_the_limiter_answers(self) -> None:
        limiter = LaterLimiter()
        self.guard(limiter)
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/mcp", None, extra="Content-Length: 500\r\n"))
        self.assertEqual(transport.producerState, "paused")
        limiter.pending[0].callback(Decision(True, 1, 0, 30.0, 60.0))
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"x" * 500)
        self.assertIn(b"ok:500", transport.value())

    def test_limiter_refusal_answers_without_the_body(self) -> None:
        limiter = LaterLimiter()
        self.guard(limiter)
        channel, transport = self.connect()
        channel.dataReceived(head("POST", "/mcp", None, extra="Content-Length: 500\r\n") + b"x" * 10)
        limiter.pending[0].callback(Decision(False, 1, 0, 30.0, 60.0))
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 429 "), out)
        self.assertIn(b"Retry-After: 30", out)
        self.assertEqual(self.echo.seen, [])

    def test_obs_fold_is_400(self) -> None:
        """RFC 9112 section 5.2: an Authorization header folded over two lines is refused, not joined."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + TOKEN.encode() + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertTrue(transport.disconnecting)


class PipeliningTests(ChannelTestCase):
    def test_at_most_max_pipelined_a_turn(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("GET", "/open") * 10)
        self.assertEqual(transport.value().count(b"ok:0"), 4)
        self.assertEqual(transport.producerState, "paused")
        self.clock.calls[0].func()  # the next turn of the reactor
        self.assertEqual(transport.value().count(b"ok:0"), 8)
        self.clock.advance(0)
        self.assertEqual(transport.value().count(b"ok:0"), 10)
        self.assertEqual(transport.producerState, "producing")

    def test_nothing_parsed_while_the_answers_do_not_go_out(self) -> None:
        """A client that never reads: once the write buffer is full (the transport pauses the
        channel) no more pipelined requests are parsed, and no more bytes are read."""
        channel, transport = self.connect()
        self.site.resource.putChild(b"later", self.later)
        channel.dataReceived(head("GET", "/later") + head("GET", "/open") * 50)
        self.assertEqual(len(self.later.waiting), 1)
        channel.pauseProducing()  # the transport: my write buffer is full
        request = self.later.waiting[0]
        request.write(b"x")
        request.finish()
        self.clock.advance(0)
        self.assertEqual(transport.value().count(b"ok:0"), 0)
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()  # drained
        self.assertEqual(transport.value().count(b"ok:0"), 0)
        self.clock.advance(0)
        self.assertEqual(transport.value().count(b"ok:0"), 50)

    def test_buffered_input_bounded_while_a_request_is_answered(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(head("GET", "/later"))
        channel.pauseProducing()  # write buffer full while the request is answered
        channel.resumeProducing()
        channel.pauseProducing()
        channel.dataReceived(head("GET", "/open") * 2000)
        self.assertEqual(transport.producerState, "paused")


class FakeChannel:
    """What Connections reads and writes of a GatewayChannel."""

    def __init__(self, ip: str = "127.0.0.1"):
        self._ip = ip
        self.was_shed = False
        self.kept_alive = False
        self.waiting_since: int | None = None

    def shed(self) -> None:
        self.was_shed = True


class FakeTransport:
    connected = 1


class ConnectionsTests(SynchronousTestCase):
    def test_per_ip_cap(self) -> None:
        c = Connections(Clock(), max_per_ip=2, nofile=1000)
        a, b, x = FakeChannel("10.0.0.1"), FakeChannel("10.0.0.1"), FakeChannel("10.0.0.1")
        self.assertIsNone(c.opened(a, "10.0.0.1", 5))
        self.assertIsNone(c.opened(b, "10.0.0.1", 6))
        self.assertIn("maxConnectionsPerIp", c.opened(x, "10.0.0.1", 7))
        self.assertIsNone(c.opened(FakeChannel("10.0.0.2"), "10.0.0.2", 7))
        c.closed(a)
        self.assertIsNone(c.opened(x, "10.0.0.1", 5))

    def test_max_connections_and_websockets_counted_until_closed(self) -> None:
        c = Connections(Clock(), max_connections=2, nofile=1000)
        a, b = FakeChannel(), FakeChannel()
        c.opened(a, "1.1.1.1", 5)
        c.opened(b, "1.1.1.2", 6)
        socket = FakeTransport()
        c.upgraded(a, socket)
        self.assertIn("maxConnections", c.opened(FakeChannel(), "1.1.1.3", 7))
        socket.connected = 0  # the WebSocket closed
        self.assertIsNone(c.opened(FakeChannel(), "1.1.1.3", 7))
        self.assertEqual(c.count, 2)

    def test_pressure_sheds_oldest_waiting_heads_first(self) -> None:
        """Past 80 % of RLIMIT_NOFILE: connections without a complete head, oldest first; one
        answering a request (head complete) is never shed."""
        in_use = {"n": 0}
        c = Connections(Clock(), nofile=100, descriptors=lambda fallback: in_use["n"])
        channels = [FakeChannel() for _ in range(10)]
        for i, ch in enumerate(channels):
            c.opened(ch, "127.0.0.1", 10 + i)
        c.head_complete(channels[0])  # busy: a live request
        c.waiting(channels[1])  # answered a request: now the youngest waiting
        in_use["n"] = 83
        self.assertIsNone(c.opened(FakeChannel(), "127.0.0.1", 82))
        shed = [i for i, ch in enumerate(channels) if ch.was_shed]
        self.assertEqual(shed, [2, 3, 4])
        self.assertFalse(channels[0].was_shed)

    def test_connections_shed_in_this_burst_count_as_gone(self) -> None:
        """Issue 15 (descriptor exhaustion): shed connections keep their descriptors until the
        reactor's next turn; the next accept of the same burst sheds only what is still over the
        mark, so a real client's kept-alive connection is not shed for descriptors on their way back."""
        in_use = {"n": 0}
        c = Connections(Clock(), nofile=100, descriptors=lambda fallback: in_use["n"])
        legit = FakeChannel()
        c.opened(legit, "127.0.0.1", 10)
        c.waiting(legit)
        slow = [FakeChannel() for _ in range(10)]
        for i, ch in enumerate(slow):
            c.opened(ch, "127.0.0.1", 11 + i)
        in_use["n"] = 85
        self.assertIsNone(c.opened(FakeChannel(), "127.0.0.1", 84))
        self.assertEqual(sum(ch.was_shed for ch in slow), 5)
        in_use["n"] = 90  # the five shed are still open, four more arrived
        self.assertIsNone(c.opened(FakeChannel(), "127.0.0.1", 89))
        self.assertEqual(sum(ch.was_shed for ch in slow), 10)
        self.assertFalse(legit.was_shed)

    def test_descriptors_exhausted_closes_the_rest_of_the_accept_burst_unanswered(self) -> None:
        """Issue 15 (descriptor exhaustion): a refusal for short descriptors holds its descriptor
        until the reactor's next turn, while Twisted's accept loop takes up to a hundred
        connections in one turn; the rest of that turn's connections get no channel (Twisted
        closes their socket at once), so the burst cannot reach EMFILE. The next turn serves again."""
        clock = Clock()
        in_use = {"n": 0}
        c = Connections(clock, nofile=100, descriptors=lambda fallback: in_use["n"])
        in_use["n"] = 99  # nothing waiting to shed, past the reserve
        self.assertEqual(c.opened(FakeChannel(), "127.0.0.1", 98), DESCRIPTORS)
        self.assertTrue(c.exhausted)
        site = GatewaySite(Resource())
        site.connections = c
        self.assertIsInstance(site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)), ClosedAtOnce)
        clock.advance(0)
        self.assertFalse(c.exhausted)
        self.assertIsInstance(site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)), GatewayChannel)

    def test_exhausted_burst_closes_a_waiting_request_with_an_answer_and_no_reset(self) -> None:
        """The connections closed in an exhausted accept burst waited in the listen queue, their
        request already in the kernel's buffer. Closed unread and without a shutdown (Twisted's
        close when buildProtocol returns None) each read a reset (RFC 1122 4.2.2.13; the 'reset'
        test_descriptor_exhaustion_sheds_slow_heads_first saw under load). Now each reads a 503
        and the end of stream, and its descriptor is closed in the same turn: a real listening
        port, accepted by hand (the reactor in memory)."""
        import os
        import socket

        from twisted.internet import tcp
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        site = GatewaySite(Resource(), reactor=reactor)
        site.connections.exhausted = True
        port = tcp.Port(0, site, interface="127.0.0.1", reactor=reactor)
        port.startListening()
        self.addCleanup(port.connectionLost, Failure(ConnectionDone()))
        peers = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) for _ in range(3)]
        for peer in peers:
            self.addCleanup(peer.close)
            peer.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4000\r\n\r\n" + b"x" * 4000)
        select.select([], [], [], 0.2)  # (loopback delivers at once; a margin for a busy machine)
        before = len(os.listdir("/proc/self/fd"))
        port.doRead()  # one accept burst: every waiting connection
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)  # none left open
        for peer in peers:
            data = b""
            while chunk := peer.recv(65536):  # a reset raises ConnectionResetError
                data += chunk
            self.assertTrue(data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data)
            self.assertIn(b"Retry-After: 1", data)
        self.assertEqual(site.connections.refused_total, 3)

    def test_kept_alive_connections_shed_after_those_that_never_completed_a_request(self) -> None:
        """A client's idle keep-alive connection (between two of its requests) is older than the
        slow heads opened since, but is shed only once none of those is left: a request that
        crosses the close would fail."""
        in_use = {"n": 0}
        c = Connections(Clock(), nofile=100, descriptors=lambda fallback: in_use["n"])
        legit = FakeChannel()
        c.opened(legit, "127.0.0.1", 10)
        c.waiting(legit)  # answered a request; idle now
        slow = [FakeChannel() for _ in range(5)]
        for i, ch in enumerate(slow):
            c.opened(ch, "127.0.0.1", 11 + i)
        in_use["n"] = 85
        self.assertIsNone(c.opened(FakeChannel(), "127.0.0.1", 84))
        self.assertEqual([ch.was_shed for ch in slow], [True] * 5)
        self.assertFalse(legit.was_shed)
        newcomer = next(ch for ch in c._open if ch not in slow and ch is not legit)
        in_use["n"] = 87  # more than are waiting: the newcomer, then the kept-alive connection too
        c.opened(FakeChannel(), "127.0.0.1", 86)
        self.assertTrue(newcomer.was_shed and legit.was_shed)

    def test_reserve_refuses_when_nothing_can_be_shed(self) -> None:
        c = Connections(Clock(), nofile=100, descriptors=lambda fallback: 96)
        busy = FakeChannel()
        c.opened(busy, "127.0.0.1", 10)
        c.head_complete(busy)
        refusal = c.opened(FakeChannel(), "127.0.0.1", 95)
        self.assertIn("descriptors", refusal)
        self.assertFalse(busy.was_shed)

    def test_refused_connection_gets_503(self) -> None:
        clock = Clock()
        site = GatewaySite(Resource(), reactor=clock)
        site.connections = Connections(clock, max_per_ip=1, nofile=1000)
        first = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1))
        first.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 1)))
        second = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 2))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 2))
        second.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"maxConnectionsPerIp 1", transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(site.connections.count, 1)


class LimitsConfigTests(SynchronousTestCase):
    def parse(self, **limits: Any) -> Any:
        from mcpgw.config import parse

        return parse({"mcpServers": {"s": {"command": "/bin/sh"}}, "limits": limits}, {}).limits

    def test_defaults(self) -> None:
        limits = self.parse()
        self.assertEqual((limits.headerTimeout, limits.bodyTimeout, limits.maxPipelined, limits.maxConnections,
                          limits.maxConnectionsPerIp), (10.0, 60.0, 16, 0, 0))

    def test_errors_name_the_key(self) -> None:
        from mcpgw.config import ConfigError

        for key, value in [("headerTimeout", 0), ("bodyTimeout", "1s"), ("maxPipelined", 0),
                           ("maxConnections", -1), ("maxConnectionsPerIp", True)]:
            e = self.assertRaises(ConfigError, self.parse, **{key: value})
            self.assertIn(f"limits.{key}", str(e))


class WriteThroughTests(SynchronousTestCase):
    """GatewayChannel.write on a real TCP transport (a socketpair; the reactor in memory): a whole
    response is sent at once when nothing is queued before it, and what the socket does not take
    is left to the transport, in order."""

    def setUp(self) -> None:
        import socket

        from twisted.internet import tcp
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        root = Resource()
        self.big = b"x" * (4 * 1024 * 1024)
        root.putChild(b"small", Reply(b'{"ok":true}', content_type=b"application/json"))
        root.putChild(b"big", Reply(self.big, content_type=b"application/json"))
        self.stream = Reply(later=True, content_type=b"text/event-stream", start=True)
        root.putChild(b"stream", self.stream)
        site = GatewaySite(root, reactor=self.reactor)
        site.connections = Connections(self.reactor, nofile=100000)
        listener = socket.create_server(("127.0.0.1", 0))
        self.peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        ours.setblocking(False)
        self.peer.settimeout(5)
        self.addCleanup(self.peer.close)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = site.buildProtocol(address)
        self.transport = tcp.Server(ours, self.channel, ("127.0.0.1", 40000), None, 1, self.reactor)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.addCleanup(lambda: hasattr(self.transport, "socket") and self.transport.connectionLost(Failure(ConnectionDone())))
        self.channel.makeConnection(self.transport)

    def request(self, path: str) -> None:
        self.transport.protocol.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    def received(self, at_least: int) -> bytes:
        data = b""
        while len(data) < at_least:
            chunk = self.peer.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        return data

    def test_a_shed_connection_closes_cleanly_with_its_head_unread(self) -> None:
        """Descriptors short, a connection whose head the reactor has not read yet (accepted in the
        same burst) is shed: its unread input is dropped first, so the client reads an end of stream,
        not a reset (a socket closed with unread input is reset: RFC 1122 4.2.2.13)."""
        from twisted.python.failure import Failure

        self.peer.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        select.select([self.transport.socket], [], [], 5)  # in the gateway's kernel buffer, unread
        self.channel.shed()
        unread = struct.unpack("i", fcntl.ioctl(self.transport.socket, termios.FIONREAD, b"\0\0\0\0"))[0]
        self.assertEqual(unread, 0)  # nothing left to turn the close into a reset
        done = self.transport.doWrite()
        self.assertTrue(done)  # the 503 written, the connection done
        self.transport.connectionLost(Failure(done))
        self.assertEqual(self.received(1 << 20), b"")  # the end of stream (a reset raises)

    @pytest.mark.fast_paths
    def test_whole_response_sent_without_the_reactor(self) -> None:
        self.assertTrue(self.channel._through)
        self.request("/small")
        self.assertNotIn(self.transport, self.reactor.getWriters())
        data = self.received(1)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 11", head)
        self.assertEqual(body, b'{"ok":true}')

    def test_what_the_socket_does_not_take_goes_through_the_transport_in_order(self) -> None:
        self.request("/big")
        self.request("/small")  # pipelined behind it: queued after the rest of the big one
        self.assertIn(self.transport, self.reactor.getWriters())
        data = b""
        expected = len(self.big) + 200
        while len(data) < expected:
            self.transport.doWrite()
            try:
                data += self.peer.recv(1 << 20)
            except TimeoutError:
                break
        first, _, rest = data.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % len(self.big), first)
        self.assertEqual(rest[: len(self.big)], self.big)
        self.assertTrue(rest[len(self.big):].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(rest.endswith(b'{"ok":true}'))

    def test_a_stream_head_and_chunks_go_through_the_transport(self) -> None:
        self.request("/stream")
        self.transport.doWrite()
        head = self.received(1)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"))
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.stream.waiting[0].write(b"data: 1\n\n")
        self.assertIn(self.transport, self.reactor.getWriters())  # chunks keep the transport's write cycle
        self.transport.doWrite()
        self.assertEqual(self.received(1), b"9\r\ndata: 1\n\n\r\n")

    def test_fast_paths_off_writes_through_the_transport(self) -> None:
        fast_paths(self, False)
        self.setUp()
        self.assertFalse(self.channel._through)
        self.request("/small")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        self.assertTrue(self.received(1).endswith(b'{"ok":true}'))
