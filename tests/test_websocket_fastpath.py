"""The WebSocket fast path (McpWebSocketProtocol.dataReceived / send_text) against Autobahn's own.

Whole, final, masked text frames are parsed by mcpgw; everything else (fragments,
frames split across reads, control frames, protocol errors, frames over the
limit) goes to Autobahn from that frame on. These tests check which path a
read takes and that both give the same result, byte for byte, on the wire and
on the child's stdin. Each class runs twice: with the fast paths (mcpgw._fast.websocket)
and, as ``...PublicTests``, with them off (Autobahn's parser, ``sendMessage``,
``transport.write``), where Autobahn sees every byte and the wire is the same
but for replies over the client limit (a text frame and an empty continuation).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
from typing import Any
from unittest import mock

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mcpgw import _fast
from mcpgw.config import WebSocketConfig
from mcpgw.transports.websocket import McpWebSocketProtocol
from tests.test_websocket_unit import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    TcpLikeTransport,
    WebSocketTestCase,
    client_frame,
    close_code,
    handshake,
    server_frames,
)

CONT = 0x0


def note(text: str) -> bytes:
    """A JSON-RPC notification the session relays to the child as one line."""
    return json.dumps({"jsonrpc": "2.0", "method": "notifications/x", "params": {"t": text}},
                      separators=(",", ":"), ensure_ascii=False).encode()


def sized(n: int, fill: str = "a") -> bytes:
    """A notification of exactly ``n`` bytes (n >= 60)."""
    base = len(note(""))
    return note(fill * (n - base))



def over_the_limit_closes_1009(test: Any, size: int) -> None:
    """A frame of ``size`` bytes, over the connection's limit, between two small ones: the first is
    delivered, the connection closes 1009, nothing after it is, and Autobahn got the big frame."""
    proto, transport, child, autobahn = test.open_recorded()
    big = client_frame(TEXT, sized(size))
    proto.dataReceived(client_frame(TEXT, note("ok")) + big + client_frame(TEXT, note("never")))
    frames = test.frames(transport)
    test.assertEqual([(op, close_code(p)) for op, p in frames], [(CLOSE, 1009)])
    test.assertEqual(test.lines(child), [note("ok")])
    if test.fast:
        test.assertTrue(autobahn.bytes.startswith(big))
    else:
        test.assertAutobahnSaw(autobahn, b"")

class Recorder:
    """Wraps a protocol's ``_dataReceived`` (Autobahn's byte entry) to record what Autobahn saw,
    and its ``dataReceived`` to record what the socket gave it (``fed``)."""

    def __init__(self, proto: McpWebSocketProtocol):
        self.seen: list[bytes] = []
        self.fed: list[bytes] = []
        original, received = proto._dataReceived, proto.dataReceived

        def record(data: bytes) -> None:
            self.seen.append(bytes(data))
            original(data)

        def feed(data: bytes) -> None:
            self.fed.append(bytes(data))
            received(data)

        proto._dataReceived = record  # type: ignore[method-assign]
        proto.dataReceived = feed  # type: ignore[method-assign]

    @property
    def bytes(self) -> bytes:
        return b"".join(self.seen)


class ManyConnections(WebSocketTestCase):
    def open(self) -> tuple[McpWebSocketProtocol, TcpLikeTransport, Any]:
        """A connection and its child (the newest: a test may open several)."""
        proto, transport, reply = self.connect(["mcp"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 101"), reply)
        self.assertEqual(proto._fast is not None, self.fast)
        return proto, transport, self.reactor.spawned[-1]

    def replies(self, payloads: list[bytes]) -> list[tuple[int, bytes]]:
        """The frames of these replies: one text frame each, but on the public path a reply over the
        client limit is a text frame and an empty continuation frame."""
        split = 0 if self.fast else self.websocket.maxMessageBytes or 0
        return [frame for p in payloads
                for frame in ([(TEXT, p), (CONT, b"")] if 0 < split < len(p) else [(TEXT, p)])]

    def assertAutobahnSaw(self, autobahn: Recorder, fast: bytes, msg: Any = None) -> None:
        """Autobahn saw ``fast`` on the fast path; on the public path, every byte."""
        self.assertEqual(autobahn.bytes, fast if self.fast else b"".join(autobahn.fed), msg)


class FastPathTests(ManyConnections):
    def open_recorded(self) -> tuple[McpWebSocketProtocol, TcpLikeTransport, Any, Recorder]:
        proto, transport, child = self.open()
        return proto, transport, child, Recorder(proto)

    def lines(self, child: Any) -> list[bytes]:
        return [line for chunk in child.written for line in chunk.splitlines()]

    def test_a_whole_text_frame_never_reaches_autobahn(self) -> None:
        proto, transport, child, autobahn = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, note("one")))
        self.assertEqual(self.lines(child), [note("one")])
        self.assertAutobahnSaw(autobahn, b"")
        self.assertEqual(transport.value(), b"")

    def test_several_frames_in_one_read(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        proto.dataReceived(b"".join(client_frame(TEXT, note(f"m{i}")) for i in range(5)))
        self.assertEqual(self.lines(child), [note(f"m{i}") for i in range(5)])
        self.assertAutobahnSaw(autobahn, b"")

    def test_126_length_form(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        for n in (126, 300, 1024):  # 1024 = websocket.maxMessageBytes of this test case
            proto.dataReceived(client_frame(TEXT, sized(n)))
        self.assertEqual(self.lines(child), [sized(126), sized(300), sized(1024)])
        self.assertAutobahnSaw(autobahn, b"")

    def test_non_ascii_text_is_delivered(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, note("grüße, 世界, 🙂")))
        self.assertEqual(self.lines(child), [note("grüße, 世界, 🙂")])
        self.assertAutobahnSaw(autobahn, b"")

    def test_application_ping_and_bad_json_on_the_fast_path(self) -> None:
        proto, transport, child, autobahn = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, b'{"type":"ping"}') + client_frame(TEXT, b"{nope") + client_frame(TEXT, b""))
        frames = self.frames(transport)
        self.assertEqual(frames[0], (TEXT, b'{"type":"pong"}'))
        self.assertEqual([json.loads(p)["error"]["code"] for _, p in frames[1:]], [-32700, -32700])
        self.assertEqual(child.written, [])
        self.assertAutobahnSaw(autobahn, b"")

    def test_frame_split_across_reads(self) -> None:
        """Every split point, the header's included: the message arrives once, whole."""
        frame = client_frame(TEXT, sized(300))
        for cut in range(1, len(frame)):
            proto, _, child, autobahn = self.open_recorded()
            proto.dataReceived(frame[:cut])
            self.assertEqual(child.written, [], cut)
            proto.dataReceived(frame[cut:])
            self.assertEqual(self.lines(child), [sized(300)], cut)
            self.assertAutobahnSaw(autobahn, b"", cut)  # a split text frame stays on the fast path

    def test_back_on_the_fast_path_after_a_split_frame(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        first, second = client_frame(TEXT, note("a")), client_frame(TEXT, note("b"))
        proto.dataReceived(first[:5])
        proto.dataReceived(first[5:])
        proto.dataReceived(second)
        self.assertEqual(self.lines(child), [note("a"), note("b")])
        self.assertAutobahnSaw(autobahn, b"")

    def test_a_split_frame_is_kept_until_its_last_read(self) -> None:
        """A long frame in many reads: nothing is parsed before its last byte, then it and the
        frame behind it in the same read."""
        proto, _, child, autobahn = self.open_recorded()
        frame, after = client_frame(TEXT, sized(1000)), client_frame(TEXT, note("after"))
        for i in range(0, len(frame) - 1, 7):
            proto.dataReceived(frame[i:min(i + 7, len(frame) - 1)])
            self.assertEqual(child.written, [], i)
        proto.dataReceived(frame[-1:] + after)
        self.assertEqual(self.lines(child), [sized(1000), note("after")])
        self.assertAutobahnSaw(autobahn, b"")

    def test_fragmented_message(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        whole = note("fragmented")
        fragments = (client_frame(TEXT, whole[:10], fin=False) + client_frame(CONT, whole[10:20], fin=False)
                     + client_frame(CONT, whole[20:]))
        after = client_frame(TEXT, note("after"))
        proto.dataReceived(fragments)
        proto.dataReceived(after)
        self.assertEqual(self.lines(child), [whole, note("after")])
        self.assertAutobahnSaw(autobahn, fragments)

    def test_ping_between_frames(self) -> None:
        """A control frame goes to Autobahn alone, the text frames around it are the fast path's;
        the order holds."""
        proto, transport, child, autobahn = self.open_recorded()
        ping = client_frame(PING, b"hello")
        proto.dataReceived(client_frame(TEXT, note("a")) + ping + client_frame(TEXT, note("b")))
        self.assertEqual(self.lines(child), [note("a"), note("b")])
        self.assertEqual(self.frames(transport), [(PONG, b"hello")])
        self.assertAutobahnSaw(autobahn, ping)

    def test_ping_inside_a_fragmented_message(self) -> None:
        proto, transport, child, _ = self.open_recorded()
        whole = note("x" * 40)
        proto.dataReceived(client_frame(TEXT, whole[:30], fin=False) + client_frame(PING, b"p")
                           + client_frame(CONT, whole[30:]))
        self.assertEqual(self.lines(child), [whole])
        self.assertEqual(self.frames(transport), [(PONG, b"p")])

    def test_invalid_utf8_closes_1007(self) -> None:
        proto, transport, child, autobahn = self.open_recorded()
        never = client_frame(TEXT, note("never"))
        proto.dataReceived(client_frame(TEXT, note("ok")) + client_frame(TEXT, b'{"t": "\xff"}') + never)
        frames = self.frames(transport)
        self.assertEqual([op for op, _ in frames], [CLOSE])
        self.assertEqual(close_code(frames[0][1]), 1007)
        self.assertEqual(self.lines(child), [note("ok")])
        self.assertAutobahnSaw(autobahn, never)  # closing: the rest is Autobahn's, which drops it
        proto.dataReceived(client_frame(CLOSE, struct.pack("!H", 1007)))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sessions.sessions, {})

    def test_surrogates_and_overlong_forms_are_invalid(self) -> None:
        for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"caf\xc3"):
            proto, transport, child, _ = self.open_recorded()
            proto.dataReceived(client_frame(TEXT, b'{"t": "' + bad + b'"}'))
            [(op, payload)] = self.frames(transport)
            self.assertEqual((op, close_code(payload)), (CLOSE, 1007), bad)
            self.assertEqual(child.written, [])

    def test_invalid_utf8_in_a_fragmented_message_closes_1007(self) -> None:
        proto, transport, child, _ = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, b'{"t": "', fin=False) + client_frame(CONT, b'\xff"}'))
        [(op, payload)] = self.frames(transport)
        self.assertEqual((op, close_code(payload)), (CLOSE, 1007))
        self.assertEqual(child.written, [])

    def test_a_code_point_split_between_fragments_is_valid(self) -> None:
        proto, _, child, _ = self.open_recorded()
        whole = note("é")
        cut = whole.index("é".encode()) + 1
        proto.dataReceived(client_frame(TEXT, whole[:cut], fin=False) + client_frame(CONT, whole[cut:]))
        self.assertEqual(self.lines(child), [whole])

    def test_over_the_limit_closes_1009_and_nothing_after_it_is_delivered(self) -> None:
        over_the_limit_closes_1009(self, 1025)

    def test_binary_frame_closes_1003(self) -> None:
        proto, transport, child, _ = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, note("ok")) + client_frame(BINARY, note("bin")))
        frames = self.frames(transport)
        self.assertEqual([(op, close_code(p)) for op, p in frames], [(CLOSE, 1003)])
        self.assertEqual(self.lines(child), [note("ok")])

    def test_protocol_errors_are_autobahns(self) -> None:
        """Unmasked frames, RSV bits, non-minimal lengths, a stray continuation: 1002 as before."""
        unmasked = bytes([0x81, 5]) + b"hello"
        rsv = bytes([0xC1]) + client_frame(TEXT, b"x")[1:]
        mask = os.urandom(4)
        not_minimal = bytes([0x81, 0x80 | 126]) + struct.pack("!H", 5) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
        not_minimal_64 = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 5) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
        stray = client_frame(CONT, b"x")
        for frame in (unmasked, rsv, not_minimal, not_minimal_64, stray):
            proto, transport, child, autobahn = self.open_recorded()
            proto.dataReceived(client_frame(TEXT, note("ok")) + frame)
            frames = self.frames(transport)
            self.assertEqual([(op, close_code(p)) for op, p in frames], [(CLOSE, 1002)], frame)
            self.assertEqual(self.lines(child), [note("ok")])
            self.assertAutobahnSaw(autobahn, frame)

    def test_nothing_is_parsed_after_the_gateway_starts_closing(self) -> None:
        proto, transport, child, autobahn = self.open_recorded()
        proto.close(1008, "policy")
        transport.clear()
        late = client_frame(TEXT, note("late"))
        proto.dataReceived(late)
        self.assertEqual(child.written, [])
        self.assertAutobahnSaw(autobahn, late)

    def test_a_data_frame_stands_in_for_the_pong(self) -> None:
        """As in Autobahn: any data frame after a keepalive ping cancels its timeout."""
        proto, transport, child, autobahn = self.open_recorded()
        self.reactor.advance(5)
        self.assertEqual([op for op, _ in self.frames(transport)], [PING])
        proto.dataReceived(client_frame(TEXT, note("alive")))
        self.reactor.advance(2)
        self.assertFalse(transport.disconnecting)
        self.assertAutobahnSaw(autobahn, b"")
        self.reactor.advance(5)
        self.assertEqual([op for op, _ in self.frames(transport)], [PING])

    def test_replies_use_the_shortest_length_form(self) -> None:
        """On the public path a reply over the client limit is Autobahn's frame API's: a text frame
        and an empty final continuation frame (sendMessage refuses it)."""
        proto, transport, _, _ = self.open_recorded()
        limit = self.websocket.maxMessageBytes
        for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            proto.send_text(b"r" * n)
            data = transport.value()
            transport.clear()
            head = 2 if n < 126 else 4 if n < 65536 else 10
            split = not self.fast and n > limit
            self.assertEqual(len(data), head + n + (2 if split else 0), n)
            self.assertEqual(server_frames(data), [(TEXT, b"r" * n)] + ([(CONT, b"")] if split else []), n)

    def test_no_debug_log_arguments_are_built_per_message(self) -> None:
        """Autobahn formats ``hltype``/``hlval`` arguments for debug calls that are dropped at info:
        the fast path never does; the public path is Autobahn's own and pays that cost per message."""
        proto, transport, child, _ = self.open_recorded()
        calls: list[str] = []

        def counting(name: str) -> Any:
            return lambda *a, **k: calls.append(name) or ""

        patches = [mock.patch(f"{module}.{name}", counting(name))
                   for module in ("autobahn.twisted.websocket", "autobahn.websocket.protocol")
                   for name in ("hltype", "hlval")]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)
        for i in range(10):
            proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":%d,"method":"tools/list"}' % i))
            child.proto.outReceived(b'{"jsonrpc":"2.0","id":%d,"result":{}}\n' % i)
        self.assertEqual(len(self.texts(transport)), 10)
        if self.fast:
            self.assertEqual(calls, [])
        else:
            self.assertTrue(calls)  # what the fast path saves

    def test_replies_after_closing_are_dropped(self) -> None:
        proto, transport, _, _ = self.open_recorded()
        proto.close(1008, "policy")
        transport.clear()
        proto.send_text(b'{"late":1}')
        self.assertEqual(transport.value(), b"")


