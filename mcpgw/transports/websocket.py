"""WebSocket (``/ws``): one connection is one session, one JSON-RPC message per text frame.

Not in the MCP spec (SEP-1288 is a draft): this is the shape the TypeScript
SDK's ``WebSocketClientTransport`` and the Python ``mcp`` 1.x
``websocket_client`` speak: subprotocol ``mcp``, UTF-8 JSON text frames.
Autobahn does the handshake, control frames (ping, pong, close), fragmented
and partial frames, size limits and keepalive pings; the session does all
routing, exactly as for the legacy SSE stream.

Two paths, chosen for each connection when its protocol is built: the fast one
(mcpgw._fast.websocket) parses whole text frames of a read and frames replies
itself, past Autobahn's per-frame machinery and Twisted's write buffer; the
public one is Autobahn's own parser into ``onMessage`` and ``sendMessage``. It
is taken when ``fastPaths`` is off (mcpgw._fast) or the fast path's probe of
the installed Autobahn failed, and behaves the same but for one thing: a reply
over ``websocket.maxMessageBytes`` (the limit clients are held to, which
``sendMessage`` applies to replies too) leaves as a text frame and an empty
final continuation frame (Autobahn's frame API), one frame on the fast path.
UTF-8 is checked once per message in ``onMessage`` (``bytes.decode``, for
either path) rather than by Autobahn's incremental validator.

Close codes: 1003 binary frame, 1007 invalid UTF-8, 1009 message over
``websocket.maxMessageBytes``, 1008 ``websocket.maxErrors`` invalid messages in
a row, 1011 the MCP server exited, 1001 gateway shutdown. A text frame that is
not JSON (or not JSON-RPC) gets a -32700 (-32600) error frame and the
connection goes on, up to that budget.

Backpressure (``_Backpressure``): every frame the gateway writes, its own error,
429 and pong frames included, goes through the transport's write buffer; over
Twisted's high-water mark (``bufferSize``, 64 KiB) the socket stops being read
and the session's child stops being read, and both resume once the buffer has
drained. A read is parsed a frame at a time on the fast path and a piece
(``PUBLIC_PIECE``, 4 KiB) at a time by Autobahn's parser, and a reply over the
mark holds the rest of the read until the buffer has drained: a peer that sends
without reading gets at most a piece of frames answered past the mark, and one
turn of the reactor spends on it about a write buffer's worth of replies, never
a whole read of thousands of tiny frames, so other connections are served in
between. It is dropped by the keepalive ping timeout (its pong, and any frame
that stands in for it, is never read). Messages that get no reply (notifications
for the child) do not fill the buffer: one turn handles at most
``MAX_TURN_MESSAGES`` of a connection's messages, the rest of the read waits for
the next turn, and a child whose stdin is over its high-water mark (it does not
read: mcpgw.upstream.stdin) stops the reading until it has drained.
"""

from __future__ import annotations

from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw import __version__, dispatch, jsonrpc, logs, toolpolicy
from mcpgw._fast import websocket as fast_websocket
from mcpgw.auth import Principal, principal_of
from mcpgw.config import ServerConfig
from mcpgw.interfaces import IOutlet, IRoute
from mcpgw.ratelimit import Decision, ip_key
from mcpgw.session import Session, SessionRefused
from mcpgw.transports.common import (
    GatewayContext,
    HttpError,
    error_reply,
    not_accepting,
    parse_messages,
)
from mcpgw.transports.sse import _PauseShare
from mcpgw.upstream import innermost

SUBPROTOCOL = "mcp"
PONG = b'{"type":"pong"}'
#: A text frame this short may be the application-level ``{"type": "ping"}``.
_PING_MAX = 64

CLOSE_GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY  # 1001
CLOSE_UNSUPPORTED_DATA = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA  # 1003
CLOSE_INTERNAL_ERROR = WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR  # 1011
CLOSE_POLICY_VIOLATION = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION  # 1008
CLOSE_INVALID_PAYLOAD = WebSocketProtocol.CLOSE_STATUS_CODE_INVALID_PAYLOAD  # 1007
CLOSE_TRY_AGAIN_LATER = 1013
#: Messages held while the rate limiter decides on an earlier one (an asynchronous limiter).
MAX_WAITING = 1024
#: Messages one turn of the reactor handles for one connection: the rest of the read waits for the
#: next turn (``_Backpressure.next_turn``), so a read of thousands of tiny messages that nobody
#: answers (notifications for the child) does not keep other connections waiting.
MAX_TURN_MESSAGES = 256
#: Bytes of one read handed to Autobahn's parser at a time on the public path: between pieces a full
#: write buffer (a peer that sends and never reads) holds the rest until it drains.
PUBLIC_PIECE = fast_websocket.PIECE

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSING = WebSocketProtocol.STATE_CLOSING


