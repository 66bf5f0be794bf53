"""WebSocket (``/ws``): one connection is one session, one JSON-RPC message per text frame.

Not in the MCP spec (SEP-1288 is a draft): this is the shape the TypeScript
SDK's ``WebSocketClientTransport`` and the Python ``mcp`` 1.x
``websocket_client`` speak: subprotocol ``mcp``, UTF-8 JSON text frames.
Autobahn does the framing, UTF-8 validation, size limits and keepalive pings;
the session does all routing, exactly as for the legacy SSE stream.

Close codes: 1003 binary frame, 1007 invalid UTF-8, 1009 message over
``websocket.maxMessageBytes``, 1011 the MCP server exited, 1001 gateway
shutdown. A text frame that is not JSON gets a -32700 error frame and the
connection goes on.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger

from mcpgw import __version__, jsonrpc, logs
from mcpgw.config import ServerConfig
from mcpgw.session import Session
from mcpgw.transports.common import GatewayContext, HttpError, parse_messages
from mcpgw.transports.legacy import _discover_unsupported

SUBPROTOCOL = "mcp"
PONG = b'{"type":"pong"}'
#: A text frame this short may be the application-level ``{"type": "ping"}``.
_PING_MAX = 64

CLOSE_GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY  # 1001
CLOSE_UNSUPPORTED_DATA = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA  # 1003
CLOSE_INTERNAL_ERROR = WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR  # 1011


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


class McpWebSocketProtocol(WebSocketServerProtocol):
    """One client connection: frames in, the session's messages out."""

    _log = Logger(observer=logs.observer)
    factory: McpWebSocketFactory
    connection: WsConnection | None = None

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if not self.factory.ctx.sessions.accepting:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "gateway is shutting down")
        if not request.protocols:
            return None  # wscat and other generic clients ask for no subprotocol
        if SUBPROTOCOL in request.protocols:
            return SUBPROTOCOL
        raise ConnectionDeny(
            ConnectionDeny.NOT_ACCEPTABLE,
            f"unsupported WebSocket subprotocol {', '.join(request.protocols)}: this endpoint speaks {SUBPROTOCOL!r}",
        )

    def onOpen(self) -> None:
        ctx = self.factory.ctx
        try:
            session = ctx.sessions.create(self.factory.mcp_server, "ws")
        except Exception:
            self._log.failure("cannot start a session for a WebSocket client")
            self.close(CLOSE_INTERNAL_ERROR, "cannot start the MCP server")
            return
        self.connection = WsConnection(session, self)
        session.outlet = self.connection
        # Backpressure: a full socket buffer pauses reading the child's stdout.
        # The transport still names the HTTPChannel that served the upgrade request.
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(session, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
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
            if len(payload) <= _PING_MAX and _is_ping(payload):
                self.send_text(PONG)
            else:
                self.send_text(jsonrpc.error_bytes(e.id, e.code, e.message))
            return
        m = messages[0]
        if m.kind == jsonrpc.REQUEST:
            if m.msg["method"] == "server/discover":
                connection.answer(m.msg["id"], _discover_unsupported(m.msg["id"]))
            else:
                session.request(m.msg, m.raw, connection)
        else:
            session.notify(m.msg, m.raw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.connection is not None:
            how = f"code {code}" if code is not None else "no close code"
            self.connection.closed(f"WebSocket closed ({how})")

    # -- sending ------------------------------------------------------------

    def send_text(self, raw: bytes) -> None:
        """One message, one text frame (valid UTF-8: the child's line was decoded as JSON)."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            # sendFrame, not sendMessage: websocket.maxMessageBytes limits what
            # clients send; replies are bounded by the server's maxMessageBytes.
            self.sendFrame(opcode=1, payload=raw)

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
            # Origin is checked by mcpgw.web.Guard in front of the resource.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        # Autobahn's timers (handshake timeouts, keepalive pings) on the injected reactor
        # rather than txaio's global one.
        self._batched_timer = _ReactorTimer(ctx.reactor)


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


def websocket_resource(ctx: GatewayContext, server: ServerConfig) -> WebSocketResource:
    """``/ws`` for ``server``: put it behind ``mcpgw.web.Guard`` like every MCP endpoint."""
    return WebSocketResource(McpWebSocketFactory(ctx, server))
