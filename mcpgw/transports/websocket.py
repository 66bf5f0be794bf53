"""WebSocket (``/ws``): one connection is one session, one JSON-RPC message per text frame.

Not in the MCP spec (SEP-1288 is a draft): this is the shape the TypeScript
SDK's ``WebSocketClientTransport`` and the Python ``mcp`` 1.x
``websocket_client`` speak: subprotocol ``mcp``, UTF-8 JSON text frames.
Autobahn does the handshake, control frames (ping, pong, close), fragmented
and partial frames, size limits and keepalive pings; the session does all
routing, exactly as for the legacy SSE stream.

The hot path bypasses Autobahn's per-frame machinery (``dataReceived``): a
read that holds only whole, final, masked, unextended text frames (what every
client sends for a JSON-RPC message) is parsed and unmasked here and each
message handed to ``onMessage`` directly; anything else (a control frame, a
fragment, a frame split across reads, a frame over the limit, a protocol
error, any state but OPEN) goes from that frame on to Autobahn's own code,
which therefore sees exactly the bytes it would have seen. Replies are framed
here too (``send_text``): header + payload in one write, sent straight into the
socket when Twisted has nothing buffered for it (``_write``). UTF-8 is checked
once per message in ``onMessage`` (``bytes.decode``, for either path) rather
than by Autobahn's incremental validator.

Close codes: 1003 binary frame, 1007 invalid UTF-8, 1009 message over
``websocket.maxMessageBytes``, 1008 ``websocket.maxErrors`` invalid messages in
a row, 1011 the MCP server exited, 1001 gateway shutdown. A text frame that is
not JSON (or not JSON-RPC) gets a -32700 (-32600) error frame and the
connection goes on, up to that budget.

Backpressure (``_Backpressure``): every frame the gateway writes, its own error,
429 and pong frames included, goes through the transport's write buffer; over
Twisted's high-water mark (``bufferSize``, 64 KiB) the socket stops being read
and the session's child stops being read, and both resume once the buffer has
drained. A peer that sends without reading therefore gets at most one read
(64 KiB) of frames answered past the mark, and is dropped by the keepalive
ping timeout (its pong, and any frame that stands in for it, is never read).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw import __version__, jsonrpc, logs
from mcpgw.auth import Principal, principal_of
from mcpgw.config import ServerConfig
from mcpgw.ratelimit import Decision, ip_key
from mcpgw.session import Session, SessionRefused
from mcpgw.transports.common import (
    GatewayContext,
    HttpError,
    error_reply,
    not_accepting,
    parse_messages,
    relay,
)
from mcpgw.transports.sse import _PauseShare

SUBPROTOCOL = "mcp"
PONG = b'{"type":"pong"}'
#: A text frame this short may be the application-level ``{"type": "ping"}``.
_PING_MAX = 64

CLOSE_GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY  # 1001
CLOSE_UNSUPPORTED_DATA = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA  # 1003
CLOSE_INTERNAL_ERROR = WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR  # 1011
CLOSE_POLICY_VIOLATION = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION  # 1008
CLOSE_TRY_AGAIN_LATER = 1013
#: Messages held while the rate limiter decides on an earlier one (an asynchronous limiter).
MAX_WAITING = 1024

_OPEN = WebSocketProtocol.STATE_OPEN
#: Payloads up to this many bytes are unmasked with one int XOR (cheaper than making a
#: masker object); longer ones with Autobahn's masker (native SIMD when it was built).
_INT_UNMASK_MAX = 1024
#: The header of a text frame (FIN, opcode 1, unmasked) for each 7-bit payload length.
_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
#: What ``_write`` reads of a Twisted TCP transport to know that nothing is buffered.
_TWISTED_BUFFER = ("_tempDataLen", "dataBuffer", "connected", "disconnecting", "_writeDisconnected", "TLS", "writeSomeData")


class WsConnection:
    """The one WebSocket of a session: its Route and its Outlet."""

    def __init__(self, session: Session, protocol: McpWebSocketProtocol):
        self.session = session
        self.protocol = protocol

    def answer(self, id: Any, raw: bytes) -> None:
        self.protocol.send_text(raw)

    def deliver(self, raw: bytes) -> None:
        self.protocol.send_text(raw)

    def forget(self, id: Any) -> None:
        pass

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.protocol.send_text(raw)

    def session_ended(self, reason: str) -> None:
        self.protocol.session_ended(reason)

    def closed(self, reason: str) -> None:
        """The socket is gone (or going): so is the session and its child."""
        if not self.session.ended:
            self.session.close(reason)


class _Backpressure:
    """The socket's streaming producer: a write buffer over the high-water mark pauses reading.

    Twisted calls ``pauseProducing`` on every write while its buffer holds more than
    ``bufferSize`` bytes, and ``resumeProducing`` once, when the buffer has drained.
    Pausing stops reading the peer (``transport.pauseProducing``), so a client that
    sends and never reads cannot make the gateway queue replies without end, and
    takes this socket's share in pausing the session (the child's stdout).
    """

    def __init__(self, protocol: McpWebSocketProtocol, share: _PauseShare):
        self._protocol = protocol
        self._share = share
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._protocol.transport.pauseProducing()
            self._share.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if not self._protocol.stopped_reading:
                self._protocol.transport.resumeProducing()
            self._share.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is going away (not necessarily the session): give back the session's pause."""
        self.paused = False
        self._share.stopProducing()


