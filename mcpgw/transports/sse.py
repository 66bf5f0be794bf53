"""Server-Sent Events on twisted.web: framing, live responses, keepalive, replay logs."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request

from mcpgw import logs
from mcpgw.metrics import NULL_BOUND, BoundMetrics

PING = b": ping\n\n"


#: Events whose data is at least this long are written in pieces (SseResponse.write_event), not framed.
LARGE_EVENT = 64 * 1024


def frame(data: bytes, event: bytes | None = None, id: bytes | None = None, retry: int | None = None) -> bytes:
    """One SSE event. ``data`` must hold no newline (JSON lines from a child never do).

    One join: ``data`` (up to ``maxMessageBytes``) is copied once."""
    return b"".join(frame_parts(data, event, id, retry))


def frame_parts(data: bytes, event: bytes | None = None, id: bytes | None = None, retry: int | None = None) -> list[bytes]:
    """``frame()`` as [fields and ``data: ``, data, blank line]: what it joins."""
    head = b"data: "
    if event is not None:
        head = b"event: " + event + b"\n" + head
    if retry is not None:
        head = b"retry: %d\n" % retry + head
    if id is not None:
        head = b"id: " + id + b"\n" + head
    return [head, data, b"\n\n"]


class _PauseShare:
    """One response's share in pausing a producer that many responses share (the session).

    HTTPChannel never resumes a producer it has dropped (the response finished,
    or the client went away, while paused), so the response holds at most one
    pause and gives it back itself when it closes.
    """

    def __init__(self, producer: Any):
        self._producer = producer
        self.paused = False
        self.released = False

    def pauseProducing(self) -> None:
        if not (self.paused or self.released):
            self.paused = True
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        """This response's connection is going away (not the session): release its pause."""
        self.resumeProducing()

    def release(self) -> None:
        """The response is over: give back any pause and ignore later ones."""
        self.released = True
        self.resumeProducing()


class SseResponse:
    """A live HTTP response that carries SSE events until either side ends it.

    Never writes after finish; the ``closed`` callbacks run exactly once,
    whether the client went away or the gateway finished the response.
    """

    def __init__(self, request: Request, heartbeat: Heartbeat, producer: Any = None, metrics: BoundMetrics = NULL_BOUND):
        self.request = request
        self.open = True
        #: Counts this response in active connections while open, and the events written to it.
        self._metrics = metrics
        metrics.connection_opened()
        self._heartbeat = heartbeat
        self._on_close: list[Callable[[SseResponse], None]] = []
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")
        self._pause = _PauseShare(producer) if producer is not None else None
        if self._pause is not None:
            request.registerProducer(self._pause, True)
        heartbeat.add(self)
        request.notifyFinish().addBoth(self._gone)
        # Status line and headers now, not with the first event: a client
        # waits for them before it counts the stream as open.
        request.write(b"")

    def on_close(self, callback: Callable[[SseResponse], None]) -> None:
        self._on_close.append(callback)

    def write(self, data: bytes) -> None:
        """Write one event (``frame()``)."""
        if self.open:
            self.request.write(data)
            self._metrics.sse_events()

    def write_event(self, data: bytes, event: bytes | None = None) -> None:
        """Write one event of ``data``; a large one in pieces, so its data is not copied to frame it
        (twisted.web sends each piece as an HTTP chunk; the transport joins them once)."""
        if not self.open:
            return
        if len(data) < LARGE_EVENT:
            self.request.write(frame(data, event))
        else:
            for part in frame_parts(data, event):
                self.request.write(part)
        self._metrics.sse_events()

    def keepalive(self) -> None:
        if self.open:
            self.request.write(PING)

    def write_many(self, chunks: Iterable[bytes]) -> None:
        """Write several events at once (a replay)."""
        if self.open:
            chunks = list(chunks)
            data = b"".join(chunks)
            if data:
                self.request.write(data)
                self._metrics.sse_events(len(chunks))

    def finish(self) -> None:
        """End the response from the gateway's side."""
        if self.open:
            self._closed()
            if self.request.producer is not None:
                self.request.unregisterProducer()
            self.request.finish()

    def _gone(self, _: Any) -> None:
        if self.open:
            self._closed()

    def _closed(self) -> None:
        self.open = False
        self._metrics.connection_closed()
        self._heartbeat.discard(self)
        if self._pause is not None:
            self._pause.release()
        callbacks, self._on_close = self._on_close, []
        for cb in callbacks:
            cb(self)


class KeepAlive(Protocol):
    """A Heartbeat member."""

    def keepalive(self) -> None: ...


class Heartbeat(Service):
    """One timer for every open SSE response: a ``: ping`` comment per interval.

    Members are anything with ``keepalive()``: SseResponse writes the ping; a
    Streamable POST still waiting for its answer turns into a stream.

    A paused channel only notices a vanished peer on its next write, and
    proxies close idle streams; one LoopingCall for all streams keeps the
    per-stream cost at a set entry.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, interval: float, clock: Any):
        self.interval = interval
        self._clock = clock
        self._responses: set[KeepAlive] = set()
        self._loop: LoopingCall | None = None

    def add(self, response: KeepAlive) -> None:
        self._responses.add(response)

    def discard(self, response: KeepAlive) -> None:
        self._responses.discard(response)

    def __len__(self) -> int:
        return len(self._responses)

    def tick(self) -> None:
        for member in list(self._responses):
            try:
                member.keepalive()
            except Exception:  # noqa: BLE001 - one member's failure must not stop the others' pings
                self.log.failure("keepalive failed")

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(lambda f: self.log.failure("heartbeat stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class ReplayLog:
    """The last ``size`` events of one stream, for ``Last-Event-ID`` replay."""

    def __init__(self, size: int):
        self._events: deque[tuple[int, bytes]] = deque(maxlen=size)

    def append(self, seq: int, event: bytes) -> None:
        self._events.append((seq, event))

    def after(self, seq: int) -> list[bytes]:
        return [event for s, event in self._events if s > seq]
