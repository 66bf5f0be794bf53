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
- ``mcpgw.connections.Connections`` caps connections per site and per peer address, and when
  descriptors run low closes the connections that have not sent a complete request head.

This module uses HTTPChannel's public methods and attributes only. What it gains from Twisted's
private state (a copy of its line parser, a response written straight to the socket) is in
``mcpgw._fast.web``, chosen per connection when the channel is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MethodType
from typing import Any, Protocol

import attrs
from twisted.internet import interfaces, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from mcpgw import logs
from mcpgw._fast import web as _fast_web
from mcpgw.connections import DESCRIPTORS, Connections, drop_unread, fileno, raw_reply
from mcpgw.readgate import BUFFERED, PIPELINE, TRANSPORT, VERDICT, NoProducer, ReadGate

__all__ = ["ADMIT", "ChannelLimits", "Connections", "GatewayChannel"]

#: What is read ahead of a request still being answered (twisted.web's HTTPChannel reads as much).
EAGER_READ = 0x4000
#: How long a refused request's connection keeps reading (and dropping) what the client still sends,
#: so that the client gets to read the answer rather than a reset (nginx's lingering close).
LINGER_SECONDS = 2.0
#: After ``loseConnection``, how long a peer that reads nothing may hold the connection.
ABORT_SECONDS = 5.0

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


@attrs.frozen
class ChannelLimits:
    """What one connection may send (``maxBodyBytes`` and ``limits.*``)."""

    max_header_bytes: int = 16384
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_pipelined: int = 16


class _Site(Protocol):
    """What GatewayChannel asks of its site (``mcpgw.web.GatewaySite``)."""

    limits: ChannelLimits
    connections: Connections

    def head_received(self, request: Any, method: bytes, uri: bytes, version: bytes) -> Any: ...


