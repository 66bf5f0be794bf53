"""WebSocket backpressure and the invalid-message budget, in memory (issue 15, finding 4).

- The socket's producer (``_Backpressure``): Twisted pausing it (its write buffer over the
  high-water mark) stops reading the socket and the session's child; resuming restarts both.
  Checked on a StringTransport (``producerState``) and on a real ``tcp.Connection`` over a
  socketpair, where the gateway's own replies (-32700, 429, pongs) fill the buffer.
- ``websocket.maxErrors`` invalid messages in a row close the connection with 1008 (RFC 6455
  section 7.4.1) and nothing more is read (section 7.1.7); fewer, or good messages between
  them, leave it open.

Each class runs twice: on the fast paths and, as ``...PublicTests``, on Autobahn's public path.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ConfigError, WebSocketConfig, parse
from mcpgw.ratelimit import MemoryRateLimiter
from mcpgw.transports.websocket import MAX_TURN_MESSAGES, PUBLIC_PIECE
from tests.test_websocket_fastpath import CONT, Recorder, SocketConnection
from tests.test_websocket_unit import (
    CLOSE,
    PING,
    PONG,
    TEXT,
    WebSocketTestCase,
    client_frame,
    close_code,
    handshake,
    server_frames,
)

PARSE_ERROR, INVALID_REQUEST, TOO_MANY_REQUESTS = -32700, -32600, -32000
GARBAGE = client_frame(TEXT, b"x")
GOOD = client_frame(TEXT, b'{"jsonrpc":"2.0","method":"notifications/x"}')


def outcome(frames: list[tuple[int, bytes]]) -> list[Any]:
    """Each frame as its JSON-RPC error code, ("close", code) or its opcode."""
    out: list[Any] = []
    for op, payload in frames:
        if op == TEXT:
            out.append(json.loads(payload)["error"]["code"])
        elif op == CLOSE:
            out.append(("close", close_code(payload)))
        else:
            out.append(op)
    return out


class ProducerStateTests(WebSocketTestCase):
    """What Twisted does to the socket's producer, seen on a StringTransport."""

    def test_pausing_stops_reading_the_socket_and_the_child(self) -> None:
        _, transport, child = self.open()
        self.assertTrue(transport.streaming)
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(child.paused)
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(child.paused)

    def test_repeated_pauses_need_one_resume(self) -> None:
        """Twisted pauses on every write while its buffer is full and resumes once when it drains."""
        _, transport, child = self.open()
        for _ in range(3):
            transport.producer.pauseProducing()
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(child.paused)

    def test_a_failed_connection_stays_unread_when_the_buffer_drains(self) -> None:
        """RFC 6455 section 7.1.7: nothing more is read once the gateway failed the connection."""
        proto, transport, child = self.open()
        transport.producer.pauseProducing()
        proto.fail_connection(1008, "policy")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        self.assertFalse(child.paused)  # the session's share is given back all the same

    def test_a_read_that_fills_the_buffer_is_parsed_on_only_when_it_drains(self) -> None:
        """One read of many small invalid frames (each answered with a -32700): once the replies
        pause the socket, the fast path keeps the rest of the read and parses it when the buffer
        drains, so the reactor is not held answering a whole read while other connections wait
        (the never-reading flood of tests/test_hostile_websocket.py). Autobahn's public path
        parses the whole read at once."""
        proto, transport, _ = self.open()
        answer = proto.onMessage

        def answer_then_fill(payload: bytes, is_binary: bool) -> None:
            answer(payload, is_binary)
            transport.producer.pauseProducing()  # as Twisted does past bufferSize

        proto.onMessage = answer_then_fill  # type: ignore[method-assign]
        proto.dataReceived(GARBAGE * 3)
        first = outcome(self.frames(transport))
        # The fast path stops after the frame whose reply filled the buffer; Autobahn's parser,
        # fed a piece of the read at a time (PUBLIC_PIECE), after the piece that did.
        self.assertEqual(first, [PARSE_ERROR] if self.fast else [PARSE_ERROR] * 3)
        proto.onMessage = answer  # type: ignore[method-assign]
        transport.producer.resumeProducing()
        self.assertEqual(outcome(self.frames(transport)), [PARSE_ERROR] * 2 if self.fast else [])

    def test_a_long_read_is_parsed_on_only_when_the_buffer_drains_on_either_path(self) -> None:
        """More than one PUBLIC_PIECE of small messages with the buffer full after the first:
        neither path parses the whole read at once; the rest comes when it drains."""
        proto, transport, _ = self.open()
        answer = proto.onMessage
        count = PUBLIC_PIECE // len(GOOD) * 3
        seen: list[bytes] = []

        def answer_then_fill(payload: bytes, is_binary: bool) -> None:
            seen.append(payload)
            answer(payload, is_binary)
            transport.producer.pauseProducing()  # as Twisted does past bufferSize

        proto.onMessage = answer_then_fill  # type: ignore[method-assign]
        proto.dataReceived(GOOD * count)
        self.assertLess(len(seen), count)
        for _ in range(count):
            if transport.producerState != "paused":
                break
            transport.producer.resumeProducing()
        self.assertEqual(len(seen), count)
        self.assertEqual(transport.producerState, "producing")

    def test_a_lost_connection_gives_back_the_sessions_pause(self) -> None:
        proto, transport, child = self.open()
        transport.producer.pauseProducing()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(child.paused)


