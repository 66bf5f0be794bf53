"""mcpgw.transports.sse (framing, live responses, keepalive, replay) and Streamable's lazy JSON/SSE choice.

Requests are real ``twisted.web.server.Request`` objects on a ``DummyChannel``
so headers, chunking and finish behave as on the wire; time is a ``Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from mcpgw.config import GatewayConfig, StdioServer
from mcpgw.metrics import NULL_BOUND
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import LARGE_EVENT, PING, Heartbeat, ReplayLog, SseResponse, frame, frame_parts
from mcpgw.transports.streamable import PostExchange, StreamableOutlet

INTERVAL = 15.0
RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}'
PROGRESS = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}}'


def make_request(method: bytes = b"POST") -> Request:
    channel = DummyChannel()
    request = Request(channel)
    request.testChannel = channel  # type: ignore[attr-defined]  # finish() drops request.channel
    request.method = method
    request.clientproto = b"HTTP/1.1"
    request.uri = request.path = b"/mcp"
    request.prepath, request.postpath = [b"mcp"], []
    return request


def wire(request: Request) -> bytes:
    return request.testChannel.transport.written.getvalue()  # type: ignore[attr-defined]


def body(request: Request) -> bytes:
    """The response body as the client reads it (de-chunked)."""
    raw = wire(request)
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    out = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return out


def header(request: Request, name: bytes) -> bytes | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1] if values else None


def client_gone(request: Request) -> None:
    request.connectionLost(Failure(ConnectionDone("client went away")))


class FrameTests(SynchronousTestCase):
    def test_dataOnly(self) -> None:
        """A bare event is one data line and a blank line."""
        self.assertEqual(frame(b'{"a":1}'), b'data: {"a":1}\n\n')

    def test_event(self) -> None:
        """A named event puts the event line before the data."""
        self.assertEqual(frame(b"/messages?sessionId=x", b"endpoint"), b"event: endpoint\ndata: /messages?sessionId=x\n\n")

    def test_allFields(self) -> None:
        """id, retry and event come in that order, then data."""
        self.assertEqual(frame(b"{}", b"message", id=b"3_7", retry=1000), b"id: 3_7\nretry: 1000\nevent: message\ndata: {}\n\n")

    def test_primingEvent(self) -> None:
        """The priming event is an id, a retry hint and empty data."""
        self.assertEqual(frame(b"", id=b"1_0", retry=500), b"id: 1_0\nretry: 500\ndata: \n\n")


class SseResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.heartbeat = Heartbeat(INTERVAL, Clock())
        self.request = make_request(b"GET")
        self.response = SseResponse(self.request, self.heartbeat)
        self.closed: list[SseResponse] = []
        self.response.on_close(self.closed.append)

    def test_headers(self) -> None:
        """The response is a 200 event stream that proxies must not buffer or transform."""
        self.assertEqual(self.request.code, 200)
        self.assertEqual(header(self.request, b"content-type"), b"text/event-stream")
        self.assertEqual(header(self.request, b"cache-control"), b"no-cache, no-transform")
        self.assertEqual(header(self.request, b"x-accel-buffering"), b"no")

    def test_writes(self) -> None:
        """Writes reach the client in order."""
        self.response.write(frame(b"1"))
        self.response.write_many([frame(b"2"), frame(b"3")])
        self.assertEqual(body(self.request), frame(b"1") + frame(b"2") + frame(b"3"))

    def test_writeEventSmall(self) -> None:
        """write_event frames a small event in one chunk, as frame() does."""
        self.response.write_event(RESULT, b"message")
        self.assertEqual(body(self.request), frame(RESULT, b"message"))
        self.assertEqual(wire(self.request).count(b"\r\n" + frame(RESULT, b"message") + b"\r\n"), 1)

    def test_writeEventLarge(self) -> None:
        """A large event is written as its pieces (its data not copied to frame it): the client
        reads the same bytes frame() would have made."""
        data = b'{"id":1,"result":"' + b"x" * LARGE_EVENT + b'"}'
        writes: list[bytes] = []
        real = self.request.write
        self.patch(self.request, "write", lambda chunk: (writes.append(chunk), real(chunk)))
        self.response.write_event(data, b"message")
        self.assertEqual(body(self.request), frame(data, b"message"))
        self.assertEqual(writes, frame_parts(data, b"message"))
        self.assertIs(writes[1], data)

    def test_noWriteEventAfterFinish(self) -> None:
        """write_event after finish() writes nothing."""
        self.response.finish()
        self.response.write_event(b"x" * LARGE_EVENT, b"message")
        self.assertEqual(body(self.request), b"")

    def test_noWriteAfterFinish(self) -> None:
        """After finish() further writes are dropped, and finish() twice finishes once."""
        self.response.write(frame(b"1"))
        self.response.finish()
        self.response.write(frame(b"2"))
        self.response.finish()
        self.assertEqual(body(self.request), frame(b"1"))
        self.assertTrue(self.request.finished)

    def test_noWriteAfterClientGone(self) -> None:
        """After the client went away writes are dropped."""
        client_gone(self.request)
        self.response.write(frame(b"late"))
        self.assertEqual(body(self.request), b"")

    def test_closeCallbacksOnFinish(self) -> None:
        """on_close callbacks run once when the gateway finishes the response."""
        self.response.finish()
        self.assertEqual(self.closed, [self.response])

    def test_closeCallbacksOnClientGone(self) -> None:
        """on_close callbacks run once when the client goes away, never again."""
        client_gone(self.request)
        self.response.finish()
        self.assertEqual(self.closed, [self.response])
        self.assertFalse(self.response.open)

    def test_producerPausedAndResumed(self) -> None:
        """The channel's pause and resume reach the producer (the session) registered with the response."""
        producer = CountingProducer()
        request = make_request(b"GET")
        SseResponse(request, self.heartbeat, producer=producer)
        request.producer.pauseProducing()
        self.assertEqual(producer.paused, 1)
        request.producer.resumeProducing()
        self.assertEqual(producer.paused, 0)

    def test_producerUnregisteredAtFinish(self) -> None:
        """finish() unregisters the producer from the request."""
        request = make_request(b"GET")
        response = SseResponse(request, self.heartbeat, producer=CountingProducer())
        response.finish()
        self.assertIsNone(request.producer)

    def test_pauseReleasedAtFinish(self) -> None:
        """A response finished while its channel had it paused releases its pause (the channel never resumes it)."""
        producer = CountingProducer()
        request = make_request(b"GET")
        response = SseResponse(request, self.heartbeat, producer=producer)
        request.producer.pauseProducing()
        response.finish()
        self.assertEqual(producer.paused, 0)

    def test_pauseReleasedWhenClientGone(self) -> None:
        """A paused response whose client goes away (stopProducing, then connectionLost) releases its pause."""
        producer = CountingProducer()
        request = make_request(b"GET")
        SseResponse(request, self.heartbeat, producer=producer)
        registered = request.producer
        registered.pauseProducing()
        registered.stopProducing()
        client_gone(request)
        self.assertEqual(producer.paused, 0)

    def test_sharedProducer(self) -> None:
        """Two responses sharing a session each hold at most one pause; closing one keeps the other's."""
        producer = CountingProducer()
        a, b = make_request(b"GET"), make_request(b"GET")
        response_a = SseResponse(a, self.heartbeat, producer=producer)
        SseResponse(b, self.heartbeat, producer=producer)
        a.producer.pauseProducing()
        a.producer.pauseProducing()
        b.producer.pauseProducing()
        self.assertEqual(producer.paused, 2)
        response_a.finish()
        self.assertEqual(producer.paused, 1)


    def test_noPauseAfterClose(self) -> None:
        """A pause that reaches a closed response is not passed on (nothing would resume it)."""
        producer = CountingProducer()
        request = make_request(b"GET")
        SseResponse(request, self.heartbeat, producer=producer)
        registered = request.producer
        client_gone(request)
        registered.pauseProducing()
        self.assertEqual(producer.paused, 0)


