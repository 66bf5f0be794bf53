"""MCP Streamable HTTP (spec 2025-03-26 .. 2025-11-25, basic/transports): ``POST/GET/DELETE /mcp``.

A POST that carries requests is answered lazily: if the child's first word
for it is the final response, the reply is plain JSON with Content-Length;
if anything comes first (progress, a sampling request), or the call runs past
a keepalive tick, it turns into a resumable SSE stream. Each message goes to
exactly one stream.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpgw import dispatch, jsonrpc, logs, toolpolicy
from mcpgw.auth import identity_of, principal_of
from mcpgw.config import ServerConfig
from mcpgw.interfaces import IOutlet, IRoute
from mcpgw.metrics import mark_fallback
from mcpgw.responding import gone
from mcpgw.session import Session, SessionRefused
from mcpgw.transports.common import (
    DEFAULT_VERSION,
    SUPPORTED_VERSIONS,
    GatewayContext,
    HttpError,
    accepts,
    discover_unsupported,
    error_reply,
    http_error_reply,
    media_types,
    parse_messages,
    read_body,
    refuse_new_session,
)
from mcpgw.transports.modern import MODERN_VERSIONS, ModernEndpoint, is_modern
from mcpgw.transports.sse import SseResponse, frame

SESSION_HEADER = b"mcp-session-id"
VERSION_HEADER = b"mcp-protocol-version"
#: Streams remembered per session for Last-Event-ID replay.
MAX_STREAMS = 32
#: Server messages held for a session with no open stream (and at most sse.replayBytes of them).
MAX_BACKLOG = 1024
#: The first version whose clients expect the empty priming event (2025-11-25, resumability).
PRIMING_SINCE = "2025-11-25"
#: An event id this gateway wrote, ``STREAM_SEQ`` (ASCII digits only: ``str.isdigit`` takes "²",
#: and ``int()`` refuses more than 4300 digits).
EVENT_ID = re.compile(r"([0-9]{1,18})_([0-9]{1,18})")
#: Server notifications that concern the session, not any one request (GET stream first).
SESSION_NOTIFICATIONS = frozenset({
    "notifications/tools/list_changed",
    "notifications/resources/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/updated",
})


class ReplayBudget:
    """The bytes one session's replay logs hold, all its streams together (``sse.replayBytes``).

    Without it a session would keep MAX_STREAMS x sse.replayEvents events of up to
    maxMessageBytes each, even when the client has read them all: one client posting batches of
    large calls would hold gigabytes of the gateway's memory. Over the budget, events go in this
    order: those the client acknowledged (a newer ``Last-Event-ID``; dropped at once,
    ``StreamLog.acknowledge``), then those written to a live response (delivered), then the rest;
    oldest stream first. The event
    just appended stays, so a session holds at most ``limit`` plus its newest event.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        #: The session's logs, oldest stream first (the outlet's streams, in order).
        self.logs: OrderedDict[int, StreamLog] = OrderedDict()

    def spend(self, newest: StreamLog) -> None:
        """``newest`` just appended an event: drop old ones until the budget holds again."""
        while self.used > self.limit:
            victim = self._victim(newest)
            if victim is None:
                return
            victim.drop_oldest()

    def _victim(self, newest: StreamLog) -> StreamLog | None:
        """The log whose oldest event goes first: a delivered one, else any; never the newest event."""
        fallback = None
        for log in self.logs.values():
            if not log.events or (log is newest and len(log.events) == 1):
                continue
            if log.events[0][0] <= log.delivered:
                return log
            if fallback is None:
                fallback = log
        return fallback


class StreamLog:
    """One stream's events for ``Last-Event-ID`` replay: the last ``size`` of them, within the
    session's ReplayBudget."""

    def __init__(self, number: int, size: int, budget: ReplayBudget):
        self.number = number
        self.events: deque[tuple[int, bytes]] = deque()
        self.size = size
        self.budget = budget
        #: The seq of the last event written to a live response.
        self.delivered = 0
        budget.logs[number] = self

    def append(self, seq: int, event: bytes) -> None:
        self.events.append((seq, event))
        self.budget.used += len(event)
        if len(self.events) > self.size:
            self.drop_oldest()
        self.budget.spend(self)

    def after(self, seq: int) -> list[bytes]:
        return [event for s, event in self.events if s > seq]

    def acknowledge(self, seq: int) -> None:
        """The client has every event up to ``seq`` (its Last-Event-ID): none of them is replayed again."""
        while self.events and self.events[0][0] <= seq:
            self.drop_oldest()

    def drop_oldest(self) -> None:
        _, event = self.events.popleft()
        self.budget.used -= len(event)

    def forget(self) -> None:
        """The stream is no longer resumable: its events leave the budget."""
        while self.events:
            self.drop_oldest()
        self.budget.logs.pop(self.number, None)