class FakeFdReactor:
    """Just enough of IReactorFDSet for a tcp.Connection driven by hand."""

    def __init__(self) -> None:
        self.writers: set[Any] = set()

    def addWriter(self, fd: Any) -> None:
        self.writers.add(fd)

    def removeWriter(self, fd: Any) -> None:
        self.writers.discard(fd)

    def addReader(self, fd: Any) -> None:
        pass

    def removeReader(self, fd: Any) -> None:
        pass


class SocketConnection(tcp.Connection):
    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 3000)


class DirectWriteTests(ManyConnections):
    """Replies go straight into an idle TCP socket; behind anything buffered otherwise."""

    def setUp(self) -> None:
        super().setUp()
        self.fds = FakeFdReactor()
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.conn = SocketConnection(self.ours, proto, self.fds)
        self.conn.connected = True
        proto.makeConnection(self.conn)
        proto.dataReceived(handshake(["mcp"]))
        self.flush()
        self.assertTrue(self.received().startswith(b"HTTP/1.1 101"))
        self.proto, self.child = proto, self.reactor.spawned[-1]
        fast = proto._fast
        self.assertEqual(fast is not None and fast.direct, self.fast)

    def sent_at_once(self) -> None:
        """The fast path sent the reply into the socket; the public one left it to the reactor."""
        if self.fast:
            self.assertEqual(self.fds.writers, set())  # nothing left for the reactor
        else:
            self.assertIn(self.conn, self.fds.writers)
            self.flush()

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            chunks.append(chunk)

    def flush(self) -> None:
        """The reactor's part: doWrite while the connection waits to write."""
        while self.conn in self.fds.writers:
            self.conn.doWrite()

    def test_a_reply_is_sent_at_once(self) -> None:
        self.proto.dataReceived(client_frame(TEXT, b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'))
        self.child.proto.outReceived(b'{"jsonrpc":"2.0","id":1,"result":{}}\n')
        self.sent_at_once()
        self.assertEqual(server_frames(self.received()), [(TEXT, b'{"jsonrpc":"2.0","id":1,"result":{}}')])

    def test_a_full_socket_buffers_in_order_and_pauses_the_child(self) -> None:
        sent = []
        for i in range(1000):
            payload = b"%04d" % i + b"x" * 60_000
            self.proto.send_text(payload)
            sent.append(payload)
            if self.conn._tempDataLen > self.conn.bufferSize:
                break
        else:
            self.fail("the socket never filled up")
        self.assertIn(self.conn, self.fds.writers)
        self.assertTrue(self.child.paused)  # backpressure: the session is the socket's producer
        for i in range(3):  # behind the buffered bytes, not straight into the socket
            self.proto.send_text(b"small %d" % i)
            sent.append(b"small %d" % i)
        data = b""
        while self.conn in self.fds.writers:
            data += self.received()
            self.conn.doWrite()
        data += self.received()
        self.assertFalse(self.child.paused)
        self.assertEqual(server_frames(data), self.replies(sent))
        self.proto.send_text(b"after")
        self.sent_at_once()
        self.assertEqual(server_frames(self.received()), [(TEXT, b"after")])

    def test_many_messages_in_one_read_of_a_flooding_child_then_resume(self) -> None:
        """One stdout read holding many lines fills the socket: several pauses, one resume, unpaused."""
        lines = [json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                             "params": {"seq": i, "data": "z" * 20_000}}).encode() for i in range(60)]
        self.child.proto.outReceived(b"\n".join(lines) + b"\n")
        self.assertTrue(self.child.paused)
        data = b""
        while self.conn in self.fds.writers:
            data += self.received()
            self.conn.doWrite()
        data += self.received()
        self.assertFalse(self.child.paused)
        self.assertEqual(server_frames(data), self.replies(lines))

    def test_the_close_frame_and_what_autobahn_writes_keep_their_order(self) -> None:
        self.proto.sendPing(b"p")  # Autobahn's own write: buffered by Twisted
        self.proto.send_text(b"reply")  # so this one queues behind it
        self.assertIn(self.conn, self.fds.writers)
        self.flush()
        self.assertEqual(server_frames(self.received()), [(PING, b"p"), (TEXT, b"reply")])