class CountingProducer:
    """A push producer that counts outstanding pauses, like Session."""

    def __init__(self) -> None:
        self.paused = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.paused -= 1

    def stopProducing(self) -> None:
        self.stopped += 1


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.heartbeat = Heartbeat(INTERVAL, self.clock)
        self.heartbeat.startService()
        self.addCleanup(self.heartbeat.stopService)
        self.request = make_request(b"GET")
        self.response = SseResponse(self.request, self.heartbeat)

    def test_noPingBeforeInterval(self) -> None:
        """Nothing is written before one whole interval has passed."""
        self.clock.advance(INTERVAL - 0.001)
        self.assertEqual(body(self.request), b"")

    def test_pingsAtInterval(self) -> None:
        """A ': ping' comment goes out once per interval."""
        self.clock.advance(INTERVAL)
        self.assertEqual(body(self.request), PING)
        self.clock.advance(INTERVAL)
        self.assertEqual(body(self.request), PING * 2)

    def test_pingIsComment(self) -> None:
        """The ping is an SSE comment line, which clients ignore."""
        self.assertEqual(PING, b": ping\n\n")

    def test_noPingAfterFinish(self) -> None:
        """A response the gateway finished gets no more pings and leaves the heartbeat."""
        self.clock.advance(INTERVAL)
        self.response.finish()
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(body(self.request), PING)
        self.assertEqual(len(self.heartbeat), 0)

    def test_noPingAfterClientGone(self) -> None:
        """A response whose client went away gets no more pings and leaves the heartbeat."""
        client_gone(self.request)
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(body(self.request), b"")
        self.assertEqual(len(self.heartbeat), 0)

    def test_oneTimerForAll(self) -> None:
        """Many responses share one timer."""
        others = [SseResponse(make_request(b"GET"), self.heartbeat) for _ in range(5)]
        self.assertEqual(len(self.heartbeat), 6)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual([body(r.request) for r in others], [PING] * 5)

    def test_failingWriteLogged(self) -> None:
        """A member whose write raises is logged and the others still get their ping."""

        class Broken:
            def keepalive(self) -> None:
                raise RuntimeError("boom")

        self.heartbeat.add(Broken())  # type: ignore[arg-type]
        self.clock.advance(INTERVAL)
        self.assertEqual(body(self.request), PING)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopService(self) -> None:
        """stopService stops the timer."""
        self.heartbeat.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReplayLogTests(SynchronousTestCase):
    def test_after(self) -> None:
        """after(seq) returns the events numbered above seq, in order."""
        log = ReplayLog(10)
        for seq in range(1, 6):
            log.append(seq, b"e%d" % seq)
        self.assertEqual(log.after(2), [b"e3", b"e4", b"e5"])

    def test_afterLatest(self) -> None:
        """Nothing is replayed after the latest event."""
        log = ReplayLog(10)
        log.append(1, b"e1")
        self.assertEqual(log.after(1), [])

    def test_bounded(self) -> None:
        """Only the last ``size`` events are kept; the oldest go first."""
        log = ReplayLog(3)
        for seq in range(1, 8):
            log.append(seq, b"e%d" % seq)
        self.assertEqual(log.after(0), [b"e5", b"e6", b"e7"])

    def test_sizeOne(self) -> None:
        """A log of size one keeps just the newest event."""
        log = ReplayLog(1)
        log.append(1, b"a")
        log.append(2, b"b")
        self.assertEqual(log.after(0), [b"b"])


