"""The gateway's HTTP/1.1 connection: a request head and body bounded in size and in time,
pipelining bounded, the Guard's checks run on the head, and every connection accounted for.

nginx, Envoy and hypercorn are the bar:

- the whole request head must arrive within ``limits.headerTimeout`` (not reset by each byte, so
  a client sending one byte every few seconds is closed: slowloris), the body within
  ``limits.bodyTimeout``; 408 and close;
- a head is routed and its Guard (Host, Origin, authentication, rate limit) decides before a byte
  of the body is read: a refused request is answered and its body never accepted (the connection
  closes after a short lingering drain, so the client reads the answer instead of a reset);
- a ``Content-Length`` over ``maxBodyBytes`` is 413 before the body is read, a chunked body is cut
  the moment it passes the limit; bodies are kept in memory only (the limit is small enough);
- a client that pipelines requests without reading the answers gets at most
  ``limits.maxPipelined`` of them answered per turn, and none while the socket's write buffer is
  full: reading pauses until the answers have gone out;
- obs-folded header lines (RFC 9112 section 5.2) are 400 and close;
- ``Connections`` caps connections per site and per peer address, and when descriptors run low
  closes the connections that have not sent a complete request head, oldest first.

Every access to a Twisted private attribute of ``HTTPChannel`` is in this module, marked
"Twisted private".
"""

from __future__ import annotations

import os
import resource as _rlimit
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel, _MalformedChunkedDataError, _parseRequestLine
from twisted.web.iweb import INonQueuedRequestFactory

from mcpgw import jsonrpc, logs

#: What twisted.web reads ahead of a request still being answered (HTTPChannel._optimisticEagerReadSize).
EAGER_READ = 0x4000
#: How long a refused request's connection keeps reading (and dropping) what the client still sends,
#: so that the client gets to read the answer rather than a reset (nginx's lingering close).
LINGER_SECONDS = 2.0
#: After ``loseConnection``, how long a peer that reads nothing may hold the connection.
ABORT_SECONDS = 5.0
#: Descriptor pressure: above this share of RLIMIT_NOFILE, connections without a complete head are shed.
PRESSURE_SHARE = 0.8

# Why reading is paused (bits of _ReadGate._holds).
_TRANSPORT = 1  # HTTPChannel itself (the transport's write buffer is full)
_BUFFERED = 2  # a request is being answered and the next one's bytes are already buffered
_PIPELINE = 4  # pipelined requests wait until earlier answers have gone out
_VERDICT = 8  # the Guard's rate limiter has not answered yet

# Where a connection's current request is.
_WAIT = 0  # no byte of a request head yet
_HEAD = 1  # part of a head
_BODY = 2  # the head is complete, the body is coming
_BUSY = 3  # the request is being answered
_GONE = 4  # closed, refused, or taken over (a WebSocket)

_log = Logger(namespace="mcpgw.channel", observer=logs.observer)

#: A head check's verdict for a request that may go on (``site.head_received``: a resource's
#: ``head_guard.check(request)`` returns it, or the body of its refusal, or a Deferred of either).
ADMIT = object()

#: Twisted private: the name-mangled line state of HTTPChannel.lineReceived (Twisted 24.3-26.10),
#: which GatewayChannel._line_received keeps; without it, the public override runs instead.
_LINE_STATE = all(hasattr(HTTPChannel, name) for name in ("_HTTPChannel__first_line", "_HTTPChannel__header"))

#: Twisted private: a plain TCP transport's send buffers (FileDescriptor.dataBuffer, offset,
#: _tempDataLen) and its socket, read to send a whole response at once when nothing is queued
#: before it (GatewayChannel.write). MCPGW_FAST_PATHS=0 turns it off.
_WRITE_THROUGH = os.environ.get("MCPGW_FAST_PATHS", "1") != "0" and all(
    hasattr(tcp.Server, name) for name in ("dataBuffer", "offset", "connected", "disconnecting", "_writeDisconnected"))


@attrs.frozen
class ChannelLimits:
    """What one connection may send (``maxBodyBytes`` and ``limits.*``)."""

    max_header_bytes: int = 16384
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_pipelined: int = 16