class EventStream:
    """A logical SSE stream: numbered events, a replay log, at most one live response."""

    def __init__(self, outlet: StreamableOutlet, number: int):
        self.outlet = outlet
        self.number = number
        self.seq = 0
        #: This stream's events in the session's replay budget.
        self.replay = StreamLog(number, outlet.replay_events, outlet.replay)
        #: Where events are appended and replayed from: ``replay``, or (mcpgw.cluster) a log that
        #: also writes them to Redis.
        self.log: Any = self.replay
        self.live: SseResponse | None = None
        self.done = False

    def attach(self, request: Request, after: int | None = None) -> None:
        """Serve this stream on ``request``, replaying events after ``after``."""
        if self.live is not None:
            self.live.finish()
        self.attach_live(SseResponse(request, self.outlet.heartbeat, producer=self.outlet.session, metrics=self.outlet.metrics), after)

    def attach_live(self, live: Any, after: int | None = None) -> None:
        """Serve this stream on ``live``: an SseResponse, or (mcpgw.cluster) a response on another instance."""
        if self.live is not None:
            self.live.finish()
        self.live = live
        live.on_close(self._detached)
        if after is None:
            self._prime()
        else:
            self.replay.acknowledge(after)
            live.write_many(self.log.after(after))
            self.replay.delivered = self.seq
        if self.done:
            live.finish()

    def _prime(self) -> None:
        version = self.outlet.session.protocol_version or ""
        if version >= PRIMING_SINCE and self.live is not None:
            self.live.write(frame(b"", id=self._id(0), retry=self.outlet.retry))

    def emit(self, raw: bytes) -> None:
        self.seq += 1
        event = frame(raw, id=self._id(self.seq))
        if self.live is not None:
            self.live.write(event)
            self.replay.delivered = self.seq
        self.log.append(self.seq, event)

    def close(self) -> None:
        self.done = True
        if self.live is not None:
            self.live.finish()

    def _id(self, seq: int) -> bytes:
        return b"%d_%d" % (self.number, seq)

    def _detached(self, response: SseResponse) -> None:
        if self.live is response:
            self.live = None


@implementer(IRoute)
class PostExchange:
    """The answer to one POST: the Route for the requests it carried."""

    def __init__(self, outlet: StreamableOutlet, request: Request, ids: list[Any], batch: bool):
        self.outlet = outlet
        self.request = request
        self.waiting = set(ids)
        self.batch = batch
        self.stream: EventStream | None = None
        self.finished = False
        self._ticks = 0
        outlet.heartbeat.add(self)
        request.notifyFinish().addBoth(self._gone)

    # Route
    @property
    def open_stream(self) -> bool:
        """Its response may carry more: not finished, and the client has not gone away."""
        return not (self.finished or gone(self.request))

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.waiting.discard(id)
        if self.stream is None and not self.waiting and not self.batch and not self.finished:
            self._json(raw)
            return
        self._sse().emit(raw)
        if not self.waiting:
            self._end()

    def deliver(self, raw: bytes) -> None:
        self._sse().emit(raw)

    def forget(self, id: Any) -> None:
        self.waiting.discard(id)
        if not self.waiting:
            self._sse()
            self._end()

    def keepalive(self) -> None:
        """A heartbeat tick: a call that runs past one whole interval becomes a stream."""
        self._ticks += 1
        if self._ticks >= 2 and self.stream is None:
            self._sse()

    def _json(self, raw: bytes) -> None:
        self.outlet.heartbeat.discard(self)
        self.finished = True
        if gone(self.request):
            return
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.setHeader(b"content-length", b"%d" % len(raw))
        self.request.write(raw)
        self.request.finish()

    def _sse(self) -> EventStream:
        if self.stream is None:
            self.outlet.heartbeat.discard(self)
            self.stream = self.outlet.new_stream()
            if not (self.finished or gone(self.request)):
                self.stream.attach(self.request)
        return self.stream

    def _end(self) -> None:
        self.finished = True
        if self.stream is not None:
            self.stream.close()

    def _gone(self, _: Any) -> None:
        self.outlet.heartbeat.discard(self)

    def fail(self, status: int, code: int, message: str) -> None:
        """No answer can come (mcpgw.cluster: the session's owning instance is gone or unreachable):
        an HTTP error if nothing was sent yet, else a JSON-RPC error for each request still waiting."""
        if self.stream is None and not self.finished:
            self.outlet.heartbeat.discard(self)
            self.finished = True
            self.waiting.clear()
            if not gone(self.request):
                body = error_reply(self.request, status, code, message)
                self.request.write(body)
                self.request.finish()
            return
        for id in list(self.waiting):
            self.answer(id, jsonrpc.error_bytes(id, code, message))