# -- Streamable HTTP: the lazy JSON / SSE decision ----------------------------------


class FakeSession:
    """What a StreamableOutlet and its streams use of a Session."""

    id = "sid"
    metrics = NULL_BOUND

    def __init__(self, protocol_version: str | None = None):
        self.protocol_version = protocol_version
        self.routes: list[Any] = []

    def pending_routes(self) -> list[Any]:
        return list(self.routes)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class PostExchangeTests(SynchronousTestCase):
    protocol_version: str | None = "2025-06-18"

    def setUp(self) -> None:
        self.clock = Clock()
        self.heartbeat = Heartbeat(INTERVAL, self.clock)
        server = StdioServer(name="time", command="t", executable="/bin/t")
        config = GatewayConfig(servers={"time": server})
        ctx = GatewayContext(config=config, sessions=None, heartbeat=self.heartbeat, reactor=self.clock)  # type: ignore[arg-type]
        self.outlet = StreamableOutlet(FakeSession(self.protocol_version), ctx)  # type: ignore[arg-type]
        self.request = make_request()

    def exchange(self, ids: list[Any] | None = None, batch: bool = False) -> PostExchange:
        return PostExchange(self.outlet, self.request, [1] if ids is None else ids, batch)

    def test_finalResponseFirstIsJson(self) -> None:
        """If the first message is the final response, the reply is plain JSON with Content-Length."""
        self.exchange().answer(1, RESULT)
        self.assertEqual(self.request.code, 200)
        self.assertEqual(header(self.request, b"content-type"), b"application/json")
        self.assertEqual(header(self.request, b"content-length"), b"%d" % len(RESULT))
        self.assertIsNone(header(self.request, b"transfer-encoding"))
        self.assertEqual(body(self.request), RESULT)
        self.assertTrue(self.request.finished)

    def test_jsonLeavesHeartbeat(self) -> None:
        """A JSON reply takes the exchange out of the heartbeat."""
        self.exchange().answer(1, RESULT)
        self.assertEqual(len(self.heartbeat), 0)

    def test_notificationFirstIsSse(self) -> None:
        """A message before the response turns the reply into an event stream carrying it."""
        exchange = self.exchange()
        exchange.deliver(PROGRESS)
        self.assertEqual(header(self.request, b"content-type"), b"text/event-stream")
        self.assertIsNone(header(self.request, b"content-length"))
        self.assertEqual(body(self.request), frame(PROGRESS, id=b"1_1"))
        self.assertFalse(self.request.finished)

    def test_sseEndsWithResponse(self) -> None:
        """On a stream, the final response is the last event and ends the reply."""
        exchange = self.exchange()
        exchange.deliver(PROGRESS)
        exchange.answer(1, RESULT)
        self.assertEqual(body(self.request), frame(PROGRESS, id=b"1_1") + frame(RESULT, id=b"1_2"))
        self.assertTrue(self.request.finished)

    def test_oneKeepaliveStillUndecided(self) -> None:
        """One heartbeat tick (which may come at once) decides nothing: a quick answer is still JSON."""
        exchange = self.exchange()
        exchange.keepalive()
        self.assertFalse(self.request.startedWriting)
        self.assertIsNone(header(self.request, b"content-type"))
        exchange.answer(1, RESULT)
        self.assertEqual(header(self.request, b"content-type"), b"application/json")

    def test_twoKeepalivesSse(self) -> None:
        """A call still running at the second tick becomes an event stream; its answer is an event."""
        exchange = self.exchange()
        exchange.keepalive()
        exchange.keepalive()
        self.assertEqual(header(self.request, b"content-type"), b"text/event-stream")
        exchange.answer(1, RESULT)
        self.assertEqual(body(self.request), frame(RESULT, id=b"1_1"))
        self.assertTrue(self.request.finished)

    def test_heartbeatDrivesSwitch(self) -> None:
        """Driven by the Heartbeat's clock: undecided after one interval, SSE after two, then pinged."""
        self.heartbeat.startService()
        self.addCleanup(self.heartbeat.stopService)
        self.exchange()
        self.clock.advance(INTERVAL)
        self.assertIsNone(header(self.request, b"content-type"))
        self.clock.advance(INTERVAL)
        self.assertEqual(header(self.request, b"content-type"), b"text/event-stream")
        self.clock.advance(INTERVAL)
        self.assertTrue(body(self.request).endswith(PING))

    def test_batchAlwaysSse(self) -> None:
        """A batch is answered on a stream even when its only response comes first."""
        self.exchange([1], batch=True).answer(1, RESULT)
        self.assertEqual(header(self.request, b"content-type"), b"text/event-stream")
        self.assertEqual(body(self.request), frame(RESULT, id=b"1_1"))
        self.assertTrue(self.request.finished)

    def test_streamWaitsForEveryResponse(self) -> None:
        """A reply carrying several requests ends only after the last response."""
        exchange = self.exchange([1, 2], batch=True)
        exchange.answer(2, RESULT)
        self.assertFalse(self.request.finished)
        exchange.answer(1, RESULT)
        self.assertTrue(self.request.finished)

    def test_forgetLastEndsReply(self) -> None:
        """If the only request is cancelled, the reply ends (as an empty stream)."""
        self.exchange().forget(1)
        self.assertTrue(self.request.finished)
        self.assertEqual(body(self.request), b"")

    def test_clientGoneBeforeAnswer(self) -> None:
        """An answer after the client went away writes nothing and leaves the heartbeat."""
        exchange = self.exchange()
        client_gone(self.request)
        self.assertEqual(len(self.heartbeat), 0)
        exchange.answer(1, RESULT)
        self.assertEqual(wire(self.request), b"")