@implementer(IRoute, IOutlet)
class WsConnection:
    """The one WebSocket of a session: its Route and its Outlet."""

    #: The session's outlet too: a message no request claims goes out through ``unbound``.
    open_stream = False

    def __init__(self, session: Session, protocol: McpWebSocketProtocol):
        self.session = session
        self.protocol = protocol

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
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
    """The socket's streaming producer: while ``paused`` the socket is not read and the parsers hold
    the rest of the read they were parsing (``resume_held`` parses it once nothing holds it).

    Three things pause it. Twisted calls ``pauseProducing`` on every write while its buffer holds
    more than ``bufferSize`` bytes, and ``resumeProducing`` once, when the buffer has drained: a
    client that sends and never reads cannot make the gateway queue replies without end, and this
    socket takes its share in pausing the session (the child's stdout). ``next_turn``: the turn
    handled MAX_TURN_MESSAGES messages, the rest waits for the reactor's next turn. ``child_full``:
    the session's child does not read its stdin (mcpgw.upstream.stdin), the rest waits until it has.
    """

    def __init__(self, protocol: McpWebSocketProtocol, share: _PauseShare):
        self._protocol = protocol
        self._share = share
        #: Any of the three: the parsers hold the rest of a read.
        self.paused = False
        self._full = False
        self._child = False
        self._turn: Any = None

    def pauseProducing(self) -> None:
        if not self._full:
            self._full = True
            self._share.pauseProducing()
            self._hold()

    def resumeProducing(self) -> None:
        if self._full:
            self._full = False
            self._share.resumeProducing()
            self._release()

    def next_turn(self) -> None:
        """The turn's messages are spent: the rest of the read on the reactor's next turn."""
        if self._turn is None:
            self._turn = self._protocol.factory.ctx.reactor.callLater(0, self._turned)
            self._hold()

    def _turned(self) -> None:
        self._turn = None
        self._release()

    def child_full(self, gate: Any) -> None:
        """The child's stdin is over its high-water mark: the rest once it has drained."""
        if not self._child:
            self._child = True
            gate.when_drained(self._child_drained)
            self._hold()

    def _child_drained(self) -> None:
        self._child = False
        self._release()

    def _hold(self) -> None:
        if not self.paused:
            self.paused = True
            self._protocol.socket().pauseProducing()

    def _release(self) -> None:
        if self.paused and not (self._full or self._child or self._turn is not None):
            self.paused = False
            protocol = self._protocol
            protocol.turn_messages = 0
            protocol.resume_held()  # the rest of the read that paused it, first
            if not (self.paused or protocol.stopped_reading):
                protocol.socket().resumeProducing()

    def stopProducing(self) -> None:
        """The connection is going away (not necessarily the session): give back the session's pause."""
        self.paused = self._full = self._child = False
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
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
    #: The socket's producer once the session is open (the fast path holds reads while it is paused).
    backpressure: _Backpressure | None = None
    #: Public path: the rest of a read held while the write buffer is full (_public_received).
    _held = b""
    #: Messages handled in this turn of the reactor (MAX_TURN_MESSAGES).
    turn_messages = 0
    #: The session's child's stdin (a stdio server's; None for others): over its mark, reading waits.
    _stdin_gate: Any = None
    _waiting = 0
    #: Taken out of mcp_gateway_active_connections (onClose).
    _uncounted = False
    #: Invalid messages in a row (not JSON, not JSON-RPC), refused or rate limited alike.
    _errors = 0
    #: websocket.maxErrors of them close the connection 1008 (set in onOpen).
    _max_errors = 1 << 62
    #: The connection failed (RFC 6455 section 7.1.7): nothing more is read from the peer.
    stopped_reading = False
    #: This connection's fast paths (set in onOpen when ``_fast_on``); None: Autobahn's public path.
    _fast: fast_websocket.FastFrames | None = None
    #: websocket.maxMessageBytes, the most a client may send (set in onOpen); 0: no limit.
    _client_limit = 0

    def __init__(self) -> None:
        super().__init__()
        #: Decided once, when the connection's protocol is built: a later ``_fast.configure``
        #: applies to the connections built after it.
        self._fast_on = fast_websocket.usable()

    def socket(self) -> IPushProducer:
        """The transport as the push producer it is (Twisted's TCP and TLS transports, and the test
        transports, all are): pausing it stops reading the peer."""
        return cast(IPushProducer, self.transport)

    def connectionMade(self) -> None:
        # McpWebSocketResource.render builds and connects the protocol while the factory holds
        # the upgrade request's Principal.
        self.principal = self.factory.principal
        super().connectionMade()

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
        if self._fast_on:
            self._fast = fast_websocket.FastFrames.open(self)
        self._max_errors = self.factory.ctx.config.websocket.maxErrors or 1 << 62
        self._client_limit = self.factory.ctx.config.websocket.maxMessageBytes or 0
        ctx = self.factory.ctx
        try:
            session = ctx.sessions.create(self.factory.mcp_server, "ws", self.principal.identity if self.principal else None,
                                          principal=self.principal, outlet=lambda s: WsConnection(s, self))
        except SessionRefused as e:
            self.close(CLOSE_TRY_AGAIN_LATER, e.reason)
            return
        except Exception:  # noqa: BLE001 - a child that cannot start fails this socket, not the gateway
            self._log.failure("cannot start a session for a WebSocket client")
            self.close(CLOSE_INTERNAL_ERROR, "cannot start the MCP server")
            return
        self.connection = cast(WsConnection, session.outlet)
        # A stdio child's stdin (mcpgw.upstream.stdin); a WebSocket's session starts its child at once.
        self._stdin_gate = getattr(innermost(session.upstream), "stdin_gate", None)
        session.metrics.connection_opened()
        # Backpressure: a full socket buffer pauses reading the socket and the child's
        # stdout (_Backpressure). The transport still names the HTTPChannel that served
        # the upgrade request. The session counts pauses (one per consumer), so this
        # socket holds at most one of them. ``producer`` is FileDescriptor's (a TLS transport
        # hands the attribute on to the TCP one under it; a test's StringTransport has its own).
        transport: Any = self.transport
        if transport.producer is not None:
            transport.unregisterProducer()
        self._pause = _PauseShare(session)
        self.backpressure = _Backpressure(self, self._pause)
        transport.registerProducer(self.backpressure, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Each message is one hit on the rate limiter; messages are handled in order."""
        self.turn_messages += 1
        if self.turn_messages >= MAX_TURN_MESSAGES and self.backpressure is not None:
            self.backpressure.next_turn()
        if not isBinary and not payload.isascii():
            # Autobahn's incremental validator is off (``utf8validateIncoming``): one
            # check per message, for the fast path and Autobahn's alike; invalid text is 1007
            # (RFC 6455 section 8.1), as Autobahn's validator answers it.
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as e:
                self._invalid_text(f"encountered invalid UTF-8 while processing text message at payload octet index {e.start}")
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
        if self.principal is not None:
            key = self.principal.rate_key
        else:
            peer = self.transport.getPeer() if self.transport is not None else None
            key = ip_key(peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "local")
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
            messages = []
            invalid = e.code == jsonrpc.PARSE_ERROR or not (len(payload) <= _PING_MAX and _is_ping(payload))
        dispatch.refused_message(self.factory.ctx, "rate_limited", jsonrpc.CONNECTION_CLOSED, messages[0].msg if messages else None,
                                 principal=self.principal, server=self.factory.mcp_server.name, transport="ws")
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
        m = messages[0]
        ctx, server = self.factory.ctx, self.factory.mcp_server.name
        refused = dispatch.refusal(ctx, self.principal, server, messages, transport="ws")
        if refused is not None:  # auth.oauth.toolScopes: a live stream answers with a JSON-RPC error
            self.send_text(toolpolicy.refusal_error(m.msg["id"], refused[1]))
            return
        dispatch.relay(ctx, session, m, connection, principal=self.principal, transport="ws")
        gate = self._stdin_gate
        if gate is not None and gate.full and self.backpressure is not None:
            self.backpressure.child_full(gate)

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

    def _invalid_text(self, reason: str) -> None:
        """1007, as Autobahn's own UTF-8 validator fails the connection (RFC 6455 section 8.1): the
        Close frame, no message delivered after it, the peer's Close still read; a second failure
        while closing drops the TCP connection."""
        self.failedByMe = True  # Autobahn delivers no message it still parses from this read
        if self.state == _OPEN:
            self._log.info("WebSocket {peer}: closing with {code}: {reason}", peer=self.peer, code=CLOSE_INVALID_PAYLOAD, reason=reason)
            self.sendCloseFrame(code=CLOSE_INVALID_PAYLOAD, reasonUtf8=encode_truncate(reason, 123), isReply=False)
        elif self.state == _CLOSING:
            self.dropConnection(abort=False)

    def fail_connection(self, code: int, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 section 7.1.7): the Close frame, then nothing more
        is read from the peer, not even its Close; Autobahn drops the TCP connection when the closing
        handshake times out (closeHandshakeTimeout)."""
        self.close(code, reason)
        self.failedByMe = True  # Autobahn delivers no message it still parses from this read
        self.stopped_reading = True
        if self.transport is not None:
            self.socket().pauseProducing()

    # -- receiving ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Twisted's bytes: to the fast path once the connection is open, else to Autobahn's."""
        if self.stopped_reading:
            return
        self.turn_messages = 0
        if self._fast is not None:
            self._fast.data_received(data)
        else:
            self._public_received(self._held + data if self._held else data)

    def _public_received(self, data: bytes) -> None:
        """Autobahn's parser, a piece at a time while the replies leave room in the write buffer
        (as the fast path does frame by frame), so one read of small frames cannot hold the reactor."""
        self._held = b""
        for pos in range(0, len(data), PUBLIC_PIECE):
            if self.stopped_reading:
                return
            end = pos + PUBLIC_PIECE
            super().dataReceived(data[pos:end])
            backpressure = self.backpressure
            if backpressure is not None and backpressure.paused and end < len(data):
                self._held = data[end:]
                return

    def resume_held(self) -> None:
        """The write buffer drained: parse what the read that filled it left."""
        if self._fast is not None:
            self._fast.resume()
        elif self._held and not self.stopped_reading:
            self._public_received(self._held)

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
        """One message as text (valid UTF-8: the child's line was decoded as JSON).

        websocket.maxMessageBytes limits what clients send; replies are bounded by the
        server's maxMessageBytes. ``sendMessage`` applies the client limit to replies too, so a
        longer reply goes out through Autobahn's frame API: a text frame and an empty final
        continuation frame, one message for the client.
        """
        if self.state != _OPEN:
            return
        if self._fast is not None and self._fast.send_text(raw):
            return
        if 0 < self._client_limit < len(raw):
            self.beginMessage(isBinary=False)
            self.beginMessageFrame(len(raw))
            self.sendMessageFrameData(raw)
            self.endMessage()
        else:
            self.sendMessage(raw, isBinary=False)

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
            # UTF-8 is checked once per message in McpWebSocketProtocol.onMessage (1007, as
            # Autobahn answers): its incremental validator runs per frame and per byte in
            # Python-level steps, one bytes.decode per message costs far less.
            utf8validateIncoming=False,
            # Origin is checked by mcpgw.web.Guard in front of the resource.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        # Autobahn's timers (handshake timeouts, keepalive pings) on the injected reactor
        # rather than txaio's global one.
        fast_websocket.use_reactor(self, ctx.reactor)
        #: The Principal of the upgrade request McpWebSocketResource is rendering.
        self.principal: Principal | None = None


def _is_ping(payload: bytes) -> bool:
    try:
        doc = jsonrpc.loads(payload)
    except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "ping"


class McpWebSocketResource(WebSocketResource):
    """Autobahn's resource, plus the session caps (503) and the Guard's Principal for the protocol."""

    def __init__(self, factory: McpWebSocketFactory):
        super().__init__(factory)
        #: Autobahn keeps the factory as ``_factory``; the same one, under a name of ours.
        self.factory = factory

    def render(self, request: Any) -> Any:
        principal = principal_of(request)
        refused = self.factory.ctx.sessions.room_for(
            self.factory.mcp_server, principal.identity if principal else None, principal)
        if refused is not None:
            request.setHeader(b"retry-after", b"%d" % refused.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {refused.reason}")
        # The upgrade runs to the protocol's onOpen within this call.
        self.factory.principal = principal_of(request)
        try:
            return super().render(request)
        finally:
            self.factory.principal = None


def websocket_resource(ctx: GatewayContext, server: ServerConfig) -> WebSocketResource:
    """``/ws`` for ``server``: put it behind ``mcpgw.web.Guard`` like every MCP endpoint."""
    return McpWebSocketResource(McpWebSocketFactory(ctx, server))