class _ReadGate:
    """The transport as HTTPChannel's network producer: reading runs only while nobody holds it.

    HTTPChannel pauses and resumes its transport from several places with no memory of why
    (twisted.web lets a client that never reads pipeline without bound); each reason here is a
    bit, and the transport reads again once every reason is released.
    """

    __slots__ = ("_producer", "_holds")

    def __init__(self, producer: Any):
        self._producer = producer
        self._holds = 0

    def hold(self, reason: int) -> None:
        if not self._holds:
            self._producer.pauseProducing()
        self._holds |= reason

    def release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds:
                self._producer.resumeProducing()

    def release_all(self) -> None:
        if self._holds:
            self._holds = 0
            self._producer.resumeProducing()

    @property
    def held(self) -> int:
        return self._holds

    # IPushProducer, as HTTPChannel calls it
    def pauseProducing(self) -> None:
        self.hold(_TRANSPORT)

    def resumeProducing(self) -> None:
        self.release(_TRANSPORT)

    def stopProducing(self) -> None:
        self._producer.stopProducing()

    # IConsumer, as HTTPChannel calls it
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._producer.unregisterProducer()


def _raw_reply(status: bytes, message: str | None, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer written by the channel itself (no request to render it): a
    JSON-RPC error body like every other refusal of the gateway, and ``Connection: close``."""
    body = jsonrpc.error_bytes(None, jsonrpc.INVALID_REQUEST, message) if message else b""
    head = b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n" + extra
    if body:
        head += b"Content-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class GatewayChannel(HTTPChannel):
    """HTTPChannel with the limits above. Built by ``mcpgw.web.GatewaySite``, which gives it
    ``site.limits`` (ChannelLimits), ``site.connections`` (Connections) and
    ``site.head_received(request, method, uri, version)`` (routes the head and runs its Guard)."""

    _phase = _WAIT
    _deadline: Any = None
    _abort_call: Any = None
    _linger_call: Any = None
    _replay_call: Any = None
    #: The request whose body is being read (None between bodies).
    _body_request: Any = None
    #: The request was answered without its body: what the client still sends is dropped.
    _discarding = False
    _discarded = 0
    #: Close with a lingering drain rather than at once (a request answered without its body).
    _linger_after = False
    #: A chunked body passed the limit inside the transfer decoder; cut it once the decoder returns.
    _cut_body = False
    #: Bytes of later requests buffered while one is answered.
    _buffered = 0
    #: Requests answered in a row from already buffered input (pipelining without reading).
    _pipelined = 0
    _tracked = False
    _ip = "local"
    #: While no complete request head is in: when this connection began waiting for one (Connections.serial).
    waiting_since: int | None = None
    #: A request has been answered on this connection (Connections sheds these last).
    kept_alive = False
    #: The response head written by writeHeaders and not sent yet (it goes out with the body).
    _head: list[bytes] | None = None
    #: The transport is a plain TCP connection whose socket may be written directly (_WRITE_THROUGH).
    _through = False
    _host_address: Any = None
    _peer_address: Any = None

    # -- connection --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        self._limits: ChannelLimits = site.limits
        self._connections: Connections = site.connections
        self.totalHeadersSize = self._limits.max_header_bytes
        # Twisted private: _networkProducer is what HTTPChannel pauses and resumes reading with.
        self._gate = _ReadGate(self._networkProducer)
        self._networkProducer = self._gate
        self._socket = self.transport  # kept for the accounting when a WebSocket takes the transport over
        transport = self.transport
        self._through = _WRITE_THROUGH and type(transport) is tcp.Server and hasattr(transport, "_tempDataLen") \
            and hasattr(transport, "socket")
        self._ip = getattr(self.getPeer(), "host", None) or "local"
        refusal = self._connections.opened(self, self._ip, _fileno(self.transport))
        if refusal is not None:
            self._refuse_connection(refusal)
            return
        self._tracked = True
        self._deadline = self.callLater(self._limits.header_timeout, self._head_late)

    def connectionLost(self, reason: Any) -> None:
        self._phase = _GONE
        self._cancel_calls()
        if self._tracked:
            self._tracked = False
            self._connections.closed(self)
        super().connectionLost(reason)

    def taken_over(self) -> None:
        """A WebSocket upgrade took the transport over (Autobahn sets ``channel.transport`` to
        None): this channel sees nothing more of it, the accounting follows the socket."""
        self._phase = _GONE
        self._cancel_calls()
        if self._tracked:
            self._tracked = False
            self._connections.upgraded(self, self._socket)

    def _cancel_calls(self) -> None:
        for name in ("_deadline", "_abort_call", "_linger_call", "_replay_call"):
            call = getattr(self, name)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    # -- addresses ---------------------------------------------------------------------------

    def getHost(self) -> Any:
        """The connection's local address, asked of the socket once (Request.__init__ asks per
        request, and a TCP transport makes a getsockname call each time)."""
        if self._host_address is None:
            self._host_address = self.transport.getHost()
        return self._host_address

    def getPeer(self) -> Any:
        if self._peer_address is None:
            self._peer_address = self.transport.getPeer()
        return self._peer_address

    # -- writing -----------------------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """HTTPChannel.writeHeaders, except that the head waits for the body's first bytes (or for
        the end of Request.write) and goes out with them."""
        if not self._through:
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._head = head

    def write(self, data: bytes) -> None:
        """Response bytes (a body of known length; a chunked body comes by writeSequence). When
        nothing is queued before them they are sent at once, with the head: the reactor's write
        cycle (two epoll_ctl calls and a doWrite) is for what the socket does not take."""
        head = self._head
        if head is not None:
            self._head = None
            head.append(data)
            data = b"".join(head)
        transport = self.transport
        if self._through and transport is not None and not transport._tempDataLen \
                and transport.offset == len(transport.dataBuffer) and transport.connected \
                and not transport.disconnecting and not transport._writeDisconnected:
            try:
                sent = transport.socket.send(data)
            except OSError:  # EAGAIN, or an error the transport's own write path meets and reports
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        head = self._head
        if head is not None:
            self._head = None
            iovec = head + list(iovec)
        self.transport.writeSequence(iovec)

    def flush_head(self) -> None:
        """GatewayRequest.write: a head written without body bytes (an SSE stream's start) goes now."""
        head = self._head
        if head is not None:
            self._head = None
            self.transport.writeSequence(head)

    # -- reading -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > self._limits.max_body_bytes and not self.transport.disconnecting:
                # Enough dropped: stop reading and let the linger end it. (Closing now would
                # reset the connection, and a reset throws away the answer the client has not read.)
                self._gate.hold(_PIPELINE)
            return
        if self._phase == _WAIT and data:
            self._phase = _HEAD
        self.resetTimeout()  # HTTPChannel.dataReceived, without its frame
        LineReceiver.dataReceived(self, data)
        # One timer per phase, armed only when a head or body spans reads (most arrive whole).
        if self._deadline is None and not self.paused:
            if self._phase == _HEAD:
                self._deadline = self.callLater(self._limits.header_timeout, self._head_late)
            elif self._phase == _BODY:
                self._deadline = self.callLater(self._limits.body_timeout, self._body_late)

    def _line_received_checked(self, line: bytes) -> None:
        """Fallback when HTTPChannel's private line state is not what _line_received expects: the
        obs-fold check in front of Twisted's own lineReceived (a frame more per line)."""
        if line and line[0] in (0x20, 0x09):
            self._respondToBadRequestAndDisconnect()  # Twisted private: 400 and close
            return
        HTTPChannel.lineReceived(self, line)

    def _line_received(self, line: bytes) -> None:
        """HTTPChannel.lineReceived of Twisted 24.3-26.10 (its name-mangled state probed in
        _LINE_STATE), except that a continuation line (obs-fold, RFC 9112 section 5.2: a server MUST
        reject it or replace it; an Authorization folded over two lines is not one the gateway
        guesses at) is 400 and close. The check sits where Twisted joins continuation lines, so the
        other lines pay nothing for it."""
        self._receivedHeaderSize += len(line)
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._respondToBadRequestAndDisconnect()
            return
        if self._HTTPChannel__first_line:
            if not self.persistent:
                self.dataReceived = self.lineReceived = lambda *args: None
                return
            if not line and self._HTTPChannel__first_line == 1:
                self._HTTPChannel__first_line = 2  # one empty line before a request is tolerated
                return
            if INonQueuedRequestFactory.providedBy(self.requestFactory):
                request = self.requestFactory(self)
            else:
                request = self.requestFactory(self, len(self.requests))
            self.requests.append(request)
            self._HTTPChannel__first_line = 0
            try:
                self._command, self._path, self._version = _parseRequestLine(line)
            except ValueError:
                self._respondToBadRequestAndDisconnect()
        elif line == b"":
            header = self._HTTPChannel__header
            if header and not self.headerReceived(header):
                return  # answered 400
            self._HTTPChannel__header = b""
            self.allHeadersReceived()
            if self.length == 0:
                self.allContentReceived()
            else:
                self.setRawMode()
        elif line[0] in b" \t":
            self._respondToBadRequestAndDisconnect()
        else:
            header = self._HTTPChannel__header
            if header:
                self.headerReceived(header)
            self._HTTPChannel__header = line

    lineReceived = _line_received if _LINE_STATE else _line_received_checked

    def allHeadersReceived(self) -> None:
        """HTTPChannel.allHeadersReceived (persistence, length, 100-continue), with the head
        routed and its Guard asked before any byte of the body is read."""
        self._end_phase(_BODY if self.length != 0 else _BUSY)  # (before the Guard: an answer may end the request)
        request = self.requests[-1]
        request.parseCookies()
        # Twisted private: _command, _path, _version are the request line HTTPChannel parsed.
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        request.max_body = self._limits.max_body_bytes
        pending = self.site.head_received(request, self._command, self._path, self._version)
        if self.length == 0:
            return  # no body to hold back; the Guard answers (or waits for its limiter) in render
        self._body_request = request
        if pending is not None:
            # The rate limiter answers later: read none of the body until it has.
            self._gate.hold(_VERDICT)
            pending.addCallback(self._decided, request)
            pending.addErrback(lambda f: _log.failure("head decision failed", f))
            return
        if request.head_reply is None and (self.length is None or self.length <= self._limits.max_body_bytes):
            if request.requestHeaders.getRawHeaders(b"expect"):
                self._invite_body(request)
            return
        self._admit_body(request, in_head=True)

    def _decided(self, verdict: Any, request: Any) -> Any:
        self._gate.release(_VERDICT)
        if self._body_request is request and self._phase == _BODY:
            self._admit_body(request, in_head=False)
        return verdict

    def _admit_body(self, request: Any, in_head: bool) -> None:
        """The head passed (or not) the Guard: refuse an oversized declared body, or invite the body."""
        limit = self._limits.max_body_bytes
        if request.head_reply is None and self.length is not None and self.length > limit:
            request.refuse_too_large(self.length, limit)
        if request.head_reply is not None:
            self._answer_without_body(request, in_head)
            return
        self._invite_body(request)

    def _invite_body(self, request: Any) -> None:
        """``Expect: 100-continue`` is answered only once the head is admitted (RFC 9110 section 10.1.1)."""
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1":
            self._send100Continue()  # Twisted private: writes "HTTP/1.1 100 Continue"

    def body_too_large(self, request: Any) -> None:
        """GatewayRequest.handleContentChunk: a chunked body just passed ``maxBodyBytes``."""
        request.refuse_too_large(None, self._limits.max_body_bytes)
        self._close_after(request)
        self._cut_body = True

    def _close_after(self, request: Any) -> None:
        self.persistent = False
        self._linger_after = True
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def _answer_without_body(self, request: Any, in_head: bool) -> None:
        """Answer ``request`` now with what its head earned; nothing more of its body is read."""
        self._close_after(request)
        self._transferDecoder = None  # Twisted private: the body's transfer decoder
        self._discarding = True
        if in_head:
            self.length = 0  # HTTPChannel.lineReceived calls allContentReceived next
        else:
            self.allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        """HTTPChannel.rawDataReceived: a body to its transfer decoder, or later requests' bytes
        buffered while one is answered (bounded here)."""
        if self._discarding:
            return
        # Twisted private: _handlingRequest, _dataBuffer (input buffered while a request is answered).
        if self._handlingRequest:
            # HTTPChannel stops reading past 16 KiB only while its write buffer has room; a
            # client that neither reads nor stops sending was buffered without bound.
            self._dataBuffer.append(data)
            self._buffered += len(data)
            if self._buffered > EAGER_READ:
                self._gate.hold(_BUFFERED)
            return
        try:
            self._transferDecoder.dataReceived(data)  # Twisted private: the body's transfer decoder
        except _MalformedChunkedDataError:
            self._respondToBadRequestAndDisconnect()
            return
        if self._cut_body:
            self._cut_body = False
            if not self._handlingRequest and self._body_request is not None:
                self._answer_without_body(self._body_request, in_head=False)
            else:
                self._discarding = True

    def _all_content_received(self) -> None:
        """HTTPChannel.allContentReceived of Twisted 24.3-26.10 (its name-mangled line state
        probed in _LINE_STATE), with the body's deadline ended: the request is handled."""
        self._body_request = None
        self._end_phase(_BUSY)
        command, path, version = self._command, self._path, self._version
        self.length = 0
        self._receivedHeaderCount = 0
        self._receivedHeaderSize = 0
        self._HTTPChannel__first_line = 1
        self._transferDecoder = None
        del self._command, self._path, self._version
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)  # no idle timeout while the answer is made
        self._handlingRequest = True
        self.setRawMode()  # later requests' bytes are buffered until requestDone
        self.requests[-1].requestReceived(command, path, version)

    def _all_content_received_public(self) -> None:
        self._body_request = None
        self._end_phase(_BUSY)
        HTTPChannel.allContentReceived(self)

    allContentReceived = _all_content_received if _LINE_STATE else _all_content_received_public

    def requestDone(self, request: Any) -> None:
        """HTTPChannel.requestDone, except that buffered pipelined input is parsed only while the
        client takes the answers (the write buffer has room), ``maxPipelined`` requests a turn."""
        if request is not self.requests[0]:
            raise TypeError
        del self.requests[0]
        gate = self._gate
        gate.release(_BUFFERED)
        if not self.persistent:
            self.loseConnection()
            return
        self._handlingRequest = False  # Twisted private
        if self._savedTimeOut:  # Twisted private: the idle timeout, off while a request is answered
            self.setTimeout(self._savedTimeOut)
        self._phase = _WAIT
        connections = self._connections
        connections.serial += 1
        self.waiting_since = connections.serial
        self.kept_alive = True
        self._buffered = 0
        data = b"".join(self._dataBuffer) if self._dataBuffer else b""
        self._dataBuffer = []
        # Twisted private: LineReceiver._buffer holds what arrived with this request and is not parsed yet.
        if not data and not self._buffer:
            self._pipelined = 0
            self.setLineMode()
            return
        self._pipelined += 1
        # Twisted private: _waitingForTransport is true while the transport's write buffer is full.
        if self._waitingForTransport or self._pipelined >= self._limits.max_pipelined:
            # LineReceiver parses nothing while ``paused``: the bytes wait in its buffer.
            self.paused = True
            gate.hold(_PIPELINE)
            if not self._waitingForTransport:
                self._replay_call = self.callLater(0, self._replay)
        self.setLineMode(data)

    def _replay(self) -> None:
        """Parse the pipelined requests held back, now that earlier answers have gone out."""
        self._replay_call = None
        if self._waitingForTransport or self._phase == _GONE:
            return  # resumeProducing calls again once the write buffer has drained
        self._pipelined = 0
        self.paused = False
        self._gate.release(_PIPELINE)
        if self._phase == _WAIT:
            self._phase = _HEAD
        self.dataReceived(b"")

    def resumeProducing(self) -> None:
        """The transport's write buffer drained."""
        super().resumeProducing()
        self._gate.release(_TRANSPORT)
        if self.paused and self._replay_call is None and self._phase != _GONE:
            self._replay_call = self.callLater(0, self._replay)

    def _end_phase(self, phase: int) -> None:
        self.waiting_since = None
        self._phase = phase
        call = self._deadline
        if call is not None:
            self._deadline = None
            if call.active():
                call.cancel()

    # -- timeouts, refusals, closing -----------------------------------------------------------

    def _head_late(self) -> None:
        self._deadline = None
        if self._phase == _HEAD:
            message = f"request head not received within limits.headerTimeout ({self._limits.header_timeout:g} s)"
            self.transport.write(_raw_reply(b"408 Request Timeout", message))
        self._close_soon()  # a connection that sent nothing is closed without a word

    def _body_late(self) -> None:
        self._deadline = None
        if self._phase == _BODY:
            message = f"request body not received within limits.bodyTimeout ({self._limits.body_timeout:g} s)"
            self.transport.write(_raw_reply(b"408 Request Timeout", message))
            self._close_soon()

    def shed(self) -> None:
        """Descriptors run low and this connection has no complete request head: close it."""
        if self._phase == _HEAD:
            self.transport.write(_raw_reply(b"503 Service Unavailable",
                                            "Service Unavailable: the gateway is short of connections",
                                            b"Retry-After: 1\r\n"))
        self._close_soon()

    def _refuse_connection(self, reason: str) -> None:
        """Over a connection cap: 503 at once, then a lingering close (or an immediate one when
        descriptors are short)."""
        self._phase = _GONE
        self._cancel_calls()
        self.setTimeout(None)
        self.transport.write(_raw_reply(b"503 Service Unavailable", f"Service Unavailable: {reason}",
                                        b"Retry-After: 1\r\n"))
        if reason == DESCRIPTORS:
            self._close_soon()
        else:
            self._discarding = True
            self._start_linger()

    def loseConnection(self) -> None:
        if self._linger_after and self._linger_call is None and self.transport is not None:
            self._start_linger()
            return
        super().loseConnection()

    def _start_linger(self) -> None:
        """Half-close after the answer, drop what the client still sends for a while, then close:
        a client still sending its body reads the answer instead of a reset."""
        self._discarding = True
        self.setTimeout(None)
        self._gate.release_all()
        self._gate.unregisterProducer()
        self._linger_call = self.callLater(LINGER_SECONDS, self._close_now)
        try:
            self.transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            self.transport.loseConnection()

    def _close_soon(self) -> None:
        """loseConnection, and an abort if the peer does not take the last bytes."""
        self._phase = _GONE
        transport = self.transport
        if transport is None:
            return
        self._gate.unregisterProducer()
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.callLater(ABORT_SECONDS, self._close_now)

    def _close_now(self) -> None:
        self._linger_call = self._abort_call = None
        self._phase = _GONE
        if self.transport is not None:
            self.transport.abortConnection()