class LongFrameTests(FastPathTests):
    """The same, with a limit above 64 KiB so the 64-bit length form fits."""

    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=200_000)

    def test_126_length_form(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        for n in (126, 1024, 1025, 65535):  # 1025: unmasked by Autobahn's masker, not the int XOR
            proto.dataReceived(client_frame(TEXT, sized(n)))
        self.assertEqual(self.lines(child), [sized(126), sized(1024), sized(1025), sized(65535)])
        self.assertAutobahnSaw(autobahn, b"")

    def test_127_length_form(self) -> None:
        proto, _, child, autobahn = self.open_recorded()
        proto.dataReceived(client_frame(TEXT, sized(65536, "b")) + client_frame(TEXT, sized(150_000, "c")))
        self.assertEqual(self.lines(child), [sized(65536, "b"), sized(150_000, "c")])
        self.assertAutobahnSaw(autobahn, b"")

    def test_over_the_limit_closes_1009_and_nothing_after_it_is_delivered(self) -> None:
        over_the_limit_closes_1009(self, 200_001)


class EquivalenceTests(ManyConnections):
    """Random client byte streams, cut at random points: the fast path and Autobahn alone agree."""

    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=70_000)

    def stream(self, rng: random.Random) -> bytes:
        out = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            text = "".join(rng.choice("abcé世🙂") for _ in range(rng.choice([0, 1, 10, 50])))
            if kind < 0.45:
                out.append(client_frame(TEXT, note(text)))
            elif kind < 0.55:
                out.append(client_frame(TEXT, sized(rng.choice([125, 126, 1024, 1025, 4000, 65535, 65536]))))
            elif kind < 0.7:
                whole = note(text)
                cuts = sorted(rng.sample(range(1, len(whole)), 2))
                parts = [whole[:cuts[0]], whole[cuts[0]:cuts[1]], whole[cuts[1]:]]
                out.append(client_frame(TEXT, parts[0], fin=False))
                if rng.random() < 0.5:
                    out.append(client_frame(PING, b"mid"))
                out.append(client_frame(CONT, parts[1], fin=False))
                out.append(client_frame(CONT, parts[2]))
            elif kind < 0.8:
                out.append(client_frame(PING, os.urandom(rng.randint(0, 20))))
            elif kind < 0.85:
                out.append(client_frame(TEXT, b""))
            elif kind < 0.9:
                out.append(client_frame(TEXT, b'{"type":"ping"}'))
            else:
                out.append(client_frame(TEXT, b"not json " + text.encode()))
        end = rng.random()
        if end < 0.1:
            out.append(client_frame(TEXT, b'{"t": "\xff\xfe"}'))
        elif end < 0.2:
            out.append(client_frame(TEXT, sized(70_001)))
        elif end < 0.25:
            out.append(client_frame(BINARY, b"x"))
        elif end < 0.3:
            out.append(client_frame(CLOSE, struct.pack("!H", 1000)))
        if end < 0.3 and rng.random() < 0.5:
            out.append(client_frame(TEXT, note("after the end")))
        return b"".join(out)

    def play(self, data: bytes, cuts: list[int], fast: bool) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        _fast.configure(fast)  # Autobahn's public path for every frame and reply when off
        proto, transport, reply = self.connect(["mcp"])
        self.assertTrue(reply.startswith(b"HTTP/1.1 101"), reply)
        self.assertEqual(proto._fast is not None, fast)
        child = self.reactor.spawned[-1]
        last = 0
        for cut in cuts + [len(data)]:
            proto.dataReceived(data[last:cut])
            last = cut
        out = (list(child.written), server_frames(transport.value()))
        proto.connectionLost(Failure(ConnectionDone()))
        return out

    def test_random_streams(self) -> None:
        for seed in range(150):
            rng = random.Random(seed)
            data = self.stream(rng)
            splits = rng.choice([0, 1, 3, 20])
            cuts = sorted(rng.sample(range(1, len(data)), min(splits, len(data) - 1)))
            if rng.random() < 0.1 and len(data) < 3000:
                cuts = list(range(1, len(data)))  # a byte at a time
            fast = self.play(data, cuts, fast=True)
            slow = self.play(data, cuts, fast=False)
            self.assertEqual(fast, slow, f"seed {seed}")


class FastPathPublicTests(FastPathTests):
    fast = False


class DirectWritePublicTests(DirectWriteTests):
    fast = False


class LongFramePublicTests(LongFrameTests):
    fast = False
