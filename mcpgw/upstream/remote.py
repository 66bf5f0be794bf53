"""The remote side: an MCP server reached over HTTP (Streamable HTTP or the 2024-11-05 HTTP+SSE).

A RemoteUpstream provides IUpstream (mcpgw.interfaces) as a StdioUpstream does, so a
Session relays to it exactly as to a child: the gateway is the remote server's MCP client,
one upstream session per client session, and the client's own ``initialize`` is what opens
it (the conversation stays end to end; the gateway only keeps the upstream's
``Mcp-Session-Id`` and the negotiated ``MCP-Protocol-Version``).

Upstream 404 on a live upstream session (the remote server forgot it): the client session
ends, so the client's next request gets 404 and it re-initializes (spec: session management).
The gateway does not re-initialize behind the client's back: it would have to invent an
``initialize`` the client never sent and hide state the client thinks it has (subscriptions,
log level, negotiated version).

A request of the remote server's for a client capability (sampling, elicitation, roots) the client
did not declare in its ``initialize`` never reaches the client: the gateway answers it upstream as
the client's SDK would (mcpgw.versions ``capability_refusal``).

Credentials: only the configured ``headers`` go upstream; nothing of the client's request
(its ``Authorization``, cookies, session id) ever does, because only message bytes cross. The one
header taken from a message is its ``params._meta.traceparent`` (and ``tracestate``): the trace
context of the gateway's span for the request (mcpgw.dispatch), or the client's own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mcpgw import jsonrpc, logs
from mcpgw.config import RemoteServer
from mcpgw.interfaces import IUpstream, IUpstreamDelegate, upstream_kind
from mcpgw.metrics import NULL_BOUND, BoundMetrics
from mcpgw.tracing.propagation import trace_headers
from mcpgw.upstream.http import Body, SseParser, http_client
from mcpgw.upstream.http import _QuietEndpoints as _QuietEndpoints  # re-exported: tests check the quiet client here
from mcpgw.versions import capability_refusal, undeclared

_client = http_client  # the name tests/test_remote_upstream.py knows it by

#: What a client is told of a connection failure: its kind, never the error's own text, which
#: can name an internal host, address or certificate (the log keeps the whole reason).
_FAILURE_KINDS = (
    (error.ConnectionRefusedError, "connection refused"),
    (error.DNSLookupError, "name lookup failed"),
    (error.TimeoutError, "timed out"),
    (defer.TimeoutError, "timed out"),
    (error.ConnectionLost, "connection lost"),
    (error.ConnectionDone, "connection closed"),
)


def _type_name(failure: Failure) -> str:
    return failure.type.__name__ if failure.type is not None else ""


def public_reason(failure: Failure) -> str:
    """``failure`` as the client may read it (``_FAILURE_KINDS``)."""
    for kind, text in _FAILURE_KINDS:
        if failure.check(kind):
            return text
    name = _type_name(failure)
    if "SSL" in name or "TLS" in name:
        return "TLS handshake failed"
    return "connection failed"

ACCEPT_POST = b"application/json, text/event-stream"
_INITIALIZED = object()  # the gate while notifications/initialized is on its way
#: Reconnections of the upstream GET stream in a row before the gateway stops trying.
MAX_STREAM_RETRIES = 5


@upstream_kind("remote")
@implementer(IUpstream)
class RemoteUpstream:
    """One upstream MCP session on a remote server, for one client session."""

    log = Logger(observer=logs.observer)
    metrics: BoundMetrics = NULL_BOUND

    def __init__(self, server: RemoteServer, delegate: IUpstreamDelegate, reactor: Any, http: Any = None):
        self.server = server
        self.delegate = delegate
        self._reactor = reactor
        self._http = http if http is not None else http_client(reactor)
        self.pid: int | None = None
        self.ended = False
        self.exit_reason = ""
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self.started_at = reactor.seconds()
        self._stopping = False
        self._waiters: list[defer.Deferred[None]] = []
        self._bodies: set[Body] = set()
        self._posts: set[defer.Deferred[Any]] = set()
        self._paused = False
        #: Messages held back until the upstream can take them (the initialize answer, the SSE endpoint).
        self._held: list[tuple[bytes, dict[str, Any]]] = []
        self._initializing: Any = None
        self._initialized = False
        self._stream_open = False
        self._stream_retries = 0
        self._endpoint: str | None = None  # legacy SSE: where messages are POSTed
        #: The capabilities the client declared in its initialize (what the remote server may ask it for).
        self.client_capabilities: dict[str, Any] = {}

    # -- lifecycle ----------------------------------------------------------

    def spawn(self) -> None:
        """Streamable HTTP: nothing until the client's initialize; SSE: open the event stream now."""
        if self.server.transport == "sse":
            self._open_stream(first=True)

    def send(self, raw: bytes, msg: Any = None) -> bool:
        """Relay one client message upstream; False once the upstream session is over."""
        if self.ended or self._stopping:
            return False
        msg = jsonrpc.as_message(raw, msg)
        if msg is None:
            return False
        if not isinstance(msg, dict):
            msg = {}
        if msg.get("method") == "initialize":
            params = msg.get("params")
            declared = params.get("capabilities") if isinstance(params, dict) else None
            self.client_capabilities = declared if isinstance(declared, dict) else {}
        if self.server.transport == "sse":
            if self._endpoint is None:
                self._held.append((raw, msg))
            else:
                self._post(raw, msg)
            return True
        if self._initializing is not None:
            self._held.append((raw, msg))  # nothing may overtake initialize: it brings the session id
            return True
        self._gate(msg)
        self._post(raw, msg)
        return True

    def _gate(self, msg: dict[str, Any]) -> None:
        """initialize (it brings the session id) and notifications/initialized are not overtaken."""
        if msg.get("method") == "initialize" and "id" in msg:
            self._initializing = msg["id"]
        elif msg.get("method") == "notifications/initialized" and self.server.transport == "streamable-http":
            self._initializing = _INITIALIZED

    def stop(self) -> defer.Deferred[None]:
        """End the upstream session (DELETE for Streamable HTTP); fires when nothing is left open."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.ended:
            d.callback(None)
            return d
        self._waiters.append(d)
        if not self._stopping:
            self._stopping = True
            farewell: defer.Deferred[Any] = defer.succeed(None)
            if self.server.transport == "streamable-http" and self.session_id is not None and self.server.url:
                farewell = self._request("DELETE", self.server.url, timeout=min(self.server.connectTimeout, 5.0))
                farewell.addCallback(lambda response: response.text() if response is not None else None)
                farewell.addErrback(lambda f: None)
            farewell.addBoth(lambda _: self._finish("closed by the gateway"))
        return d

    def pauseProducing(self) -> None:
        self._paused = True
        for body in self._bodies:
            body.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        for body in self._bodies:
            body.resume()

    def _finish(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.exit_reason = reason
        for body in list(self._bodies):
            body.close()
        for d in list(self._posts):
            d.cancel()
        self.log.info("remote {server} upstream session ended: {reason}", server=self.server.name,
                      upstream_session=self.session_id, reason=reason, requested=self._stopping)
        self.delegate.upstreamEnded(reason)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _fail(self, reason: str) -> None:
        """The upstream session cannot go on: the client session ends with it."""
        if not self.ended and not self._stopping:
            self.log.warn("remote {server}: {reason}", server=self.server.name, reason=reason)
            self._finish(reason)

    # -- HTTP ---------------------------------------------------------------

    def _headers(self, accept: bytes) -> Headers:
        h = Headers({b"accept": [accept], b"user-agent": [b"mcpgw"]})
        for name, value in self.server.headers.items():
            h.setRawHeaders(name.encode("ascii"), [value.encode("utf-8")])
        if self.session_id is not None and self.server.transport == "streamable-http":
            h.setRawHeaders(b"mcp-session-id", [self.session_id.encode("ascii", "replace")])
        if self.protocol_version is not None and self.server.transport == "streamable-http":
            h.setRawHeaders(b"mcp-protocol-version", [self.protocol_version.encode("ascii", "replace")])
        return h

    def _request(self, method: str, url: str, data: bytes | None = None, accept: bytes = ACCEPT_POST,
                 timeout: float | None = None, extra: dict[bytes, bytes] | None = None) -> defer.Deferred[Any]:
        headers = self._headers(accept)
        if data is not None:
            headers.setRawHeaders(b"content-type", [b"application/json"])
        for k, v in (extra or {}).items():
            headers.setRawHeaders(k, [v])
        kw: dict[str, Any] = {"headers": headers, "unbuffered": True}
        if data is not None:
            kw["data"] = data
        if timeout is not None:
            kw["timeout"] = timeout
        return self._http.request(method, url, **kw)

    def _post(self, raw: bytes, msg: dict[str, Any]) -> None:
        url = self._endpoint if self.server.transport == "sse" else self.server.url
        assert url is not None
        # The request's trace goes on in the remote server (W3C Trace Context): mcpgw.dispatch put the
        # gateway's span in params._meta, as the message itself carries it to a stdio child.
        d = self._request("POST", url, raw, timeout=self.server.exchangeTimeout, extra=trace_headers(msg))
        self._posts.add(d)
        d.addBoth(self._posted, d)
        d.addCallback(self._post_answer, msg)
        d.addErrback(self._post_failed, msg)
        d.addErrback(lambda f: self.log.failure("remote {server}: POST handling failed", f, server=self.server.name))

    def _posted(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._posts.discard(d)
        return result

    def _post_answer(self, response: Any, msg: dict[str, Any]) -> defer.Deferred[Any] | None:
        if self.ended:
            return None
        code = response.code
        if self.server.transport == "streamable-http":
            sid = response.headers.getRawHeaders(b"mcp-session-id")
            if sid and self.session_id is None:
                self.session_id = sid[0].decode("ascii", "replace")
        if code == 404 and self.session_id is not None and self.server.transport == "streamable-http":
            self._drain(response)
            self._fail("the remote server no longer knows the session (404); the client must re-initialize")
            return None
        if code == 202 or (200 <= code < 300 and "id" not in msg):
            self._drain(response)
            if msg.get("method") == "notifications/initialized":
                self._initialized = True
                self._open_stream(first=True)
                self._ungate(msg)
            return None
        if not 200 <= code < 300:
            return response.content().addCallback(self._refused, code, msg)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if ctype == b"text/event-stream":
            return self._read_stream(response, stream=False)
        return response.content().addCallback(self._json_body, msg)

    def _json_body(self, body: bytes, msg: dict[str, Any]) -> None:
        if not body.strip():
            return
        if len(body) > self.server.maxMessageBytes:
            self.delegate.upstreamProtocolError(f"message from the MCP server exceeds {self.server.maxMessageBytes} bytes")
            return
        try:
            decoded = jsonrpc.loads(body)
        except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError):
            self._answer_error(msg, "the remote MCP server answered with something that is not JSON")
            return
        for item in decoded if isinstance(decoded, list) else [decoded]:
            if isinstance(item, dict):
                self._incoming(jsonrpc.dumps(item) if isinstance(decoded, list) else body, item)

    def _refused(self, body: bytes, code: int, msg: dict[str, Any]) -> None:
        detail = ""
        try:
            err = jsonrpc.loads(body)
            if isinstance(err, dict) and isinstance(err.get("error"), dict):
                detail = f": {err['error'].get('message')}"
        except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError):
            detail = ""  # any body: the status says enough
        self.log.info("remote {server} answered {code} to {method}", server=self.server.name, code=code,
                      method=msg.get("method"))
        self._answer_error(msg, f"the remote MCP server answered HTTP {code}{detail}")
        self._ungate(msg)

    def _post_failed(self, failure: Failure, msg: dict[str, Any]) -> None:
        if self.ended:
            return
        reason = failure.getErrorMessage() or _type_name(failure)
        self.log.warn("remote {server}: {method} not delivered: {reason}", server=self.server.name,
                      method=msg.get("method"), reason=reason)
        self._answer_error(msg, f"the remote MCP server is unreachable: {public_reason(failure)}")
        self._ungate(msg)

    def _ungate(self, msg: dict[str, Any]) -> None:
        if msg.get("method") in ("initialize", "notifications/initialized") and self._initializing is not None:
            self._initializing = None
            self._release()

    def _answer_error(self, msg: dict[str, Any], message: str) -> None:
        """A request the upstream did not answer gets a JSON-RPC error; a lost notification is only logged."""
        if "id" in msg and "method" in msg:
            error = jsonrpc.error_bytes(msg["id"], jsonrpc.CONNECTION_CLOSED, message)
            self.delegate.upstreamMessage(error, jsonrpc.loads(error))

    def _drain(self, response: Any) -> None:
        response.content().addErrback(lambda f: None)

    # -- streams ------------------------------------------------------------

    def _open_stream(self, first: bool = False, last_id: str | None = None) -> None:
        """The GET stream: server-initiated messages (Streamable HTTP) or everything (legacy SSE)."""
        if self.ended or self._stopping or self._stream_open:
            return
        self._stream_open = True
        extra = {b"last-event-id": last_id.encode("utf-8", "replace")} if last_id else None
        assert self.server.url is not None
        d = self._request("GET", self.server.url, accept=b"text/event-stream", timeout=self.server.connectTimeout, extra=extra)
        d.addCallback(self._stream_answer)
        d.addErrback(self._stream_failed)
        d.addErrback(lambda f: self.log.failure("remote {server}: GET stream handling failed", f, server=self.server.name))

    def _stream_answer(self, response: Any) -> defer.Deferred[Any] | None:
        if self.ended:
            self._drain(response)
            return None
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if response.code != 200 or ctype != b"text/event-stream":
            self._stream_open = False
            self._drain(response)
            if self.server.transport == "sse":
                self._fail(f"the remote SSE endpoint answered HTTP {response.code}")
            elif response.code == 404 and self.session_id is not None:
                self._fail("the remote server no longer knows the session (404); the client must re-initialize")
            else:  # 405: this server offers no GET stream
                self.log.debug("remote {server}: no GET stream (HTTP {code})", server=self.server.name, code=response.code)
            return None
        self._stream_retries = 0
        return self._read_stream(response, stream=True)

    def _stream_failed(self, failure: Failure) -> None:
        self._stream_open = False
        if self.ended or self._stopping:
            return
        reason = failure.getErrorMessage() or _type_name(failure)
        self.log.warn("remote {server}: GET stream failed: {reason}", server=self.server.name, reason=reason)
        public = public_reason(failure)
        if self.server.transport == "sse" and self._endpoint is None:
            self._fail(f"the remote SSE endpoint is unreachable: {public}")
            for _raw, msg in self._held:
                self._answer_error(msg, f"the remote MCP server is unreachable: {public}")
            return
        self._stream_lost(public, None)

    def _stream_lost(self, reason: str, last_id: str | None) -> None:
        """The GET stream ended: legacy SSE ends the session (its stream is the session); else reconnect."""
        if self.server.transport == "sse":
            self._fail(f"the remote SSE stream ended ({reason})")
            return
        self._stream_retries += 1
        if self._stream_retries > MAX_STREAM_RETRIES:
            self.log.warn("remote {server}: GET stream lost for good ({reason})", server=self.server.name, reason=reason)
            return
        delay = min(30.0, 0.5 * 2 ** (self._stream_retries - 1))
        self._reactor.callLater(delay, self._open_stream, False, last_id)

    def _read_stream(self, response: Any, stream: bool) -> defer.Deferred[Any]:
        parser = SseParser(self._event, self.server.maxMessageBytes,
                           lambda: self.delegate.upstreamProtocolError(
                               f"message from the MCP server exceeds {self.server.maxMessageBytes} bytes"))
        body = Body(parser.feed)
        d = body.d
        response.deliverBody(body)
        self._bodies.add(body)
        if self._paused:
            body.pause()

        def done(result: Any) -> None:
            self._bodies.discard(body)
            if stream:
                self._stream_open = False
                if not self.ended and not self._stopping:
                    why = public_reason(result) if isinstance(result, Failure) else "closed"
                    if isinstance(result, Failure):
                        self.log.info("remote {server}: stream ended: {reason}", server=self.server.name,
                                      reason=result.getErrorMessage())
                    self._stream_lost(why, parser.last_id)

        d.addBoth(done)
        return d

    def _event(self, name: str, data: str, event_id: str | None) -> None:
        if self.ended:
            return
        if name == "endpoint" and self.server.transport == "sse":
            endpoint = urljoin(self.server.url or "", data.strip())
            if urlsplit(endpoint).netloc != urlsplit(self.server.url).netloc:
                self._fail("the remote SSE endpoint named another origin for its messages")
                return
            self._endpoint = endpoint
            held, self._held = self._held, []
            for raw, msg in held:
                self._post(raw, msg)
            return
        if name != "message" or not data.strip():
            return
        raw = data.encode("utf-8")
        try:
            msg = jsonrpc.loads(raw)
        except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError):
            self.log.warn("remote {server} sent an event that is not JSON; dropped", server=self.server.name)
            return
        for item in msg if isinstance(msg, list) else [msg]:
            if isinstance(item, dict):
                self._incoming(jsonrpc.dumps(item) if isinstance(msg, list) else raw, item)

    # -- upstream -> client ---------------------------------------------------

    def _incoming(self, raw: bytes, msg: dict[str, Any]) -> None:
        if self.ended:
            return
        if self._initializing is not None and "method" not in msg and msg.get("id") == self._initializing:
            result = msg.get("result")
            if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                self.protocol_version = result["protocolVersion"]
            self._initializing = None
            self.delegate.upstreamMessage(raw, msg)
            self._release()
            return
        if "id" in msg and "method" in msg:
            needed = undeclared(msg["method"], self.client_capabilities)
            if needed is not None:
                refusal = capability_refusal(msg["id"], needed)
                self.send(refusal, jsonrpc.loads(refusal))
                return
        self.delegate.upstreamMessage(raw, msg)

    def _release(self) -> None:
        """Initialize is answered: what the client sent meanwhile goes upstream now, in order."""
        held, self._held = self._held, []
        for i, (raw, msg) in enumerate(held):
            if self.ended:
                return
            self._gate(msg)
            self._post(raw, msg)
            if self._initializing is not None:
                self._held = held[i + 1:] + self._held
                return