def _fileno(transport: Any) -> int | None:
    try:
        return transport.fileno()
    except Exception:  # noqa: BLE001 - a transport without a descriptor of its own (TLS over a wrapper, memory)
        return None


def open_descriptors(fallback: int) -> int:
    """Descriptors this process holds (/proc/self/fd on Linux; ``fallback`` elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:
        return fallback


DESCRIPTORS = "too many open connections (descriptors are short)"


class Connections:
    """The open connections of one site: ``limits.maxConnections``, ``limits.maxConnectionsPerIp``
    (keyed by the peer address: behind a proxy every client is the proxy, so leave it 0 there), and
    descriptor pressure.

    Each new connection's descriptor number is checked against 80 % of RLIMIT_NOFILE (the kernel
    gives the lowest free number, so a high one means few are free: no syscall per connection).
    Past that mark the connections that have not completed a request head (slow heads, idle
    keep-alive connections), oldest first, are closed to bring the count back under the mark; a
    reserve of descriptors above it stays for clients that send a request promptly and for the
    children's pipes. A new connection that would eat into the reserve is answered 503 and closed.
    Requests being answered, SSE streams and WebSockets are never shed.
    """

    def __init__(self, clock: Any, max_connections: int = 0, max_per_ip: int = 0, nofile: int | None = None,
                 descriptors: Any = None):
        self._clock = clock
        #: How many descriptors are open (given the new one's number): /proc/self/fd by default.
        self._descriptors = descriptors or open_descriptors
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        if nofile is None:
            soft = _rlimit.getrlimit(_rlimit.RLIMIT_NOFILE)[0]
            nofile = soft if soft != _rlimit.RLIM_INFINITY else 1 << 20
        self.nofile = nofile
        self.pressure_at = int(nofile * PRESSURE_SHARE)
        #: Descriptors kept free for prompt clients and children: a new connection past them is refused.
        self.reserve = max(8, nofile // 20)
        self.count = 0
        self._per_ip: dict[str, int] = {}
        #: Every counted connection. The ones without a complete request head have a
        #: ``waiting_since`` (a serial number, set by the channel): the smallest has waited longest.
        self._open: set[Any] = set()
        self.serial = 0
        #: WebSockets: the transport and its address, counted until the socket is seen closed.
        self._upgraded: dict[Any, str] = {}
        self.shed_total = 0
        self.refused_total = 0
        self._last_warning = float("-inf")

    # -- what channels report ----------------------------------------------------------------

    def opened(self, channel: Any, ip: str, fd: int | None) -> str | None:
        """Count a new connection; the reason it is refused, or None."""
        refusal = None
        if fd is not None and fd >= self.pressure_at:
            refusal = self._relieve(fd)
        if refusal is None and self.max_connections and self.count >= self.max_connections:
            self._prune_upgraded()
            if self.count >= self.max_connections:
                refusal = f"too many connections (limits.maxConnections {self.max_connections})"
        if refusal is None and self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            self._prune_upgraded()
            if self._per_ip.get(ip, 0) >= self.max_per_ip:
                refusal = f"too many connections from your address (limits.maxConnectionsPerIp {self.max_per_ip})"
        if refusal is not None:
            self.refused_total += 1
            self._warn(refusal)
            return refusal
        self.count += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._open.add(channel)
        self.serial += 1
        channel.waiting_since = self.serial
        return None

    def closed(self, channel: Any) -> None:
        self._open.discard(channel)
        self._forget(channel._ip)

    def waiting(self, channel: Any) -> None:
        """``channel`` answered a request and waits for the next head: the youngest in line, and
        shed only after every connection that has not completed a request. (GatewayChannel does
        the same inline, once per request.)"""
        self.serial += 1
        channel.waiting_since = self.serial
        channel.kept_alive = True

    @staticmethod
    def head_complete(channel: Any) -> None:
        channel.waiting_since = None

    def upgraded(self, channel: Any, transport: Any) -> None:
        self._open.discard(channel)
        self._upgraded[transport] = channel._ip

    # -- limits ------------------------------------------------------------------------------

    def _forget(self, ip: str) -> None:
        self.count -= 1
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def _prune_upgraded(self) -> None:
        """Drop the WebSockets whose socket has closed (their end is not reported here)."""
        for transport, ip in list(self._upgraded.items()):
            if not getattr(transport, "connected", False):
                del self._upgraded[transport]
                self._forget(ip)

    def _relieve(self, fd: int) -> str | None:
        """Descriptors are past the mark: shed waiting connections, oldest first, back under it."""
        in_use = self._descriptors(fd + 1)
        excess = in_use - self.pressure_at
        if excess <= 0:
            return None
        self._prune_upgraded()
        # A kept-alive connection, idle between a client's requests, goes after every connection
        # that never completed a request (nginx, too, closes idle keep-alive connections last):
        # a client whose request crosses the close would see it fail.
        waiting = [channel for channel in self._open if channel.waiting_since is not None]
        waiting.sort(key=lambda channel: (getattr(channel, "kept_alive", False), channel.waiting_since))
        victims = waiting[:excess]
        for channel in victims:
            channel.waiting_since = None
            channel.shed()
        self.shed_total += len(victims)
        if victims:
            self._warn(f"descriptors short ({in_use} of {self.nofile} open): closed {len(victims)} "
                       "connection(s) without a complete request head")
        if in_use - len(victims) >= self.nofile - self.reserve:
            return DESCRIPTORS
        return None

    def _warn(self, what: str) -> None:
        """One line per 10 s at most: an attack must not also flood the log."""
        now = self._clock.seconds()
        if now - self._last_warning >= 10:
            self._last_warning = now
            _log.warn("connections: {what} (shed so far: {shed}, refused: {refused})", what=what,
                      shed=self.shed_total, refused=self.refused_total)
