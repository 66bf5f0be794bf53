"""The gateway's HTTP wire in process: raw request bytes in, raw response bytes out, on a Clock.

``Harness(config)`` builds the gateway through its public API, ``mcpgw.Gateway.from_config(config,
reactor=...)``, on a ``FakeProcessReactor`` (a ``twisted.internet.task.Clock`` that spawns children
in memory, each played by a ``FakeMcpServer``), starts its service, and serves the site the gateway
built as a listening port would: ``gateway.site.buildProtocol(address)`` on a transport that keeps
what is written. So limits, Host and Origin checks, pipelining, status codes and SSE framing are
the production channel's and resources'; only the sockets and the child processes are stand-ins.

Nothing runs by itself. Bytes a test sends are read by the channel at once (in 64 KiB reads, and
not while the channel has paused its transport, as a socket's reads); what the gateway schedules
for "now" (a child's answer, a connection's close) runs when the harness pumps, which every call
here does. Time moves only when the harness is asked to wait: ``advance(seconds)``,
``run_until(predicate, timeout)``, or an HTTP client reading a response that is not there yet. It
then jumps from one scheduled call to the next (keepalive ticks, a child's timer, a channel's
timeout), never sleeping, up to the virtual ``timeout``.

Three ways in:

- raw: ``exchange(data)`` (one connection: the bytes sent, everything answered until the gateway
  closes it), or ``connect()`` for a ``Connection`` to drive by hand (``send``, ``received``,
  ``closed``, ``hang_up``);
- HTTP: ``client()`` is an ``httpx.Client`` whose transport (``HttpTransport``) writes each
  request as HTTP/1.1 bytes on a new connection and parses the raw answer (``ResponseParser``);
  streamed bodies arrive as the gateway writes them, so SSE tests read events one by one;
- ``open_sse(path)`` holds a legacy ``GET /sse`` stream open and keeps everything it receives.

``child_pids()``, ``alive(pid)``, ``log()``, ``port`` and ``url`` stand for what the twistd layer
(tests/gateway_process.py) reads from a real process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import httpx
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mcpgw import Gateway
from tests.fake_process import UNREAL_PID, FakeMcpServer, FakeProcessReactor, FakeProcessTransport

HOST = "127.0.0.1"
#: The port the gateway is said to listen on (its Host checks see ``127.0.0.1:PORT``).
PORT = 3000
#: What one socket read hands the channel at most (twisted.internet.tcp reads 64 KiB at a time).
READ_SIZE = 65536
#: A response read for longer than this (virtual seconds) is a hang: the read fails.
STREAM_LIMIT = 120.0


class SocketTransport(StringTransport):
    """A StringTransport that ends like a TCP connection: after ``loseConnection`` or
    ``abortConnection`` (or the client hanging up) the protocol's ``connectionLost`` comes on the
    reactor's next turn, after its registered producer is stopped, as
    ``twisted.internet.abstract.FileDescriptor.connectionLost`` does."""

    def __init__(self, clock: FakeProcessReactor, host: IPv4Address, peer: IPv4Address):
        super().__init__(hostAddress=host, peerAddress=peer)
        self.clock = clock
        self.protocol: Any = None
        #: connectionLost has been delivered.
        self.lost = False
        self.lost_reason: Any = None

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.clock.callLater(0, self.connection_lost, error.ConnectionDone("closed by the gateway"))

    def abortConnection(self) -> None:
        self.disconnected = True
        if not self.disconnecting:
            self.disconnecting = True
            self.clock.callLater(0, self.connection_lost, error.ConnectionAborted("aborted by the gateway"))

    def connection_lost(self, reason: Exception) -> None:
        if self.lost:
            return
        self.lost = True
        self.lost_reason = reason
        self.connected = False
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason))


class Connection:
    """One client connection to the gateway's site."""

    def __init__(self, harness: Harness, peer_port: int):
        self.harness = harness
        peer = IPv4Address("TCP", HOST, peer_port)
        self.transport = SocketTransport(harness.clock, IPv4Address("TCP", HOST, harness.port), peer)
        self.channel = harness.gateway.site.buildProtocol(peer)
        self.transport.protocol = self.channel
        self._inbox = bytearray()
        self.channel.makeConnection(self.transport)

    @property
    def received(self) -> bytes:
        """Every byte the gateway has written on this connection."""
        return self.transport.value()

    @property
    def closed(self) -> bool:
        """The gateway closed the connection (or it was hung up)."""
        return self.transport.disconnecting or self.transport.lost

    def send(self, data: bytes) -> None:
        """Bytes from the client; the channel reads them as a socket would, then the reactor is pumped."""
        self._inbox += data
        self.harness.pump()

    def deliver(self) -> bool:
        """Hand queued bytes to the channel while it reads; whether any were handed."""
        moved = False
        transport = self.transport
        while self._inbox and not transport.disconnecting and not transport.lost \
                and transport.producerState == "producing":
            chunk = bytes(self._inbox[:READ_SIZE])
            del self._inbox[:READ_SIZE]
            self.channel.dataReceived(chunk)
            moved = True
        return moved

    def hang_up(self, clean: bool = True) -> None:
        """The client closes its end (``clean``) or the connection breaks; then the reactor is pumped."""
        if not self.transport.lost:
            self.transport.disconnecting = True
            reason = error.ConnectionDone("client closed") if clean else error.ConnectionLost("client went away")
            self.transport.connection_lost(reason)
        self.harness.pump()


