"""mcpgw.transports.websocket without sockets or real time.

Autobahn's protocol is driven over a StringTransport with hand-made client
frames; the child is a FakeProcessTransport on a FakeProcessReactor (a Clock),
so keepalive pings and timeouts run on fake time.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any, ClassVar

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mcpgw import _fast
from mcpgw._fast.websocket import ReactorTimer
from mcpgw.config import (
    ConfigError,
    GatewayConfig,
    StdioServer,
    WebSocketConfig,
    parse,
)
from mcpgw.session import SessionManager
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import Heartbeat
from mcpgw.transports.websocket import (
    McpWebSocketFactory,
    McpWebSocketProtocol,
    WsConnection,
)
from mcpgw.web import Guard, Root
from tests.fake_process import FakeProcessReactor, FakeProcessTransport

SERVER = StdioServer(name="fx", command="fx", executable="/opt/bin/fx")
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class TcpLikeTransport(StringTransport):
    """A StringTransport that, like a TCP transport, lets a protocol unregister no producer."""

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split the gateway's (unmasked) output into (opcode, payload) frames."""
    frames = []
    while data:
        b0, b1 = data[0], data[1]
        assert not b1 & 0x80, "server frames are not masked"
        n, i = b1 & 0x7F, 2
        if n == 126:
            n, i = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, i = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((b0 & 0x0F, data[i:i + n]))
        data = data[i + n:]
    return frames


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]


def handshake(protocols: list[str] | None = None, origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1", "Host: 127.0.0.1:3000", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WebSocketTestCase(SynchronousTestCase):
    """A gateway context on fake time with fake children, and helpers to play a client."""

    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=1024)
    #: The connections this test opens take the fast paths (mcpgw._fast.websocket), or Autobahn's
    #: public path; decided when each protocol is built.
    fast = True

    def setUp(self) -> None:
        self.addCleanup(_fast.configure, _fast.enabled())
        _fast.configure(self.fast)
        if self.fast and not _fast.enabled():
            self.fail("the fast paths are off (MCPGW_FAST_PATHS=0): tests/conftest.py deselects this class then")
        self.reactor = FakeProcessReactor()
        self.config = GatewayConfig(servers={"fx": SERVER}, host="127.0.0.1", websocket=self.websocket)
        self.sessions = SessionManager(self.config, self.reactor)
        self.ctx = GatewayContext(config=self.config, sessions=self.sessions,
                                  heartbeat=Heartbeat(15, self.reactor), reactor=self.reactor)
        self.factory = McpWebSocketFactory(self.ctx, SERVER)

    def connect(self, protocols: list[str] | None = None) -> tuple[McpWebSocketProtocol, TcpLikeTransport, bytes]:
        """Open a connection and send the upgrade request; (protocol, transport, the gateway's reply)."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = TcpLikeTransport()
        proto.makeConnection(transport)
        proto.dataReceived(handshake(protocols))
        reply = transport.value()
        transport.clear()
        return proto, transport, reply

    def open(self) -> tuple[McpWebSocketProtocol, TcpLikeTransport, FakeProcessTransport]:
        proto, transport, reply = self.connect(["mcp"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 101"), reply)
        [child] = self.reactor.spawned
        return proto, transport, child

    def next_turn(self) -> bool:
        """Run the reactor's next turn if one is due now (a read's messages past MAX_TURN_MESSAGES
        wait for it): whether one ran."""
        now = self.reactor.seconds()
        due = [call for call in self.reactor.getDelayedCalls() if call.getTime() <= now]
        if not due:
            return False
        # The calls due now, not those they make (Clock.advance would run a callLater(0) made by
        # a call it runs in the same advance; the reactor runs it on its next turn).
        for call in due:
            if call.active():
                self.reactor.calls.remove(call)
                call.called = True
                call.func(*call.args, **call.kw)
        return True

    def next_turns(self, limit: int = 10_000) -> int:
        """Run the turns that are due until none is: how many ran."""
        for turns in range(limit):
            if not self.next_turn():
                return turns
        self.fail("still turning after %d turns" % limit)

    def frames(self, transport: StringTransport) -> list[tuple[int, bytes]]:
        frames = server_frames(transport.value())
        transport.clear()
        return frames

    def texts(self, transport: StringTransport) -> list[Any]:
        frames = self.frames(transport)
        self.assertEqual({op for op, _ in frames} - {TEXT}, set(), frames)
        return [json.loads(p) for _, p in frames]


class HandshakeTests(WebSocketTestCase):
    def test_mcp_subprotocol_is_chosen_and_a_session_starts(self) -> None:
        """Asked for ``mcp``: 101 naming it, one session on the ws transport, one child."""
        _, _, reply = self.connect(["mcp"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 101"))
        self.assertIn(b"Sec-WebSocket-Protocol: mcp\r\n", reply)
        self.assertEqual(len(self.reactor.spawned), 1)
        [session] = self.sessions.sessions.values()
        self.assertEqual(session.transport, "ws")
        self.assertIsInstance(session.outlet, WsConnection)

    def test_no_subprotocol_is_accepted(self) -> None:
        """A client that asks for none (wscat) is accepted, with no Sec-WebSocket-Protocol."""
        _, _, reply = self.connect()
        self.assertTrue(reply.startswith(b"HTTP/1.1 101"))
        self.assertNotIn(b"Sec-WebSocket-Protocol", reply)

    def test_mcp_among_others_is_chosen(self) -> None:
        _, _, reply = self.connect(["graphql-ws", "mcp"])
        self.assertIn(b"Sec-WebSocket-Protocol: mcp\r\n", reply)

    def test_only_other_subprotocols_is_refused_with_a_reason(self) -> None:
        """406 naming the subprotocol it speaks; no session, no child."""
        _, transport, reply = self.connect(["graphql-ws"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 406 "), reply)
        self.assertIn(b"'mcp'", reply.split(b"\r\n")[0])
        self.assertEqual(self.reactor.spawned, [])
        self.assertTrue(transport.disconnecting)

    def test_refused_while_shutting_down(self) -> None:
        self.sessions.accepting = False
        _, _, reply = self.connect(["mcp"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 503 "), reply)
        self.assertEqual(self.reactor.spawned, [])

    def test_timers_use_the_injected_reactor(self) -> None:
        """The open-handshake timeout is a call on the fake clock, not on the global reactor."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(TcpLikeTransport())
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)