class McpWebSocketProtocol(WebSocketServerProtocol):
    """One client connection: frames in, the session's messages out."""

    _log = Logger(observer=logs.observer)
    factory: McpWebSocketFactory
    connection: WsConnection | None = None
    #: Who opened the socket (set by the factory from the Guard's upgrade request).
    principal: Principal | None = None
    _inbox: defer.Deferred[Any] | None = None
    #: This socket's share in pausing the session (the socket's producer).
    _pause: _PauseShare | None = None
    _waiting = 0
    #: Taken out of mcp_gateway_active_connections (onClose).
    _uncounted = False
    #: Invalid messages in a row (not JSON, not JSON-RPC), refused or rate limited alike.
    _errors = 0
    #: websocket.maxErrors of them close the connection 1008 (set in onOpen).
    _max_errors = 1 << 62
    #: The connection failed (RFC 6455 section 7.1.7): nothing more is read from the peer.
    stopped_reading = False

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if not self.factory.ctx.sessions.accepting:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, not_accepting(self.factory.ctx.sessions)[0])
        if not request.protocols:
            return None  # wscat and other generic clients ask for no subprotocol
        if SUBPROTOCOL in request.protocols:
            return SUBPROTOCOL
        raise ConnectionDeny(
            ConnectionDeny.NOT_ACCEPTABLE,
            f"unsupported WebSocket subprotocol {', '.join(request.protocols)}: this endpoint speaks {SUBPROTOCOL!r}",
        )

    def onOpen(self) -> None:
        self._fast_limit = self._fast_path_limit()
        self._max_errors = self.factory.ctx.config.websocket.maxErrors or 1 << 62
        self._direct = isinstance(self.transport, tcp.Connection) and all(hasattr(self.transport, a) for a in _TWISTED_BUFFER)
        ctx = self.factory.ctx
        try:
            session = ctx.sessions.create(self.factory.mcp_server, "ws", self.principal.identity if self.principal else None,
                                          principal=self.principal)
        except SessionRefused as e:
            self.close(CLOSE_TRY_AGAIN_LATER, e.reason)
            return
        except Exception:
            self._log.failure("cannot start a session for a WebSocket client")
            self.close(CLOSE_INTERNAL_ERROR, "cannot start the MCP server")
            return
        self.connection = WsConnection(session, self)
        session.outlet = self.connection
        session.metrics.connection_opened()
        # Backpressure: a full socket buffer pauses reading the socket and the child's
        # stdout (_Backpressure). The transport still names the HTTPChannel that served
        # the upgrade request. The session counts pauses (one per consumer), so this
        # socket holds at most one of them.
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        self._pause = _PauseShare(session)
        transport.registerProducer(_Backpressure(self, self._pause), True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Each message is one hit on the rate limiter; messages are handled in order."""
        if not isBinary and not payload.isascii():
            # Autobahn's incremental validator is off (``utf8validateIncoming``): one
            # check per message, for the fast path and Autobahn's alike. 1007 as before.
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as e:
                self._invalid_payload(f"encountered invalid UTF-8 while processing text message at payload octet index {e.start}")
                return
        limiter = self.factory.ctx.limiter
        if limiter is None:
            self._received(payload, isBinary)
            return
        if self._waiting >= MAX_WAITING:
            self.close(CLOSE_POLICY_VIOLATION, "too many messages waiting for the rate limiter")
            return
        if self._inbox is None:
            self._inbox = defer.succeed(None)
        key = self.principal.rate_key if self.principal is not None else ip_key(getattr(self.transport.getPeer(), "host", "local"))
        self._waiting += 1
        # One chain per connection keeps the order when a limiter answers later (Redis).
        self._inbox.addBoth(lambda _: limiter.hit(key)).addBoth(self._decided, payload, isBinary)

    def _decided(self, outcome: Decision | Failure, payload: bytes, isBinary: bool) -> None:
        self._waiting -= 1
        try:
            if isinstance(outcome, Failure):
                self._log.failure("rate limiter failed; message let through", outcome)
            elif not outcome.allowed:
                self._rate_limited(payload, outcome)
                return
            self._received(payload, isBinary)
        except Exception:  # noqa: BLE001 - the chain of later messages must go on
            self._log.failure("WebSocket message handling failed")

    def _rate_limited(self, payload: bytes, decision: Decision) -> None:
        """A JSON-RPC error for the refused message (its id if it is a request)."""
        self.factory.ctx.metrics.rate_limited("ws", self.factory.mcp_server.name)
        if self.connection is not None:
            self.connection.session.metrics.error("rate_limited")
        id = None
        invalid = False
        try:
            messages, _ = parse_messages(payload, allow_batch=False)
            if messages[0].kind == jsonrpc.REQUEST:
                id = messages[0].msg["id"]
        except HttpError as e:
            invalid = e.code == jsonrpc.PARSE_ERROR or not (len(payload) <= _PING_MAX and _is_ping(payload))
        self.send_text(jsonrpc.error_bytes(
            id, jsonrpc.CONNECTION_CLOSED,
            f"Too Many Requests: more than {decision.limit} messages per {decision.window:g} s; retry after {decision.retry_after} s",
            {"retryAfter": decision.retry_after}))
        if invalid:
            self._invalid_message()  # garbage counts whether or not the limiter refused it
        elif self._errors:
            self._errors = 0

    def _received(self, payload: bytes, isBinary: bool) -> None:
        connection = self.connection
        if connection is None or connection.session.ended:
            return
        if isBinary:
            self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted: send each JSON-RPC message as a text frame")
            return
        session = connection.session
        try:
            messages, _ = parse_messages(payload, allow_batch=False)
        except HttpError as e:
            if e.code != jsonrpc.PARSE_ERROR and len(payload) <= _PING_MAX and _is_ping(payload):
                self.send_text(PONG)
            else:
                session.metrics.error("bad_request")
                self.send_text(jsonrpc.error_bytes(e.id, e.code, e.message))
                self._invalid_message()
            return
        if self._errors:
            self._errors = 0
        relay(session, messages[0], connection)

    def _invalid_message(self) -> None:
        """One more invalid message in a row: at websocket.maxErrors the connection fails with 1008.

        A client that sends a few bad messages among good ones gets its -32700 each time
        and goes on; one that sends nothing else costs the gateway a parse and a reply per
        frame, so it is refused instead (RFC 6455 section 7.4.1: 1008, policy violation).
        """
        self._errors += 1
        if self._errors >= self._max_errors:
            self.fail_connection(
                CLOSE_POLICY_VIOLATION, f"{self._errors} invalid messages in a row (websocket.maxErrors): send JSON-RPC messages")

    def fail_connection(self, code: int, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 section 7.1.7): the Close frame, then nothing more
        is read from the peer, not even its Close; Autobahn drops the TCP connection when the closing
        handshake times out (closeHandshakeTimeout)."""
        self.close(code, reason)
        self.failedByMe = True  # Autobahn delivers no message it still parses from this read
        self.stopped_reading = True
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    # -- receiving: the fast path ------------------------------------------

    #: Largest payload the fast path takes (websocket.maxMessageBytes); -1: none (set in onOpen).
    _fast_limit = -1
    #: The transport is a Twisted TCP connection: replies may be sent at once (``_write``).
    _direct = False

    def _fast_path_limit(self) -> int:
        """The payload limit of one fast-path frame, or -1 when every frame must go to Autobahn."""
        if self.logFrames or self.logOctets or self.trackedTimings or self._perMessageCompress is not None:
            return -1  # Autobahn's hooks and extensions see every frame
        limits = [n for n in (self.maxMessagePayloadSize, self.maxFramePayloadSize) if n > 0]
        return min(limits) if limits else 1 << 62

    def dataReceived(self, data: bytes) -> None:
        """Whole text frames here; from the first other frame (or partial frame) on, Autobahn.

        Replaces Autobahn's Twisted ``dataReceived``, which only adds a debug-log
        call whose arguments are formatted for every read even when debug is off.
        """
        if self.state != _OPEN or self.data or self.current_frame is not None or self.inside_message:
            if not self.stopped_reading:
                self._dataReceived(data)
            return
        n = len(data)
        pos = 0
        limit = self._fast_limit
        # Replies written while this read is parsed (errors, 429s, {"type":"pong"}) go into Twisted's
        # buffer, out in one send when the reactor next writes, rather than one send each; and
        # past the high-water mark they pause reading (_Backpressure) within this read.
        direct, self._direct = self._direct, False
        try:
            while n - pos >= 6:
                b1 = data[pos + 1]
                if data[pos] != 0x81 or b1 < 0x80:
                    break  # not FIN + text without RSV bits, or unmasked: Autobahn decides
                length = b1 & 0x7F
                if length < 126:
                    start = pos + 6
                elif length == 126:
                    start = pos + 8
                    if start > n:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    if length < 126:
                        break  # not the minimal length encoding: a protocol error
                else:
                    start = pos + 14
                    if start > n:
                        break
                    length = int.from_bytes(data[pos + 2:pos + 10], "big")
                    if length < 65536 or length >> 63:
                        break  # not minimal, or the reserved top bit: a protocol error
                end = start + length
                if end > n or length > limit:
                    break  # a partial frame, or over websocket.maxMessageBytes (1009)
                mask = data[start - 4:start]
                if length <= _INT_UNMASK_MAX:
                    q, r = divmod(length, 4)
                    payload = (int.from_bytes(data[start:end], "little")
                               ^ int.from_bytes(mask * q + mask[:r], "little")).to_bytes(length, "little")
                else:
                    payload = create_xor_masker(mask, length).process(data[start:end])
                pos = end
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()  # as Autobahn's onFrameEnd: any data frame will do
                self.onMessage(payload, False)
                if self.state != _OPEN:
                    break  # closing: the rest is Autobahn's
        finally:
            self._direct = direct
        if pos < n and not self.stopped_reading:
            self._dataReceived(data[pos:] if pos else data)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._pause is not None:
            self._pause.release()
        if self.connection is not None:
            if not self._uncounted:
                self._uncounted = True
                self.connection.session.metrics.connection_closed()
            how = f"code {code}" if code is not None else "no close code"
            self.connection.closed(f"WebSocket closed ({how})")

    # -- sending ------------------------------------------------------------

    def send_text(self, raw: bytes) -> None:
        """One message, one text frame (valid UTF-8: the child's line was decoded as JSON).

        Not sendMessage: websocket.maxMessageBytes limits what clients send; replies
        are bounded by the server's maxMessageBytes. Not sendFrame either unless
        Autobahn has queued writes or logs frames: header + payload in one write.
        """
        if self.state != _OPEN:
            return
        if self.send_queue or self.logFrames or self.logOctets:
            self.sendFrame(opcode=1, payload=raw)
            return
        n = len(raw)
        if n < 126:
            self._write(_TEXT_HEADERS[n] + raw)
        elif n < 65536:
            self._write(b"\x81\x7e" + n.to_bytes(2, "big") + raw)
        else:
            self.transport.writeSequence((b"\x81\x7f" + n.to_bytes(8, "big"), raw))

    def _write(self, frame: bytes) -> None:
        """``transport.write``, but straight into an idle plain-TCP socket.

        Twisted's ``write`` only buffers: the bytes go out when the reactor next
        finds the socket writable, i.e. an ``epoll_ctl`` to watch for writability,
        one more reactor turn (``doWrite``) and an ``epoll_ctl`` to stop watching,
        for every reply. When nothing is buffered this sends at once, with
        Twisted's own ``writeSomeData``; whatever the kernel does not take (a full
        socket buffer, an error) goes through ``write`` as before, so the order of
        bytes, backpressure (the session pauses the child) and error handling are
        Twisted's.
        """
        t: Any = self.transport
        if (self._direct and not t._tempDataLen and not t.dataBuffer and t.connected
                and not t.disconnecting and not t._writeDisconnected and not t.TLS):
            sent = t.writeSomeData(frame)
            if sent.__class__ is not int:
                t.write(frame)  # a lost connection: Twisted finds out and reports it
            elif sent < len(frame):
                t.write(frame[sent:])
        else:
            t.write(frame)

    def session_ended(self, reason: str) -> None:
        if self.factory.ctx.sessions.accepting:
            self.close(CLOSE_INTERNAL_ERROR, reason)
        else:
            self.close(CLOSE_GOING_AWAY, reason)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any code (sendClose allows 1000 and 3000-4999 only)."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            self._log.info("WebSocket {peer}: closing with {code}: {reason}", peer=self.peer, code=code, reason=reason)
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)
        if self.connection is not None:
            self.connection.closed(f"WebSocket closed by the gateway ({code})")