@implementer(IOutlet)
class StreamableOutlet:
    """A Streamable HTTP session's streams: the GET stream, the replay logs, the backlog."""

    log = Logger(observer=logs.observer)

    def __init__(self, session: Session, ctx: GatewayContext):
        self.session = session
        self.metrics = session.metrics
        self.heartbeat = ctx.heartbeat
        self.replay_events = ctx.config.sse.replayEvents
        self.replay = ReplayBudget(ctx.config.sse.replayBytes)
        self.retry = ctx.config.sse.retry
        self.streams: OrderedDict[int, EventStream] = OrderedDict()
        self.get_stream: EventStream | None = None
        self._next = 0
        self._backlog: deque[bytes] = deque()
        #: Bytes in ``_backlog``: at most sse.replayBytes (and MAX_BACKLOG messages).
        self._backlog_bytes = 0

    def new_stream(self) -> EventStream:
        self._next += 1
        stream = EventStream(self, self._next)
        self.streams[stream.number] = stream
        while len(self.streams) > MAX_STREAMS:
            number, old = next(iter(self.streams.items()))
            if old is self.get_stream or not old.done:
                self.streams.move_to_end(number)
                if all(s is self.get_stream or not s.done for s in self.streams.values()):
                    break
                continue
            del self.streams[number]
            old.replay.forget()
        return stream

    def open_get(self, request: Request) -> None:
        self.get_stream = self.new_stream()
        self.get_stream.attach(request)
        self._flush_backlog()

    def resume(self, request: Request, number: int, seq: int) -> bool:
        """Reconnect to stream ``number`` after event ``seq``; False if it is not known."""
        stream = self.streams.get(number)
        if stream is None:
            return False
        stream.attach(request, after=seq)
        if stream is self.get_stream:
            self._flush_backlog()
        return True

    def _flush_backlog(self) -> None:
        stream = self.get_stream
        while self._backlog and stream is not None and stream.live is not None:
            raw = self._backlog.popleft()
            self._backlog_bytes -= len(raw)
            stream.emit(raw)

    # Outlet
    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        """A server message no request claims: the newest open POST stream, else the GET stream.

        Notifications about the session as a whole (SESSION_NOTIFICATIONS) take a
        live GET stream first: messages on a POST stream SHOULD relate to its
        request, those on the GET stream SHOULD NOT (2025-11-25 basic/transports).
        """
        stream = self.get_stream
        get_live = stream is not None and stream.live is not None
        if not (get_live and msg.get("method") in SESSION_NOTIFICATIONS):
            for route in reversed(self.session.pending_routes()):
                if route.open_stream:
                    route.deliver(raw)
                    return
        if stream is not None and get_live:
            stream.emit(raw)
        else:
            self._backlog.append(raw)
            self._backlog_bytes += len(raw)
            dropped = 0
            while len(self._backlog) > 1 and (len(self._backlog) > MAX_BACKLOG or self._backlog_bytes > self.replay.limit):
                self._backlog_bytes -= len(self._backlog.popleft())
                dropped += 1
            if dropped:
                self.log.warn("session {session}: backlog full, {count} oldest server message(s) dropped",
                              session=self.session.id, count=dropped)

    def session_ended(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.close()


class StreamableEndpoint(Resource):
    """``/mcp`` for one server."""

    isLeaf = True
    log = Logger(observer=logs.observer)

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        super().__init__()
        self._ctx = ctx
        self._server = server
        #: 2026-07-28 requests (mcpgw.transports.modern): the version header and the body decide, per request.
        self._modern = ModernEndpoint(ctx, server)

    def render(self, request: Request) -> Any:
        if request.method not in (b"POST", b"GET", b"DELETE"):
            request.setHeader(b"allow", b"GET, POST, DELETE")
            return error_reply(request, 405, jsonrpc.CONNECTION_CLOSED, "Method Not Allowed")
        if request.method != b"POST" and _header(request, VERSION_HEADER) in MODERN_VERSIONS \
                and request.getHeader(SESSION_HEADER) is None:
            # 2026-07-28 has no GET stream and no sessions to DELETE (with a session id: that session's 400).
            request.setHeader(b"allow", b"POST")
            return error_reply(request, 405, jsonrpc.CONNECTION_CLOSED, "Method Not Allowed in protocol version 2026-07-28")
        try:
            return super().render(request)
        except HttpError as e:
            return http_error_reply(request, e)

    def _with_session(self, request: Request, then: Callable[[Session], Any]) -> Any:
        """``then(session)`` for the request's session, now or (owned by another instance: the
        cluster looks it up) once it is found; an HttpError (404) for no such session here."""
        raw = _header(request, SESSION_HEADER)
        if raw is None:
            raise HttpError(400, jsonrpc.CONNECTION_CLOSED, "Bad Request: Mcp-Session-Id header is required")
        session = self._ctx.sessions.get(raw, identity_of(request))
        if session is None and self._ctx.cluster is not None:
            found = self._ctx.cluster.lookup(raw, identity_of(request))
            return when_found(request, found, lambda s: then(self._checked(s)))
        return then(self._checked(session))

    def _checked(self, session: Session | None) -> Session:
        if session is None or session.transport != "streamable" or session.server is not self._server:
            raise HttpError(404, jsonrpc.SESSION_NOT_FOUND, "Session not found")
        return session

    def _check_version(self, request: Request) -> str:
        version = _header(request, VERSION_HEADER)
        if version is None:
            return DEFAULT_VERSION
        if version not in SUPPORTED_VERSIONS:
            supported = self._modern.supported()
            raise HttpError(
                400, jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
                f"Bad Request: unsupported MCP-Protocol-Version {version!r} (supported: {', '.join(supported)})",
                data={"supported": supported, "requested": version},
            )
        return version

    # -- POST ---------------------------------------------------------------

    def render_POST(self, request: Request) -> Any:
        types = media_types(request.getHeader(b"accept"))
        if not (accepts(types, "application/json") and accepts(types, "text/event-stream")):
            raise HttpError(406, jsonrpc.CONNECTION_CLOSED, "Not Acceptable: Accept must list application/json and text/event-stream")
        ctype = media_types(request.getHeader(b"content-type"))
        if "application/json" not in ctype:
            raise HttpError(415, jsonrpc.CONNECTION_CLOSED, "Unsupported Media Type: Content-Type must be application/json")
        body = read_body(request, self._ctx.config.maxBodyBytes)
        messages, batch = parse_messages(body, max_batch=self._ctx.config.limits.maxBatchMessages)
        if is_modern(request, messages):
            return self._modern.post(request, messages, batch)
        if any(m.kind == jsonrpc.REQUEST and m.msg["method"] == "initialize" for m in messages):
            if batch:
                raise HttpError(400, jsonrpc.INVALID_REQUEST, "initialize must be sent alone, not in a batch")
            return self._initialize(request, messages[0])
        if request.getHeader(SESSION_HEADER) is None:
            self._check_version(request)
            if len(messages) == 1 and messages[0].kind == jsonrpc.REQUEST and messages[0].msg["method"] == "server/discover":
                id = messages[0].msg["id"]
                mark_fallback(request)  # the client falls back to initialize: not a session_not_found error
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"application/json")
                return discover_unsupported(id)
        return self._with_session(request, lambda session: self._post(request, session, messages, batch))

    def _post(self, request: Request, session: Session, messages: list[Any], batch: bool) -> Any:
        self._check_version(request)
        if batch and session.protocol_version not in (None, "2025-03-26"):
            raise HttpError(400, jsonrpc.INVALID_REQUEST, f"JSON-RPC batches are not supported in protocol version {session.protocol_version}")
        principal, headers = principal_of(request), request.requestHeaders
        refused = dispatch.refusal(self._ctx, principal, self._server.name, messages, transport="streamable", headers=headers)
        if refused is not None:  # before any of the POST's messages goes on (auth.oauth.toolScopes)
            return toolpolicy.forbidden_reply(self._ctx.auth, request, refused[1], refused[0].msg["id"])
        requests = [m for m in messages if m.kind == jsonrpc.REQUEST]
        for m in messages:
            if m.kind != jsonrpc.REQUEST:
                session.notify(m.msg, m.raw)
        if not requests:
            request.setResponseCode(202)
            return b""
        exchange = PostExchange(cast(StreamableOutlet, session.outlet), request, [m.msg["id"] for m in requests], batch)
        for m in requests:
            dispatch.request(self._ctx, session, m.msg, m.raw, exchange, principal=principal, transport="streamable",
                             headers=headers)
        return NOT_DONE_YET

    def _initialize(self, request: Request, m: Any) -> Any:
        sessions = self._ctx.sessions
        if not sessions.accepting:
            return refuse_new_session(request, sessions, m.msg["id"])
        # A cluster's outlet numbers and logs its streams so that any instance can resume them.
        make_outlet = self._ctx.cluster.outlet if self._ctx.cluster is not None else StreamableOutlet
        span = dispatch.begin(self._ctx, m.msg, server=self._server.name, transport="streamable", request=request)
        try:
            # Pooled or not: SessionManager. The principal keys an anonymous client's session quota.
            session = dispatch.setup(span, self._server.name, lambda: sessions.create(
                self._server, "streamable", identity_of(request), principal=principal_of(request),
                outlet=lambda s: make_outlet(s, self._ctx)))
        except SessionRefused as e:
            request.setHeader(b"retry-after", b"%d" % e.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}", m.msg["id"])
        request.setHeader(SESSION_HEADER, session.id.encode())
        exchange = PostExchange(cast(StreamableOutlet, session.outlet), request, [m.msg["id"]], False)
        dispatch.request(self._ctx, session, m.msg, m.raw, exchange, principal=principal_of(request),
                         transport="streamable", headers=request.requestHeaders, span=span)
        return NOT_DONE_YET

    # -- GET ----------------------------------------------------------------

    def render_GET(self, request: Request) -> Any:
        if not accepts(media_types(request.getHeader(b"accept")), "text/event-stream"):
            raise HttpError(406, jsonrpc.CONNECTION_CLOSED, "Not Acceptable: Accept must list text/event-stream")
        return self._with_session(request, lambda session: self._get(request, session))

    def _get(self, request: Request, session: Session) -> Any:
        self._check_version(request)
        outlet = cast(StreamableOutlet, session.outlet)
        last = _header(request, b"last-event-id")
        if last is not None:
            match = EVENT_ID.fullmatch(last)
            if match and outlet.resume(request, int(match[1]), int(match[2])):
                return NOT_DONE_YET
        if outlet.get_stream is not None and outlet.get_stream.live is not None:
            raise HttpError(409, jsonrpc.CONNECTION_CLOSED, "Conflict: this session already has an open GET stream")
        outlet.open_get(request)
        return NOT_DONE_YET

    # -- DELETE -------------------------------------------------------------

    def render_DELETE(self, request: Request) -> Any:
        return self._with_session(request, lambda session: self._delete(request, session))

    def _delete(self, request: Request, session: Session) -> bytes:
        session.close("client ended the session (DELETE)")
        request.setResponseCode(200)
        return b""