class GatewayChannel(HTTPChannel):
    """HTTPChannel with the limits above. Built by ``mcpgw.web.GatewaySite``, which gives it
    ``site.limits`` (ChannelLimits), ``site.connections`` (Connections) and
    ``site.head_received(request, method, uri, version)`` (routes the head and runs its Guard)."""

    site: _Site
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
    #: A request is being answered (from its last body byte to requestDone; HTTPChannel's own flag is private).
    _answering = False
    #: The transport's write buffer is full (between its pauseProducing and resumeProducing).
    _write_full = False
    #: Bytes of later requests buffered while one is answered, and their length.
    _held: list[bytes]
    _buffered = 0
    #: requestDone is in HTTPChannel.requestDone: what it hands to setLineMode is kept in _replayed.
    _replaying = False
    _replayed = b""
    #: Requests answered in a row from already buffered input (pipelining without reading).
    _pipelined = 0
    #: (method, target, version) of the request being read.
    request_line: Sequence[bytes] = ()
    #: The next line is a request line (public parsing: its own record of where HTTPChannel is).
    _line_due = True
    _tracked = False
    _ip = "local"
    #: While no complete request head is in: when this connection began waiting for one (Connections.serial).
    waiting_since: int | None = None
    #: A request has been answered on this connection (Connections sheds these last).
    kept_alive = False
    #: The response head written by writeHeaders and not sent yet (it goes out with the body).
    _head: list[bytes] | None = None
    #: Responses may be written straight to the socket (mcpgw._fast.web.send).
    _through = False
    _host_address: Any = None
    _peer_address: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._held = []
        #: Requests are parsed by mcpgw._fast.web's copy of HTTPChannel's parser (decided now, so
        #: that mcpgw._fast.configure before the site is built takes effect).
        self._fast_parse = _fast_web.parsing()
        if self._fast_parse:
            # LineReceiver calls lineReceived for every head line: straight to the copy, no hop.
            self.lineReceived = MethodType(_fast_web.line_received, self)  # type: ignore[method-assign]

    # -- connection --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        self._limits: ChannelLimits = site.limits
        self._connections: Connections = site.connections
        self.totalHeadersSize = self._limits.max_header_bytes
        transport = self.transport
        self._gate = ReadGate(interfaces.IPushProducer(transport, NoProducer()))
        self._socket = transport  # kept for the accounting when a WebSocket takes the transport over
        self._through = _fast_web.writes_through(transport)
        peer = self.getPeer()
        # A peer without an IP address (a UNIX socket's) is counted as "local".
        self._ip = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) and peer.host else "local"
        refusal = self._connections.opened(self, self._ip, fileno(transport))
        if refusal is not None:
            self._refuse_connection(refusal)
            return
        self._tracked = True
        self._deadline = self.callLater(self._limits.header_timeout, self._head_late)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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

    def _tcp(self) -> tcp.Connection:
        """The transport: a TCP connection (or what stands in for one: TLS, a test's StringTransport)."""
        transport: tcp.Connection = self.transport  # type: ignore[assignment]
        return transport

    def _cancel_calls(self) -> None:
        calls = (self._deadline, self._abort_call, self._linger_call, self._replay_call)
        self._deadline = self._abort_call = self._linger_call = self._replay_call = None
        for call in calls:
            if call is not None and call.active():
                call.cancel()

    # -- addresses ---------------------------------------------------------------------------

    def getHost(self) -> Any:
        """The connection's local address, asked of the socket once (Request.__init__ asks per
        request, and a TCP transport makes a getsockname call each time)."""
        if self._host_address is None:
            self._host_address = self._tcp().getHost()
        return self._host_address

    def getPeer(self) -> Any:
        if self._peer_address is None:
            self._peer_address = self._tcp().getPeer()
        return self._peer_address

    # -- writing -----------------------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """HTTPChannel.writeHeaders, except that (writing through) the head waits for the body's
        first bytes (or for the end of Request.write) and goes out with them."""
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
        """Response bytes (a body of known length; a chunked body comes by writeSequence). Writing
        through, they are sent at once with the head when nothing is queued before them: the
        reactor's write cycle (two epoll_ctl calls and a doWrite) is for what the socket does not take."""
        head = self._head
        if head is not None:
            self._head = None
            head.append(data)
            data = b"".join(head)
        transport: tcp.Connection = self.transport  # type: ignore[assignment]
        if self._through and transport is not None:
            data = _fast_web.send(transport, data)
            if not data:
                return
        transport.write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        head = self._head
        if head is not None:
            self._head = None
            iovec = head + list(iovec)
        self._tcp().writeSequence(iovec)

    def flush_head(self) -> None:
        """GatewayRequest.write: a head written without body bytes (an SSE stream's start) goes now."""
        head = self._head
        if head is not None:
            self._head = None
            self._tcp().writeSequence(head)

    # -- reading -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > self._limits.max_body_bytes and not self._tcp().disconnecting:
                # Enough dropped: stop reading and let the linger end it. (Closing now would
                # reset the connection, and a reset throws away the answer the client has not read.)
                self._gate.hold(PIPELINE)
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

    def lineReceived(self, line: bytes) -> None:
        """HTTPChannel.lineReceived, except that a continuation line (obs-fold, RFC 9112 section
        5.2: a server MUST reject it or replace it; an Authorization folded over two lines is not
        one the gateway guesses at) is 400 and close."""
        if self._fast_parse:
            _fast_web.line_received(self, line)
            return
        if line and line[0] in (0x20, 0x09):
            self.bad_request()
            return
        if self._line_due and line:
            self._line_due = False
            self.request_line = line.split(b" ")  # (HTTPChannel refuses any other shape with a 400)
        HTTPChannel.lineReceived(self, line)

    def bad_request(self) -> None:
        """HTTPChannel's answer to a malformed request (a bare 400), and close."""
        self._tcp().write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        """HTTPChannel.allHeadersReceived (persistence, length, 100-continue), with the head
        routed and its Guard asked before any byte of the body is read."""
        self._end_phase(_BODY if self.length != 0 else _BUSY)  # (before the Guard: an answer may end the request)
        request = self.requests[-1]
        request.parseCookies()
        method, uri, version = self.request_line
        self.persistent = self.checkPersistence(request, version)
        request.gotLength(self.length)
        request.max_body = self._limits.max_body_bytes
        pending = self.site.head_received(request, method, uri, version)
        if self.length == 0:
            return  # no body to hold back; the Guard answers (or waits for its limiter) in render
        self._body_request = request
        if pending is not None:
            # The rate limiter answers later: read none of the body until it has.
            self._gate.hold(VERDICT)
            pending.addCallback(self._decided, request)
            pending.addErrback(lambda f: _log.failure("head decision failed", f))
            return
        if request.head_reply is None and (self.length is None or self.length <= self._limits.max_body_bytes):
            if request.requestHeaders.getRawHeaders(b"expect"):
                self._invite_body(request)
            return
        self._admit_body(request, in_head=True)

    def _decided(self, verdict: Any, request: Any) -> Any:
        self._gate.release(VERDICT)
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
        if expect and expect[0].lower() == b"100-continue" and self.request_line[2] == b"HTTP/1.1":
            self._tcp().write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
        """Answer ``request`` now with what its head earned; nothing more of its body is read
        (allContentReceived lets go of the body's transfer decoder)."""
        self._close_after(request)
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
        if self._answering:
            # HTTPChannel stops reading past 16 KiB only while its write buffer has room; a
            # client that neither reads nor stops sending was buffered without bound.
            self._held.append(data)
            self._buffered += len(data)
            if self._buffered > EAGER_READ:
                self._gate.hold(BUFFERED)
            return
        if self._fast_parse:
            _fast_web.body_received(self, data)
        else:
            HTTPChannel.rawDataReceived(self, data)
        if self._cut_body:
            self._cut_body = False
            if self._discarding or self._tcp().disconnecting:
                return  # answered 400 (a malformed chunk after the cut), or closing
            if not self._answering and self._body_request is not None:
                self._answer_without_body(self._body_request, in_head=False)
            else:
                self._discarding = True

    def allContentReceived(self) -> None:
        """HTTPChannel.allContentReceived, with the body's deadline ended: the request is handled."""
        self._body_request = None
        self._end_phase(_BUSY)
        self._answering = True
        if self._fast_parse:
            _fast_web.all_content_received(self)
        else:
            self._line_due = True
            HTTPChannel.allContentReceived(self)

    def setLineMode(self, extra: bytes = b"") -> Any:
        if self._replaying:
            self._replayed = extra  # parsed by requestDone, within the pipelining bound
            self.line_mode = 1
            return None
        return super().setLineMode(extra)

    def requestDone(self, request: Any) -> None:
        """HTTPChannel.requestDone, except that buffered pipelined input is parsed only while the
        client takes the answers (the write buffer has room), ``maxPipelined`` requests a turn."""
        if request is not self.requests[0]:
            raise TypeError
        gate = self._gate
        gate.release(BUFFERED)
        if self._fast_parse:
            replayed = _fast_web.request_done(self)
            if replayed is None:
                return
            self._replayed = replayed
        else:
            self._replaying = True
            try:
                super().requestDone(request)  # the queue, and the idle timeout back (or the close)
            finally:
                self._replaying = False
            if not self.persistent:
                return
            transport = self._tcp()
            if gate.held and transport is not None and not transport.disconnecting:
                gate.reassert()  # HTTPChannel.requestDone resumed the transport
        self._answering = False
        self._phase = _WAIT
        connections = self._connections
        connections.serial += 1
        self.waiting_since = connections.serial
        self.kept_alive = True
        self._buffered = 0
        # What arrived with this request and is not parsed yet, then what came after its body.
        data = self.clearLineBuffer()
        if self._replayed:
            data += self._replayed
            self._replayed = b""
        if self._held:
            data += b"".join(self._held)
            self._held = []
        if not data:
            self._pipelined = 0
            self.setLineMode()
            return
        self._pipelined += 1
        if self._write_full or self._pipelined >= self._limits.max_pipelined:
            # LineReceiver parses nothing while ``paused``: the bytes wait in its buffer.
            self.paused = True
            gate.hold(PIPELINE)
            if not self._write_full:
                self._replay_call = self.callLater(0, self._replay)
        self.setLineMode(data)

    def _replay(self) -> None:
        """Parse the pipelined requests held back, now that earlier answers have gone out."""
        self._replay_call = None
        if self._write_full or self._phase == _GONE:
            return  # resumeProducing calls again once the write buffer has drained
        self._pipelined = 0
        self.paused = False
        self._gate.release(PIPELINE)
        if self._phase == _WAIT:
            self._phase = _HEAD
        self.dataReceived(b"")

    def pauseProducing(self) -> None:
        """The transport's write buffer is full."""
        self._write_full = True
        super().pauseProducing()  # pauses the response's producer, and reading unless a request is answered
        if not self._answering:
            self._gate.hold(TRANSPORT)

    def resumeProducing(self) -> None:
        """The transport's write buffer drained."""
        self._write_full = False
        super().resumeProducing()
        gate = self._gate
        gate.release(TRANSPORT)
        transport = self._tcp()
        if gate.held and transport is not None and not transport.disconnecting:
            gate.reassert()  # HTTPChannel resumed the transport while another reason holds it
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
            self._tcp().write(raw_reply(b"408 Request Timeout", message))
        self._close_soon()  # a connection that sent nothing is closed without a word

    def _body_late(self) -> None:
        self._deadline = None
        if self._phase == _BODY:
            message = f"request body not received within limits.bodyTimeout ({self._limits.body_timeout:g} s)"
            self._tcp().write(raw_reply(b"408 Request Timeout", message))
            self._close_soon()

    def shed(self) -> None:
        """Descriptors run low and this connection has no complete request head: close it."""
        if self._phase == _HEAD:
            self._tcp().write(raw_reply(b"503 Service Unavailable",
                                            "Service Unavailable: the gateway is short of connections",
                                            b"Retry-After: 1\r\n"))
        drop_unread(self.transport)
        self._close_soon()

    def _refuse_connection(self, reason: str) -> None:
        """Over a connection cap: 503 at once, then a lingering close (or an immediate one when
        descriptors are short)."""
        self._phase = _GONE
        self._cancel_calls()
        self.setTimeout(None)
        self._tcp().write(raw_reply(b"503 Service Unavailable", f"Service Unavailable: {reason}",
                                        b"Retry-After: 1\r\n"))
        if reason == DESCRIPTORS:
            drop_unread(self.transport)
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
        transport = self._tcp()
        try:
            transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            transport.loseConnection()

    def _close_soon(self) -> None:
        """loseConnection, and an abort if the peer does not take the last bytes."""
        self._phase = _GONE
        transport = self._tcp()
        if transport is None:
            return
        self._gate.unregisterProducer()
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.callLater(ABORT_SECONDS, self._close_now)

    def _close_now(self) -> None:
        self._linger_call = self._abort_call = None
        self._phase = _GONE
        transport = self._tcp()
        if transport is not None:
            transport.abortConnection()