class McpWebSocketFactory(WebSocketServerFactory):
    """The Autobahn factory for one MCP server's ``/ws``."""

    protocol = McpWebSocketProtocol  # type: ignore[assignment]

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__(server=f"mcpgw/{__version__}", reactor=ctx.reactor)
        self.ctx = ctx
        self.mcp_server = server  # ``server`` is Autobahn's Server header
        ws = ctx.config.websocket
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,  # send the close frame (1007, 1009) before dropping TCP
            maxMessagePayloadSize=ws.maxMessageBytes,
            maxFramePayloadSize=ws.maxMessageBytes,
            autoPingInterval=ws.pingInterval,
            autoPingTimeout=ws.pingTimeout,
            # UTF-8 is checked once per message in McpWebSocketProtocol.onMessage (1007 as
            # before): Autobahn's validator costs ~1.5 us a frame and 2.4 ms a MiB, decode 0.1 ms.
            utf8validateIncoming=False,
            # Origin is checked by mcpgw.web.Guard in front of the resource.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        # Autobahn's timers (handshake timeouts, keepalive pings) on the injected reactor
        # rather than txaio's global one.
        self._batched_timer = _ReactorTimer(ctx.reactor)
        #: The Principal of the upgrade request McpWebSocketResource is rendering.
        self.principal: Principal | None = None

    def buildProtocol(self, addr: Any) -> McpWebSocketProtocol:
        proto = super().buildProtocol(addr)
        proto.principal = self.principal
        return proto