def when_found(request: Request, found: defer.Deferred[Any], then: Callable[[Any], Any]) -> Any:
    """What ``render`` returns for a request that needs what ``found`` fires with (a session
    owned by another instance): ``then(result)``'s body at once when it has fired, else
    ``NOT_DONE_YET``, and the response is finished with ``then``'s body when it fires. A failure
    with an HttpError answers with that error."""
    early: list[Any] = []
    waiting = [True]

    def fired(result: Any) -> None:
        if waiting[0]:
            early.append(result)
        else:
            _finish(request, result, then)

    found.addBoth(fired)
    waiting[0] = False
    if not early:
        return NOT_DONE_YET
    if isinstance(early[0], Failure):
        early[0].raiseException()
    return then(early[0])


def _finish(request: Request, result: Any, then: Callable[[Any], Any]) -> None:
    """Render the rest of a request whose lookup ended with ``result``, as twisted.web would."""
    if gone(request):
        return
    try:
        if isinstance(result, Failure):
            result.raiseException()
        body = then(result)
    except HttpError as e:
        body = http_error_reply(request, e)
    except Exception:  # noqa: BLE001 - what twisted.web does for a render that raises
        request.processingFailed(Failure())
        return
    if body is not NOT_DONE_YET and not request.finished:
        if body:
            request.write(body)
        request.finish()


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")