class FdReactor:
    """Just enough of IReactorFDSet for a tcp.Connection driven by hand, readers included."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, fd: Any) -> None:
        self.readers.add(fd)

    def removeReader(self, fd: Any) -> None:
        self.readers.discard(fd)

    def addWriter(self, fd: Any) -> None:
        self.writers.add(fd)

    def removeWriter(self, fd: Any) -> None:
        self.writers.discard(fd)


class SocketBackpressureTests(WebSocketTestCase):
    """A real TCP transport over a socketpair whose far end does not read until told to."""

    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=1024, maxErrors=None)

    def setUp(self) -> None:
        super().setUp()
        self.fds = FdReactor()
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.conn = SocketConnection(self.ours, proto, self.fds)
        self.conn.connected = True
        proto.makeConnection(self.conn)
        self.conn.startReading()
        proto.dataReceived(handshake(["mcp"]))
        self.proto, self.child = proto, self.reactor.spawned[-1]
        self.flush_to_peer()

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            chunks.append(chunk)

    def flush_to_peer(self) -> bytes:
        """The peer reads at last: the reactor's doWrite until nothing is buffered."""
        data = b""
        while self.conn in self.fds.writers:
            data += self.received()
            self.conn.doWrite()
        return data + self.received()

    def flood_until_paused(self, frame: bytes, limit: int = 200) -> int:
        """Reads of 500 frames each until the gateway stops reading; the number of reads."""
        for reads in range(1, limit + 1):
            self.proto.dataReceived(frame * 500)
            self.next_turns()
            if self.conn not in self.fds.readers:
                return reads
        self.fail("the gateway never stopped reading")

    def assert_paused_within_one_read(self) -> None:
        buffered = self.conn._tempDataLen + len(self.conn.dataBuffer)
        self.assertGreater(buffered, self.conn.bufferSize)
        # at most one read's replies past the high-water mark (500 replies of < 200 bytes)
        self.assertLess(buffered, self.conn.bufferSize + 500 * 200)
        self.assertTrue(self.child.paused)

    def test_parse_error_replies_pause_reading_then_resume(self) -> None:
        self.flood_until_paused(GARBAGE)
        self.assert_paused_within_one_read()
        replies = server_frames(self.flush_to_peer())
        self.assertEqual(set(outcome(replies)), {PARSE_ERROR})
        self.assertIn(self.conn, self.fds.readers)  # drained: reading again
        self.assertFalse(self.child.paused)

    def test_rate_limited_replies_pause_reading(self) -> None:
        self.ctx.limiter = MemoryRateLimiter(1, 60, self.reactor)
        self.flood_until_paused(GOOD)
        self.assert_paused_within_one_read()
        self.assertEqual(set(outcome(server_frames(self.flush_to_peer()))), {TOO_MANY_REQUESTS})
        self.assertIn(self.conn, self.fds.readers)

    def test_pongs_on_autobahns_path_pause_reading(self) -> None:
        self.flood_until_paused(client_frame(PING, b"p" * 125))
        self.assert_paused_within_one_read()
        replies = server_frames(self.flush_to_peer())
        self.assertEqual({(op, payload) for op, payload in replies}, {(PONG, b"p" * 125)})
        self.assertIn(self.conn, self.fds.readers)

    def test_the_childs_replies_pause_reading_too(self) -> None:
        lines = [json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                             "params": {"seq": i, "data": "z" * 20_000}}).encode() for i in range(60)]
        self.child.proto.outReceived(b"\n".join(lines) + b"\n")
        self.assertNotIn(self.conn, self.fds.readers)
        self.assertTrue(self.child.paused)
        frames = server_frames(self.flush_to_peer())
        # on the public path a reply over the client limit is a text frame and an empty continuation
        self.assertEqual([payload for op, payload in frames if op == TEXT], lines)
        self.assertIn(self.conn, self.fds.readers)
        self.assertFalse(self.child.paused)

    def count_messages(self) -> list[int]:
        """``[n]``: the messages the protocol handles from now on (a test sets n back to 0 per turn)."""
        handled = [0]
        answer = self.proto.onMessage

        def counted(payload: bytes, is_binary: bool) -> None:
            handled[0] += 1
            answer(payload, is_binary)

        self.proto.onMessage = counted  # type: ignore[method-assign]
        return handled

    def test_each_turn_answers_at_most_a_write_buffer_of_a_misaligned_flood(self) -> None:
        """Reads of 64 KiB (Twisted's read size) of 7-byte invalid frames, so most reads end inside
        a frame, and a peer whose kernel takes every reply: each turn of the reactor (a read, or
        the doWrite that drains the buffer and resumes) answers at most what takes the write
        buffer over the mark plus one piece of Autobahn's, never a whole read of 9,362 frames
        (the fast path once handed the read after a split frame to Autobahn whole: a 228 ms
        turn for tests/test_hostile_websocket.py's legitimate client to wait behind)."""
        read, reads = 65536, 6
        stream = (GARBAGE * (read * reads // len(GARBAGE) + 1))[:read * reads]
        handled = self.count_messages()
        turns: list[int] = []
        received: list[bytes] = []
        pos = 0
        while True:
            handled[0] = 0
            if self.conn in self.fds.readers and pos < len(stream) - len(GARBAGE):
                self.proto.dataReceived(stream[pos:pos + read])
                pos += read
            elif self.conn in self.fds.writers:
                received.append(self.received())
                self.conn.doWrite()  # drained: resumes, parses what the read left
            elif self.next_turn():
                pass  # the next turn: parses what the turn's message budget left
            else:
                break
            turns.append(handled[0])
        received.append(self.received())
        replies = b"".join(received)
        n = replies[1]
        first = replies[:2 + n] if n < 126 else replies[:4 + struct.unpack("!H", replies[2:4])[0]]
        self.assertEqual(outcome(server_frames(first)), [PARSE_ERROR])
        frames = read * reads // len(GARBAGE)  # every whole frame, once
        self.assertEqual(sum(turns), frames)
        self.assertEqual(replies, first * frames)
        self.assertLessEqual(max(turns), self.conn.bufferSize // len(first) + 1 + PUBLIC_PIECE // len(GARBAGE), turns)

    def test_each_turn_handles_at_most_its_budget_of_messages_nobody_answers(self) -> None:
        """Reads of 64 KiB of notifications for the child (1,170 a read, no reply to the client, so
        the write buffer never fills): each turn of the reactor handles at most MAX_TURN_MESSAGES
        of them (plus, on Autobahn's path, the rest of the piece it was parsing), the rest on the
        next turns, every one relayed to the child once and in order."""
        note = b'{"jsonrpc":"2.0","method":"notifications/x","params":{"n":%d}}'
        count = 65536 * 4 // len(client_frame(TEXT, note % 10000))
        stream = b"".join(client_frame(TEXT, note % (10000 + i)) for i in range(count))
        handled = self.count_messages()
        turns: list[int] = []
        pos = 0
        while True:
            handled[0] = 0
            if self.conn in self.fds.readers and pos < len(stream):
                self.proto.dataReceived(stream[pos:pos + 65536])
                pos += 65536
            elif not self.next_turn():
                break
            turns.append(handled[0])
        self.assertEqual(sum(turns), count)
        self.assertLessEqual(max(turns), MAX_TURN_MESSAGES + (0 if self.fast else PUBLIC_PIECE // len(GOOD)), turns)
        self.assertEqual(b"".join(self.child.written).splitlines(), [note % (10000 + i) for i in range(count)])
        self.assertIn(self.conn, self.fds.readers)
        self.assertEqual(self.flush_to_peer(), b"")

    def test_a_child_that_does_not_read_its_stdin_pauses_reading(self) -> None:
        """The child's stdin over its high-water mark (mcpgw.upstream.stdin: Twisted pauses the
        gate it registered on the pipe): the rest of the read waits, the socket is not read, until
        the pipe has drained; then every message reaches the child once, in order."""
        gate = self.child.proto.stdin_gate
        gate.pauseProducing()  # as Twisted's pipe writer does past its bufferSize
        notes = [b'{"jsonrpc":"2.0","method":"notifications/x","params":{"n":%d}}' % i for i in range(40)]
        self.proto.dataReceived(b"".join(client_frame(TEXT, n) for n in notes))
        self.next_turns()
        written = b"".join(self.child.written).splitlines()
        self.assertEqual(written, notes[:1] if self.fast else notes)  # Autobahn's path: a piece at a time
        if self.fast:
            self.assertNotIn(self.conn, self.fds.readers)
        gate.resumeProducing()  # drained
        self.assertEqual(b"".join(self.child.written).splitlines(), notes)
        self.assertIn(self.conn, self.fds.readers)
        gate.pauseProducing()
        self.proto.dataReceived(GOOD * 3)
        self.assertNotIn(self.conn, self.fds.readers)
        gate.stopProducing()  # the pipe closed: nothing to wait for
        self.assertIn(self.conn, self.fds.readers)
        self.assertEqual(len(b"".join(self.child.written).splitlines()), len(notes) + 3)

    def test_replies_to_one_read_leave_in_one_send(self) -> None:
        """Replies written while a read is parsed are buffered, not sent one system call each."""
        self.proto.dataReceived(GARBAGE * 3)
        self.assertIn(self.conn, self.fds.writers)
        self.assertEqual(self.received(), b"")
        self.assertEqual(outcome(server_frames(self.flush_to_peer())), [PARSE_ERROR] * 3)


class ErrorBudgetTests(WebSocketTestCase):
    """websocket.maxErrors (3 here) invalid messages in a row: 1008."""

    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=1024, maxErrors=3)

    def test_a_few_bad_messages_get_their_error_and_the_connection_goes_on(self) -> None:
        proto, transport, child = self.open()
        proto.dataReceived(GARBAGE + GARBAGE + GOOD + GARBAGE + GARBAGE + GOOD)
        self.assertEqual(outcome(self.frames(transport)), [PARSE_ERROR] * 4)
        self.assertEqual(len(b"".join(child.written).splitlines()), 2)
        self.assertEqual(proto.state, proto.STATE_OPEN)

    def test_the_budget_closes_1008_after_the_last_error_reply(self) -> None:
        proto, transport, child = self.open()
        autobahn = Recorder(proto)
        proto.dataReceived(GARBAGE * 3 + GOOD + GARBAGE * 50)
        self.assertEqual(outcome(self.frames(transport)), [PARSE_ERROR] * 3 + [("close", 1008)])
        self.assertEqual(child.written, [])  # the message after the third error is not read
        # nor handed to Autobahn (RFC 6455 section 7.1.7); on the public path Autobahn parsed the read
        self.assertEqual(autobahn.bytes, b"" if self.fast else GARBAGE * 3 + GOOD + GARBAGE * 50)
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(proto.connection.session.ended)

    def test_after_the_close_nothing_more_is_read(self) -> None:
        proto, transport, _ = self.open()
        autobahn = Recorder(proto)
        proto.dataReceived(GARBAGE * 3)
        transport.clear()
        proto.dataReceived(client_frame(CLOSE, struct.pack("!H", 1000)) + GARBAGE)
        self.assertEqual(autobahn.bytes, b"" if self.fast else GARBAGE * 3)
        self.assertEqual(transport.value(), b"")

    def test_the_closing_handshake_timeout_drops_the_peer(self) -> None:
        proto, transport, _ = self.open()
        proto.dataReceived(GARBAGE * 3)
        self.reactor.advance(proto.closeHandshakeTimeout)
        self.assertTrue(transport.disconnecting)

    def test_invalid_json_rpc_counts(self) -> None:
        proto, transport, _ = self.open()
        proto.dataReceived(client_frame(TEXT, b'{"id":1}') + client_frame(TEXT, b"[]") + client_frame(TEXT, b'"s"'))
        codes = outcome(self.frames(transport))
        self.assertEqual(codes[:3], [INVALID_REQUEST] * 3)
        self.assertEqual(codes[3:], [("close", 1008)])

    def test_application_pings_neither_count_nor_reset(self) -> None:
        proto, transport, _ = self.open()
        ping = client_frame(TEXT, b'{"type":"ping"}')
        proto.dataReceived(GARBAGE + ping + GARBAGE + ping)
        self.assertEqual(proto.state, proto.STATE_OPEN)
        proto.dataReceived(GARBAGE)
        frames = self.frames(transport)
        self.assertEqual(frames[1], (TEXT, b'{"type":"pong"}'))
        self.assertEqual(frames[-1][0], CLOSE)

    def test_fragmented_garbage_on_autobahns_path_counts(self) -> None:
        proto, transport, _ = self.open()
        fragmented = client_frame(TEXT, b"no", fin=False) + client_frame(CONT, b"pe")
        proto.dataReceived(fragmented * 3)
        self.assertEqual(outcome(self.frames(transport)), [PARSE_ERROR] * 3 + [("close", 1008)])
        self.assertEqual(transport.producerState, "paused")

    def test_refused_garbage_counts_and_refused_messages_do_not(self) -> None:
        """Over the rate limit a message gets a 429 whatever it holds; garbage still counts."""
        self.ctx.limiter = MemoryRateLimiter(1, 60, self.reactor)
        proto, transport, _ = self.open()
        proto.dataReceived(GOOD + GARBAGE + GARBAGE + GOOD * 5 + GARBAGE)
        self.assertEqual(proto.state, proto.STATE_OPEN)
        proto.dataReceived(GARBAGE + GARBAGE)
        self.assertEqual(outcome(self.frames(transport)), [TOO_MANY_REQUESTS] * 10 + [("close", 1008)])


class NoBudgetTests(WebSocketTestCase):
    websocket = WebSocketConfig(pingInterval=5, pingTimeout=2, maxMessageBytes=1024, maxErrors=None)

    def test_no_limit(self) -> None:
        proto, transport, _ = self.open()
        proto.dataReceived(GARBAGE * 1000)
        self.next_turns()
        self.assertEqual(outcome(self.frames(transport)), [PARSE_ERROR] * 1000)
        self.assertEqual(proto.state, proto.STATE_OPEN)


class ConfigTests(SynchronousTestCase):
    servers: ClassVar[dict[str, Any]] = {"fx": {"command": "python3"}}

    def websocket(self, **section: Any) -> WebSocketConfig:
        return parse({"mcpServers": self.servers, "websocket": section}).websocket

    def test_default_is_100(self) -> None:
        self.assertEqual(self.websocket().maxErrors, 100)

    def test_values(self) -> None:
        self.assertEqual(self.websocket(maxErrors=5).maxErrors, 5)
        self.assertIsNone(self.websocket(maxErrors=None).maxErrors)

    def test_bad_values_name_the_key(self) -> None:
        for bad in (0, -1, 1.5, "100", True):
            with self.assertRaises(ConfigError) as info:
                self.websocket(maxErrors=bad)
            self.assertEqual(info.exception.key, "websocket.maxErrors", bad)


class ProducerStatePublicTests(ProducerStateTests):
    fast = False


class SocketBackpressurePublicTests(SocketBackpressureTests):
    fast = False


class ErrorBudgetPublicTests(ErrorBudgetTests):
    fast = False


class NoBudgetPublicTests(NoBudgetTests):
    fast = False