class Harness:
    """One gateway in process (see the module docstring)."""

    host = HOST
    port = PORT
    url = f"http://{HOST}:{PORT}"

    def __init__(self, config: Mapping[str, Any], program: Callable[..., Any] = FakeMcpServer):
        self.clock = FakeProcessReactor(program=program, first_pid=UNREAL_PID)
        self._events: list[dict[str, Any]] = []
        # A plain function taking an event is an ILogObserver to Twisted; the cast says so to mypy.
        self._observer = cast(ILogObserver, self._events.append)
        globalLogPublisher.addObserver(self._observer)
        self.connections: list[Connection] = []
        self._next_peer_port = 40000
        try:
            self.gateway = Gateway.from_config({"host": HOST, "port": PORT, **config}, reactor=self.clock)
            self.gateway.start()
        except BaseException:
            globalLogPublisher.removeObserver(self._observer)
            raise
        self.pump()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(check=exc[0] is None)

    # -- connections ---------------------------------------------------------------

    def connect(self) -> Connection:
        conn = Connection(self, self._next_peer_port)
        self._next_peer_port += 1
        self.connections.append(conn)
        self.pump()
        return conn

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send ``data`` on a new connection; everything answered until the gateway closes it (or
        ``timeout`` virtual seconds pass), then the client hangs up. (tests/wire.py's raw_http.)"""
        conn = self.connect()
        conn.send(data)
        self.run_until(lambda: conn.closed, timeout)
        conn.hang_up()
        return conn.received

    def client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client on this gateway that sends only the headers a test gives (no default
        ``Accept: */*``); ``timeout``: virtual seconds a read may wait."""
        client = httpx.Client(transport=HttpTransport(self), base_url=self.url, timeout=timeout)
        del client.headers["accept"]
        return client

    def open_sse(self, path: str = "/sse", headers: Mapping[str, str] | None = None) -> SseConnection:
        return SseConnection(self, path, headers)

    # -- time ----------------------------------------------------------------------

    def _next_call_time(self) -> float | None:
        calls = self.clock.getDelayedCalls()
        return min(c.getTime() for c in calls) if calls else None

    def pump(self) -> None:
        """Run everything due now: bytes waiting for the channel, calls scheduled for now."""
        while True:
            moved = False
            for conn in list(self.connections):
                moved = conn.deliver() or moved
                if conn.transport.lost:
                    self.connections.remove(conn)
            due = self._next_call_time()
            if due is not None and due <= self.clock.seconds():
                self.clock.advance(0)
                moved = True
            if not moved:
                return

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Let virtual time pass, one scheduled call after another, until ``predicate()`` holds or
        ``timeout`` seconds have passed; whether it holds."""
        deadline = self.clock.seconds() + timeout
        self.pump()
        while not predicate():
            due = self._next_call_time()
            now = self.clock.seconds()
            if due is None or due > deadline:
                if deadline > now:
                    self.clock.advance(deadline - now)
                    self.pump()
                return predicate()
            self.clock.advance(max(0.0, due - now))
            self.pump()
        return True

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (every call due in them runs, in order)."""
        self.run_until(lambda: False, seconds)

    # -- what a process would show -------------------------------------------------

    def children(self) -> list[FakeProcessTransport]:
        """The children that have not exited."""
        return [t for t in self.clock.spawned if t.pid is not None]

    def child_pids(self) -> list[int]:
        return [t.pid for t in self.children() if t.pid is not None]

    def alive(self, pid: int) -> bool:
        return pid in self.child_pids()

    def program(self, pid: int) -> FakeMcpServer:
        """What plays child ``pid`` (its FakeMcpServer: what it received, whether it exited)."""
        [program] = [t.program for t in self.clock.spawned
                     if isinstance(t.program, FakeMcpServer) and t.program.pid == pid]
        return program

    def log(self) -> str:
        """The log so far, one formatted event a line (with tracebacks of failures)."""
        lines = []
        for event in self._events:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            lines.append(text)
        return "\n".join(lines) + "\n"

    # -- the end -------------------------------------------------------------------

    def close(self, check: bool = True) -> None:
        """Hang up every connection and stop the gateway; with ``check``, every child must have
        exited when its Deferred fires (within the stop grace, in virtual time)."""
        try:
            for conn in list(self.connections):
                conn.hang_up(clean=False)
            stopped: list[Any] = []
            self.gateway.stop().addBoth(stopped.append)
            self.run_until(lambda: bool(stopped), 60.0)
            if check:
                assert stopped == [None], stopped
                assert self.child_pids() == [], f"children left after stop: {self.child_pids()}"
        finally:
            globalLogPublisher.removeObserver(self._observer)


# -- HTTP over a Connection -------------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\r\n]*))?")


class ResponseParser:
    """One HTTP/1.1 response, parsed as its bytes arrive: head, then a body framed by
    Transfer-Encoding: chunked, Content-Length, or the connection's end; none for HEAD, 1xx,
    204 and 304. A framing error raises ValueError (the gateway wrote a malformed response)."""

    def __init__(self, method: str):
        self.method = method.upper()
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self._buf = bytearray()
        self._body = bytearray()
        self._mode = ""
        self._left = 0
        #: Bytes after the end of this response (the next pipelined one's).
        self.rest = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def feed(self, data: bytes) -> None:
        if self.complete:
            self.rest += data
            return
        self._buf += data
        if not self.head_done:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = bytes(self._buf[:end]), self._buf[end + 4:]
            self._head(head)
        self._parse_body()

    def _head(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        m = _STATUS_LINE.fullmatch(status_line)
        if m is None:
            raise ValueError(f"not an HTTP status line: {status_line!r}")
        self.status = int(m.group(3))
        self.reason = (m.group(4) or b"").decode("latin-1")
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError(f"malformed header line: {line!r}")
            self.headers.append((name, value.strip()))
        self.head_done = True
        encoding = (self.header(b"transfer-encoding") or b"").lower()
        length = self.header(b"content-length")
        if self.method == "HEAD" or self.status < 200 or self.status in (204, 304):
            self._mode = "none"
        elif encoding == b"chunked":
            self._mode = "chunked"
        elif length is not None:
            self._mode, self._left = "length", int(length)
        else:
            self._mode = "close"

    def _parse_body(self) -> None:
        if self._mode == "none":
            self._done()
        elif self._mode == "length":
            take = bytes(self._buf[:self._left])
            del self._buf[:self._left]
            self._body += take
            self._left -= len(take)
            if self._left == 0:
                self._done()
        elif self._mode == "close":
            self._body += self._buf
            self._buf.clear()
        else:
            self._parse_chunks()

    def _parse_chunks(self) -> None:
        while True:
            if self._left > 0:  # inside a chunk: its data, then CRLF
                if len(self._buf) < self._left + 2:
                    return
                if self._buf[self._left:self._left + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                self._body += self._buf[:self._left]
                del self._buf[:self._left + 2]
                self._left = 0
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            size_line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
            size = int(size_line, 16)
            if size:
                del self._buf[:end + 2]
                self._left = size
                continue
            trailer_end = self._buf.find(b"\r\n\r\n", end)  # "0\r\n" then trailers, then CRLF
            if self._buf[end:end + 4] == b"\r\n\r\n":
                trailer_end = end
            if trailer_end < 0:
                return
            del self._buf[:trailer_end + 4]
            self._done()
            return

    def _done(self) -> None:
        self.complete = True
        self.rest, self._buf = bytes(self._buf), bytearray()

    def eof(self) -> None:
        """The connection ended: the end of a body framed by it."""
        if self._mode == "close" and not self.complete:
            self._done()

    def take_body(self) -> bytes:
        """The body bytes parsed since the last call."""
        data, self._body = bytes(self._body), bytearray()
        return data


def parse_responses(data: bytes, method: str = "GET") -> list[ResponseParser]:
    """Every whole response in ``data`` (pipelined answers), and a last incomplete one if any."""
    out = []
    while data:
        parser = ResponseParser(method)
        parser.feed(data)
        parser.eof()
        out.append(parser)
        if not parser.complete:
            break
        data = parser.rest
    return out


class _Reader:
    """Feeds a connection's new bytes to a ResponseParser."""

    def __init__(self, conn: Connection, parser: ResponseParser):
        self.conn = conn
        self.parser = parser
        self._offset = 0

    def poll(self) -> None:
        data = self.conn.received
        if len(data) > self._offset:
            self.parser.feed(data[self._offset:])
            self._offset = len(data)
        if self.conn.closed:
            self.parser.eof()


class _Body(httpx.SyncByteStream):
    """A response body as the gateway writes it; reading waits (in virtual time) for more."""

    def __init__(self, harness: Harness, reader: _Reader, request: httpx.Request, timeout: float):
        self.harness = harness
        self.reader = reader
        self.request = request
        self.timeout = timeout
        self._started = harness.clock.seconds()

    def __iter__(self) -> Iterator[bytes]:
        parser = self.reader.parser
        while True:
            self.reader.poll()
            chunk = parser.take_body()
            if chunk:
                yield chunk
                continue
            if parser.complete:
                return
            if self.reader.conn.closed:
                raise httpx.RemoteProtocolError("the gateway closed the connection in the middle of the body",
                                                request=self.request)
            if self.harness.clock.seconds() - self._started > STREAM_LIMIT:
                raise httpx.ReadTimeout(f"a response still open after {STREAM_LIMIT} virtual seconds",
                                        request=self.request)

            def more() -> bool:
                self.reader.poll()
                return bool(parser._body) or parser.complete or self.reader.conn.closed

            if not self.harness.run_until(more, self.timeout):
                raise httpx.ReadTimeout(f"nothing read for {self.timeout} virtual seconds", request=self.request)

    def close(self) -> None:
        """The client is done with the response: a whole one leaves a connection to close cleanly,
        a partial one is a client going away."""
        self.reader.poll()
        self.reader.conn.hang_up(clean=self.reader.parser.complete)


class HttpTransport(httpx.BaseTransport):
    """httpx's transport onto the harness: each request as HTTP/1.1 bytes on a new Connection
    (the headers httpx would send, in its order), the answer parsed from the raw bytes."""

    def __init__(self, harness: Harness):
        self.harness = harness

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = (request.extensions.get("timeout") or {}).get("read") or 10.0
        target = request.url.raw_path
        lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), target)]
        lines += [b"%s: %s" % (name, value) for name, value in request.headers.raw]
        body = request.read()
        conn = self.harness.connect()
        conn.send(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        reader = _Reader(conn, ResponseParser(request.method))

        def head() -> bool:
            reader.poll()
            return reader.parser.head_done or conn.closed

        if not self.harness.run_until(head, timeout):
            conn.hang_up(clean=False)
            raise httpx.ReadTimeout(f"no response head in {timeout} virtual seconds", request=request)
        if not reader.parser.head_done:
            raise httpx.RemoteProtocolError(f"the gateway closed the connection without a response: {conn.received!r}",
                                            request=request)
        parser = reader.parser
        return httpx.Response(parser.status, headers=parser.headers,
                              stream=_Body(self.harness, reader, request, timeout),
                              extensions={"http_version": b"HTTP/1.1",
                                          "reason_phrase": parser.reason.encode("latin-1")},
                              request=request)


class SseConnection:
    """A legacy ``GET /sse`` held open (tests/wire.py's RawSseStream): ``endpoint`` is the announced
    message URI, ``received`` what the stream carried since the last ``clear()``."""

    def __init__(self, harness: Harness, path: str = "/sse", headers: Mapping[str, str] | None = None):
        self.harness = harness
        self.conn = harness.connect()
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.conn.send(b"GET %s HTTP/1.1\r\nhost: %s:%d\r\naccept: text/event-stream\r\n%s\r\n"
                       % (path.encode(), HOST.encode(), harness.port, extra))
        self._mark = 0
        pattern = re.compile(rb"event: endpoint\r?\ndata: ([^\r\n]+)\r?\n\r?\n")
        if not harness.run_until(lambda: pattern.search(self.conn.received) is not None, 10.0):
            raise AssertionError(f"no endpoint event on {path}: {self.conn.received!r}")
        m = pattern.search(self.conn.received)
        assert m is not None
        self.endpoint = m.group(1).decode()

    @property
    def received(self) -> bytes:
        return self.conn.received[self._mark:]

    def clear(self) -> None:
        self._mark = len(self.conn.received)

    def close(self) -> None:
        self.conn.hang_up(clean=True)