class _ReactorTimer:
    """The ``call_later`` Autobahn's protocols ask of ``factory._batched_timer``."""

    def __init__(self, reactor: Any):
        self._reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        return _Call(self._reactor.callLater(delay, func, *args, **kwargs))


class _Call:
    """A delayed call whose ``cancel`` may come after it ran."""

    def __init__(self, call: Any):
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


def _is_ping(payload: bytes) -> bool:
    try:
        doc = jsonrpc.loads(payload)
    except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "ping"


class McpWebSocketResource(WebSocketResource):
    """Autobahn's resource, plus the session caps (503) and the Guard's Principal for the protocol."""

    _factory: McpWebSocketFactory

    def render(self, request: Any) -> Any:
        principal = principal_of(request)
        refused = self._factory.ctx.sessions.room_for(
            self._factory.mcp_server, principal.identity if principal else None, principal)
        if refused is not None:
            request.setHeader(b"retry-after", b"%d" % refused.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {refused.reason}")
        # The upgrade runs to the protocol's onOpen within this call.
        self._factory.principal = principal_of(request)
        try:
            return super().render(request)
        finally:
            self._factory.principal = None


def websocket_resource(ctx: GatewayContext, server: ServerConfig) -> WebSocketResource:
    """``/ws`` for ``server``: put it behind ``mcpgw.web.Guard`` like every MCP endpoint."""
    return McpWebSocketResource(McpWebSocketFactory(ctx, server))