class PostExchangePrimingTests(PostExchangeTests):
    protocol_version = "2025-11-25"

    def test_twoKeepalivesSse(self) -> None:
        """From 2025-11-25 the switch to a stream sends the priming event (id and retry) at once."""
        exchange = self.exchange()
        exchange.keepalive()
        exchange.keepalive()
        self.assertEqual(body(self.request), frame(b"", id=b"1_0", retry=1000))
        exchange.answer(1, RESULT)
        self.assertEqual(body(self.request), frame(b"", id=b"1_0", retry=1000) + frame(RESULT, id=b"1_1"))

    def test_notificationFirstIsSse(self) -> None:
        """From 2025-11-25 the priming event precedes the first message."""
        self.exchange().deliver(PROGRESS)
        self.assertEqual(body(self.request), frame(b"", id=b"1_0", retry=1000) + frame(PROGRESS, id=b"1_1"))

    def test_sseEndsWithResponse(self) -> None:
        """From 2025-11-25 too, the final response ends the stream."""
        exchange = self.exchange()
        exchange.deliver(PROGRESS)
        exchange.answer(1, RESULT)
        self.assertTrue(body(self.request).endswith(frame(RESULT, id=b"1_2")))
        self.assertTrue(self.request.finished)

    def test_batchAlwaysSse(self) -> None:
        """From 2025-11-25 a batch stream is primed, then carries the response."""
        self.exchange([1], batch=True).answer(1, RESULT)
        self.assertEqual(body(self.request), frame(b"", id=b"1_0", retry=1000) + frame(RESULT, id=b"1_1"))

    def test_forgetLastEndsReply(self) -> None:
        """From 2025-11-25 a cancelled-only reply is a primed, then ended, stream."""
        self.exchange().forget(1)
        self.assertTrue(self.request.finished)
        self.assertEqual(body(self.request), frame(b"", id=b"1_0", retry=1000))