class GuardTests(WebSocketTestCase):
    """The upgrade request passes mcpgw.web.Guard like every other MCP endpoint."""

    def ws_resource(self, root: Root, name: bytes) -> Guard:
        checked = root.children[name] if name == b"ws" else root.children[b"servers"].children[name].children[b"ws"]
        guard = checked.head_guard  # (mcpgw.request.HeadChecked: the Guard the site asks on the head)
        self.assertIsInstance(guard, Guard)
        self.assertIsInstance(guard._inner, WebSocketResource)
        return guard

    def request(self, origin: bytes) -> DummyRequest:
        request = DummyRequest([b"ws"])
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:3000"])
        request.requestHeaders.setRawHeaders(b"origin", [origin])
        return request

    def test_ws_is_mounted_at_root_and_per_server(self) -> None:
        root = Root(self.ctx)
        for name in (b"ws", b"fx"):
            self.assertIs(self.ws_resource(root, name)._inner.factory.mcp_server, SERVER)

    def test_foreign_origin_is_refused_before_the_upgrade(self) -> None:
        request = self.request(b"http://evil.example")
        body = self.ws_resource(Root(self.ctx), b"ws").render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"Origin not allowed", body)
        self.assertEqual(self.reactor.spawned, [])


class MessageTests(WebSocketTestCase):
    def test_application_ping_gets_pong(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"type": "ping"}'))
        self.assertEqual(self.texts(transport), [{"type": "pong"}])
        self.assertEqual(child.written, [])

    def test_request_goes_to_the_child_and_its_answer_comes_back(self) -> None:
        """A request frame is one line on the child's stdin; its response is one text frame."""
        proto, transport, child = self.open()
        request = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
        proto.dataReceived(client_frame(TEXT, request))
        self.assertEqual(child.written, [request + b"\n"])
        child.proto.outReceived(b'{"jsonrpc":"2.0","method":"notifications/message","params":{}}\n'
                                b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}\n')
        self.assertEqual(self.texts(transport), [
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {}},
            {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}},
        ])

    def test_a_message_spanning_lines_is_sent_on_one(self) -> None:
        proto, _, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc": "2.0",\n "method": "notifications/initialized"}'))
        self.assertEqual(child.written, [b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'])

    def test_fragmented_message_is_one_message(self) -> None:
        proto, _, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0",', fin=False) +
                           client_frame(0x0, b'"method":"notifications/initialized"}'))
        self.assertEqual(child.written, [b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'])

    def test_bad_json_gets_parse_error_and_the_connection_stays(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc": '))
        [error] = self.texts(transport)
        self.assertEqual((error["id"], error["error"]["code"]), (None, -32700))
        proto.dataReceived(client_frame(TEXT, b'{"type":"ping"}'))
        self.assertEqual(self.texts(transport), [{"type": "pong"}])
        self.assertEqual(child.written, [])

    def test_invalid_request_keeps_its_id(self) -> None:
        proto, transport, _ = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":9,"method":5}'))
        [error] = self.texts(transport)
        self.assertEqual((error["id"], error["error"]["code"]), (9, -32600))

    def test_server_discover_is_answered_by_the_gateway(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":"d","method":"server/discover"}'))
        [error] = self.texts(transport)
        self.assertEqual((error["id"], error["error"]["code"]), ("d", -32601))
        self.assertEqual(child.written, [])

    def test_replies_larger_than_the_client_limit_are_sent(self) -> None:
        """websocket.maxMessageBytes limits what clients send, not the child's answers."""
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":1,"method":"x"}'))
        big = b'{"jsonrpc":"2.0","id":1,"result":{"t":"' + b"a" * 5000 + b'"}}'
        child.proto.outReceived(big + b"\n")
        self.assertEqual(self.frames(transport), [(TEXT, big)])


class CloseTests(WebSocketTestCase):
    def assertClosedWith(self, transport: StringTransport, code: int) -> None:
        frames = self.frames(transport)
        self.assertEqual(frames[-1][0], CLOSE, frames)
        self.assertEqual(close_code(frames[-1][1]), code)

    def assertSessionOver(self, child: FakeProcessTransport) -> None:
        self.assertEqual(self.sessions.sessions, {})
        self.assertEqual(child.stdinClosed, 1)

    def test_binary_frame_closes_1003(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(BINARY, b'{"jsonrpc":"2.0","method":"x"}'))
        self.assertClosedWith(transport, 1003)
        self.assertSessionOver(child)
        self.assertEqual(child.written, [])

    def test_invalid_utf8_closes_1007(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"t": "\xff"}'))
        self.assertClosedWith(transport, 1007)
        proto.dataReceived(client_frame(CLOSE, struct.pack("!H", 1007)))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertSessionOver(child)

    def test_message_over_the_limit_closes_1009(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"t":"' + b"a" * 1100 + b'"}'))
        self.assertClosedWith(transport, 1009)
        self.assertEqual(child.written, [])

    def test_fragments_over_the_limit_close_1009(self) -> None:
        proto, transport, _ = self.open()
        proto.dataReceived(client_frame(TEXT, b"a" * 600, fin=False) + client_frame(0x0, b"a" * 600))
        self.assertClosedWith(transport, 1009)

    def test_client_close_ends_the_session_and_stops_the_child(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(CLOSE, struct.pack("!H", 1000)))
        self.assertClosedWith(transport, 1000)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertSessionOver(child)

    def test_lost_connection_ends_the_session(self) -> None:
        proto, _, child = self.open()
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertSessionOver(child)

    def test_child_exit_errors_in_flight_requests_then_closes_1011(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}'))
        proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":2,"method":"tools/call"}'))
        child.exit(3)
        frames = self.frames(transport)
        self.assertEqual([op for op, _ in frames], [TEXT, TEXT, CLOSE])
        errors = [json.loads(p) for _, p in frames[:2]]
        self.assertEqual(sorted(e["id"] for e in errors), [1, 2])
        self.assertEqual({e["error"]["code"] for e in errors}, {-32000})
        self.assertEqual(close_code(frames[2][1]), 1011)
        self.assertIn(b"status 3", frames[2][1])

    def test_gateway_shutdown_closes_1001(self) -> None:
        _, transport, child = self.open()
        self.sessions.stopService()
        self.assertClosedWith(transport, 1001)
        self.assertEqual(child.stdinClosed, 1)


class KeepaliveTests(WebSocketTestCase):
    def test_ping_frames_at_the_configured_interval(self) -> None:
        proto, transport, _ = self.open()
        self.reactor.advance(4.9)
        self.assertEqual(self.frames(transport), [])
        self.reactor.advance(0.1)
        [(opcode, payload)] = self.frames(transport)
        self.assertEqual(opcode, PING)
        proto.dataReceived(client_frame(PONG, payload))
        self.reactor.advance(2)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(3)
        self.assertEqual([op for op, _ in self.frames(transport)], [PING])

    def test_dead_peer_is_dropped_and_its_session_ended(self) -> None:
        """No pong within pingTimeout: the connection is aborted; its loss ends the session."""
        proto, transport, child = self.open()
        self.reactor.advance(5)
        self.assertEqual([op for op, _ in self.frames(transport)], [PING])
        self.reactor.advance(2)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.sessions.sessions, {})
        self.assertEqual(child.stdinClosed, 1)

    def test_cancelling_a_call_that_ran_is_harmless(self) -> None:
        ran = []
        call = ReactorTimer(self.reactor).call_later(1, ran.append, 1)
        self.reactor.advance(1)
        call.cancel()
        self.assertEqual(ran, [1])


class BackpressureTests(WebSocketTestCase):
    def test_session_is_the_sockets_producer(self) -> None:
        """A full socket buffer pauses reading the child's stdout; draining resumes it."""
        _, transport, child = self.open()
        self.assertTrue(transport.streaming)
        transport.producer.pauseProducing()
        self.assertTrue(child.paused)
        transport.producer.resumeProducing()
        self.assertFalse(child.paused)

    def test_repeated_pauses_are_one(self) -> None:
        """Twisted pauses on every write while its buffer is full and resumes once when it drains."""
        _, transport, child = self.open()
        for _ in range(3):
            transport.producer.pauseProducing()
        self.assertTrue(child.paused)
        transport.producer.resumeProducing()
        self.assertFalse(child.paused)

    def test_replaces_the_http_channel_as_producer(self) -> None:
        """The upgrade request's HTTPChannel is still the transport's producer when the socket opens."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = TcpLikeTransport()
        channel = object()
        transport.registerProducer(channel, True)
        proto.makeConnection(transport)
        proto.dataReceived(handshake(["mcp"]))
        self.assertIsNot(transport.producer, channel)
        transport.producer.pauseProducing()
        self.assertTrue(self.reactor.spawned[-1].paused)

    def test_a_closed_socket_unregisters_and_resumes(self) -> None:
        proto, transport, child = self.open()
        transport.producer.pauseProducing()
        proto.dataReceived(client_frame(CLOSE, struct.pack("!H", 1000)))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(transport.producer)
        self.assertFalse(child.paused)


class ConfigTests(SynchronousTestCase):
    servers: ClassVar[dict[str, Any]] = {"fx": {"command": "python3"}}

    def test_defaults(self) -> None:
        self.assertEqual(parse({"mcpServers": self.servers}).websocket,
                         WebSocketConfig(pingInterval=30, pingTimeout=10, maxMessageBytes=16 * 1024 * 1024))

    def test_values(self) -> None:
        ws = parse({"mcpServers": self.servers, "websocket": {"pingInterval": 1.5, "pingTimeout": 3, "maxMessageBytes": 10}}).websocket
        self.assertEqual(ws, WebSocketConfig(pingInterval=1.5, pingTimeout=3, maxMessageBytes=10))

    def test_bad_values_name_the_key(self) -> None:
        cases = [
            ({"pingInterval": 0}, "websocket.pingInterval"),
            ({"pingTimeout": "10"}, "websocket.pingTimeout"),
            ({"maxMessageBytes": 1.5}, "websocket.maxMessageBytes"),
            ({"maxMessageBytes": True}, "websocket.maxMessageBytes"),
            ({"ping": 1}, "websocket.ping"),
        ]
        for section, key in cases:
            with self.assertRaises(ConfigError) as info:
                parse({"mcpServers": self.servers, "websocket": section})
            self.assertEqual(info.exception.key, key)
        with self.assertRaises(ConfigError) as info:
            parse({"mcpServers": self.servers, "websocket": [1]})
        self.assertEqual(info.exception.key, "websocket")
