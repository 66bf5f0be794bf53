"""MCP 2026-07-28 ("modern", sessionless) requests at ``/mcp``, served by a server's pooled children.

Which generation a POST belongs to is decided per request: an ``MCP-Protocol-Version``
header naming a modern version, or (without ``Mcp-Session-Id``) a body whose
``params._meta`` carries ``io.modelcontextprotocol/protocolVersion``, makes it modern;
everything else is the handshake-era Streamable HTTP of mcpgw.transports.streamable, which
this module does not touch.

2026-07-28 basic/transports/streamable-http, as applied here:

- one JSON-RPC request or notification per POST (a batch or a response: 400/-32600);
  a notification: 202, not relayed (the spec defines none over HTTP; cancellation is
  closing the stream);
- ``MCP-Protocol-Version`` must equal the body's ``_meta`` protocol version, ``Mcp-Method``
  the method, ``Mcp-Name`` the tool / prompt name or resource URI (Base64 sentinel
  decoded); a routing header sent twice or an undecodable ``Mcp-Param-*`` value: 400/-32020;
- a version the gateway does not serve for this server: 400/-32022 with
  ``data.supported`` (a server without a pool serves only handshake versions, so an
  auto-mode client falls back to ``initialize``);
- an unknown method: 404/-32601 (methods the revision removed at once, others when the
  child says so and nothing was streamed yet);
- the answer is JSON, or an SSE stream scoped to the request when progress (or a log
  line of the call) comes first or the call outlives a keepalive tick; closing that
  stream cancels the call (``notifications/cancelled`` to the child);
- ``server/discover`` is answered from the pool's cached ``initialize`` result;
- the request goes to the child as the client sent it, ``_meta`` included (the
  per-request ``clientCapabilities``, ``protocolVersion``, ``logLevel``: a server
  that reads them asks only for what this client can do); only the id and
  progress token are the gateway's;
- a child's sampling / elicitation / roots request during ``tools/call``,
  ``prompts/get`` or ``resources/read`` becomes an ``InputRequiredResult`` (the
  requests the call makes back to back together, each under its own key: the
  child's ``_meta["mcpgw/inputKey"]``, else ``elicitation`` / ``sampling`` /
  ``roots``); the client's retry with ``inputResponses`` and the ``requestState``
  resumes the parked call (mcpgw.pool: ask, claim, resume). The requestState is
  the gateway's MAC-protected token, bound to the identity that received it; a
  retry whose token is tampered, another identity's, expired, used or names a
  call that no longer exists gets -32602 and reaches no child. ``inputResponses``
  sent without ``requestState`` answer the child's requests of the same keys
  (SEP-2322 Error Handling); a request for a capability the client did not
  declare gets -32021, and the child an error and ``notifications/cancelled``;
- a child's -32002 (resource not found) reaches the client as -32602 (SEP-2164);
- ``subscriptions/listen`` opens a notification stream: list-changed notifications from the
  children, and ``resources/updated`` for the URIs it names (sent ``resources/subscribe`` to every child);
- ``Mcp-Param-*`` headers are checked for valid encoding; on ``tools/call`` every argument the tool's
  ``inputSchema`` annotates with ``x-mcp-header`` (the pool fetches the annotations once with
  ``tools/list``) must come with its header, the decoded value equal to the argument (integers compared
  as numbers), and no such header without its argument: else 400/-32020. The child gets the body.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpgw import dispatch, jsonrpc, logs, toolpolicy
from mcpgw.auth import identity_of, principal_of
from mcpgw.config import ServerConfig
from mcpgw.interfaces import IRoute
from mcpgw.metrics import NULL_BOUND, BoundMetrics, mark_fallback
from mcpgw.pool import CAPABILITY_OF, ChildPool, Pending, PoolFull, StateRejected, capability_refusal, params_of
from mcpgw.responding import gone
from mcpgw.transports.common import (
    SUPPORTED_VERSIONS,
    GatewayContext,
    HttpError,
    error_reply,
    http_error_reply,
)
from mcpgw.transports.mirror import HEADER_MISMATCH, check_params, decode_header_value
from mcpgw.transports.sse import SseResponse, frame

MODERN_VERSIONS = ("2026-07-28",)
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
META_SUBSCRIPTION = "io.modelcontextprotocol/subscriptionId"
META_LOG_LEVEL = "io.modelcontextprotocol/logLevel"
MISSING_CAPABILITY = -32021
#: A child's request to its client -> the client capability a 2026-07-28 caller must have declared.
NEEDS_CAPABILITY = CAPABILITY_OF
#: -32002 (resource not found) of handshake-era servers: 2026-07-28 clients get -32602 (SEP-2164).
RESOURCE_NOT_FOUND = -32002
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: Methods whose ``Mcp-Name`` header mirrors a body parameter.
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
#: Handshake-era methods that 2026-07-28 removed: 404/-32601 at once.
REMOVED = frozenset({"initialize", "ping", "resources/subscribe", "resources/unsubscribe", "logging/setLevel"})
#: Results that carry caching directives in 2026-07-28 (CacheableResult).
CACHEABLE = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"})
#: Calls that may answer with an InputRequiredResult.
INTERACTIVE = frozenset(NAME_BEARING)
ROUTING_HEADERS = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
#: subscriptions/listen filter keys -> (capability, flag) the children must advertise.
LIST_CHANGED = {
    "toolsListChanged": ("tools", "notifications/tools/list_changed"),
    "promptsListChanged": ("prompts", "notifications/prompts/list_changed"),
    "resourcesListChanged": ("resources", "notifications/resources/list_changed"),
}


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _meta(msg: dict[str, Any]) -> dict[str, Any] | None:
    params = msg.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) else None


def is_modern(request: Request, messages: list[Any]) -> bool:
    """Whether this POST is a 2026-07-28 request (the header and the body decide, per request).

    A request with ``Mcp-Session-Id`` belongs to a handshake-era session, whatever else it says
    (a wrong version header there is that session's 400/-32022, as for any other handshake-era request).
    """
    if request.getHeader(b"mcp-session-id") is not None:
        return False
    if _header(request, b"mcp-protocol-version") in MODERN_VERSIONS:
        return True
    if len(messages) != 1:
        return False
    meta = _meta(messages[0].msg)
    return meta is not None and META_VERSION in meta


def stamp(raw: bytes, server_info: Any, method: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """A child's handshake-era response as a 2026-07-28 one: ``resultType``, the caching
    directives of cacheable results (immediately stale, private), the server's info in ``_meta``."""
    msg = jsonrpc.loads(raw)
    result = msg.get("result")
    if isinstance(result, dict) and "resultType" not in result:
        result["resultType"] = "complete"
        if method in CACHEABLE:
            result.setdefault("ttlMs", 0)
            result.setdefault("cacheScope", "private")
        meta = result.get("_meta")
        if server_info is not None and (meta is None or isinstance(meta, dict)):
            result["_meta"] = {**(meta or {}), META_SERVER_INFO: server_info}
        raw = jsonrpc.dumps(msg)
    return raw, msg


@implementer(IRoute)
class ModernExchange:
    """The answer to one 2026-07-28 POST: JSON, or an SSE stream scoped to the request."""

    #: Its stream carries only what belongs to its request: 2026-07-28 has no session whose other
    #: server messages could go there.
    open_stream = False

    def __init__(self, ctx: GatewayContext, pool: ChildPool, request: Request, meta: dict[str, Any] | None = None,
                 metrics: BoundMetrics = NULL_BOUND):
        self._ctx = ctx
        self.pool = pool
        self.request = request
        self.metrics = metrics
        meta = meta or {}
        caps = meta.get(META_CAPABILITIES)
        #: What the client declared for this request: its capabilities, and the lowest log level it wants (None: no logs).
        self.capabilities: dict[str, Any] = caps if isinstance(caps, dict) else {}
        level = meta.get(META_LOG_LEVEL)
        self.log_level = LOG_LEVELS.index(level) if level in LOG_LEVELS else None
        self.pending: Pending | None = None
        #: What the pool answers: this exchange, or mcpgw.dispatch's ObservedRoute around it (its spans, its audit line).
        self.outer: Any = self
        self.sse: SseResponse | None = None
        self.done = False
        self._ticks = 0
        ctx.heartbeat.add(self)
        request.notifyFinish().addBoth(self._gone)

    # Route
    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        if self.done:
            return
        self.done = True
        self._ctx.heartbeat.discard(self)
        method = self.pending.method if self.pending is not None else None
        raw, msg = stamp(raw, (self.pool.init_result or {}).get("serverInfo"), method)
        error = msg.get("error")
        if isinstance(error, dict) and error.get("code") == RESOURCE_NOT_FOUND:
            # SEP-2164 (2026-07-28 server/resources Error Handling): resource not found is -32602.
            msg["error"] = {**error, "code": jsonrpc.INVALID_PARAMS}
            raw = jsonrpc.dumps(msg)
        self.metrics.sent(len(raw))
        if self.sse is not None:
            self.sse.write(frame(raw))
            self.sse.finish()
            return
        if gone(self.request):
            return
        error = msg.get("error")
        unknown = isinstance(error, dict) and error.get("code") == jsonrpc.METHOD_NOT_FOUND
        self.request.setResponseCode(404 if unknown else 200)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.setHeader(b"content-length", b"%d" % len(raw))
        self.request.write(raw)
        self.request.finish()

    def deliver(self, raw: bytes) -> None:
        if self.done or gone(self.request):
            return
        if b'"notifications/message"' in raw:
            # 2026-07-28: log lines only for a request that set _meta logLevel, at that level or above.
            params = jsonrpc.loads(raw).get("params")
            level = params.get("level") if isinstance(params, dict) else None
            if self.log_level is None or level not in LOG_LEVELS or LOG_LEVELS.index(level) < self.log_level:
                return
        self._stream().write(frame(raw))

    def forget(self, id: Any) -> None:
        self.done = True
        if self.sse is not None:
            self.sse.finish()

    def _missing_capability(self, id: Any, needed: str) -> None:
        self.done = True
        dispatch.settle(self.outer, "missing_capability", MISSING_CAPABILITY)
        self.metrics.modern_outcome("missing_capability")
        self._ctx.heartbeat.discard(self)
        raw = jsonrpc.error_bytes(id, MISSING_CAPABILITY, f"Missing required client capability: {needed}",
                                  {"requiredCapabilities": {needed: {}}})
        if self.sse is not None:
            self.sse.write(frame(raw))
            self.sse.finish()
        elif not gone(self.request):
            self.request.setResponseCode(400)
            self.request.setHeader(b"content-type", b"application/json")
            self.request.setHeader(b"content-length", b"%d" % len(raw))
            self.request.write(raw)
            self.request.finish()
        if self.pending is not None:
            self.pool.cancel(self.pending, f"the client lacks the {needed} capability")

    def keepalive(self) -> None:
        """A heartbeat tick: a call that runs past one whole interval becomes a stream."""
        self._ticks += 1
        if self._ticks >= 2 and self.sse is None and not self.done:
            self._stream()

    def _stream(self) -> SseResponse:
        if self.sse is None:
            self._ctx.heartbeat.discard(self)
            self.sse = SseResponse(self.request, self._ctx.heartbeat)
        return self.sse

    def _gone(self, _: Any) -> None:
        """The client closed the response: that cancels the request (2026-07-28 Cancellation)."""
        self._ctx.heartbeat.discard(self)
        if not self.done:
            self.done = True
            dispatch.settle(self.outer, "cancelled")
            if self.pending is not None:
                self.pool.cancel(self.pending)

    def on_input(self, pending: Pending, server_request: dict[str, Any]) -> bool:
        """The child asks for sampling / elicitation / roots during this call: an InputRequiredResult."""
        if pending.method not in INTERACTIVE or self.done:
            return False
        needed = NEEDS_CAPABILITY[server_request["method"]]
        if needed not in self.capabilities:
            # 2026-07-28 mrtr Server Requirements 7: never ask for an undeclared capability. The caller gets
            # -32021, the call is cancelled in the child, then the child's request gets its SDK-style refusal.
            self._missing_capability(pending.id, needed)
            if pending.child is not None and not pending.child.dead:
                pending.child.upstream.send(capability_refusal(server_request["id"], needed))
            return True
        if self.pool.answer_offered(pending, server_request):
            return True  # the client sent this answer with the call itself (inputResponses, no requestState)
        # The call's further requests within INPUT_GATHER join this one; then the InputRequiredResult goes out.
        self.pool.ask(pending, server_request, lambda inputs, state: self._input_required(pending, inputs, state))
        return True

    def _input_required(self, pending: Pending, inputs: dict[str, Any], state: str) -> None:
        self.metrics.modern_outcome("input_required")
        result = {"resultType": "input_required", "inputRequests": inputs, "requestState": state}
        self.outer.answer(pending.id, jsonrpc.dumps({"jsonrpc": "2.0", "id": pending.id, "result": result}))


class ModernEndpoint:
    """The 2026-07-28 side of one server's ``/mcp``."""

    log = Logger(observer=logs.observer)

    def __init__(self, ctx: GatewayContext, server: ServerConfig):
        self._ctx = ctx
        self._server = server
        self.metrics = ctx.metrics.bound("modern", server.name)

    def pool(self) -> ChildPool | None:
        pools = self._ctx.pools
        return pools.get(self._server) if pools is not None else None

    def supported(self) -> list[str]:
        return [*SUPPORTED_VERSIONS, *MODERN_VERSIONS] if self.pool() is not None else list(SUPPORTED_VERSIONS)

    def post(self, request: Request, messages: list[Any], batch: bool) -> Any:
        header = _header(request, b"mcp-protocol-version")
        if batch:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "JSON-RPC batches are not part of protocol version 2026-07-28")
        m = messages[0]
        id = m.msg.get("id") if m.kind == jsonrpc.REQUEST else None
        pool = self.pool()
        if pool is None:
            return self._unsupported(request, header or (_meta(m.msg) or {}).get(META_VERSION), id)
        if m.kind == jsonrpc.RESPONSE:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "a 2026-07-28 client sends no JSON-RPC responses")
        if m.kind == jsonrpc.NOTIFICATION:
            request.setResponseCode(202)
            return b""
        self.metrics.request(m.msg["method"], int(request.getHeader(b"content-length") or 0))
        if refused := dispatch.refusal(self._ctx, principal_of(request), self._server.name, messages, transport="streamable",
                                       headers=request.requestHeaders):
            return toolpolicy.forbidden_reply(self._ctx.auth, request, refused[1], id)  # auth.oauth.toolScopes
        try:
            return self._request(request, pool, m.msg, header)
        except HttpError as e:
            if e.code == HEADER_MISMATCH:
                self.metrics.modern_outcome("header_mismatch")
            raise

    def _request(self, request: Request, pool: ChildPool, msg: dict[str, Any], header: str | None) -> Any:
        id = msg["id"]
        self._check(request, msg, header)
        method = msg["method"]
        if method in REMOVED:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return jsonrpc.error_bytes(id, jsonrpc.METHOD_NOT_FOUND, f"Method not found: {method} (removed in 2026-07-28)")
        if method == "server/discover":
            return self._discover(request, pool, id)
        if method == "subscriptions/listen":
            return self._listen(request, pool, msg)
        if method == "tools/call":
            if pool.tool_headers is None:
                # The tools' x-mcp-header annotations are not known yet: one tools/list, then this call.
                pool.headers_of_tools().addCallbacks(
                    lambda tools: self._later(request, pool, msg),
                    lambda f: self._later(request, pool, msg, f"cannot read the tools' x-mcp-header annotations: "
                                                                   f"{f.getErrorMessage()}"),
                ).addErrback(lambda f: self.log.failure("tools/call on {server} failed", f, server=self._server.name))
                return NOT_DONE_YET
            check_params(request, msg, pool.tool_headers)
        return self._call(request, pool, msg)

    def _later(self, request: Request, pool: ChildPool, msg: dict[str, Any], failed: str | None = None) -> None:
        """A tools/call that waited for the x-mcp-header annotations."""
        if gone(request):
            return
        try:
            if failed is not None:
                raise HttpError(503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {failed}", msg["id"],
                                headers={b"retry-after": b"1"})
            check_params(request, msg, pool.tool_headers or {})
            body = self._call(request, pool, msg)
        except HttpError as e:
            if e.code == HEADER_MISMATCH:
                self.metrics.modern_outcome("header_mismatch")
            body = http_error_reply(request, e)
        if body is not NOT_DONE_YET and not request.finished:
            request.write(body)
            request.finish()

    def _call(self, request: Request, pool: ChildPool, msg: dict[str, Any]) -> Any:
        """Any other request: to a child (or, a retry with requestState, to the call parked for it)."""
        id = msg["id"]
        params = msg.get("params") or {}
        responses = params.get("inputResponses")
        if "inputResponses" in params and not _input_responses(responses):
            # 2026-07-28 mrtr Error Handling: a malformed InputResponses is a protocol error.
            raise HttpError(400, jsonrpc.INVALID_PARAMS, "Invalid params: inputResponses must be an object whose "
                                                         "values are result objects", id)
        if "requestState" in params:
            return self._retry(request, pool, msg, params["requestState"], responses or {})
        exchange = ModernExchange(self._ctx, pool, request, _meta(msg), self.metrics)
        try:
            exchange.pending = dispatch.pooled(self._ctx, pool, self._forwarded(msg), exchange, server=self._server.name,
                                               principal=principal_of(request), headers=request.requestHeaders,
                                               on_input=exchange.on_input)
        except PoolFull as e:
            exchange.done = True
            self._ctx.heartbeat.discard(exchange)
            request.setHeader(b"retry-after", b"%d" % e.retry_after)
            return error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}", id)
        exchange.outer = exchange.pending.route
        if responses:
            exchange.pending.offered = dict(responses)
        return NOT_DONE_YET

    def _retry(self, request: Request, pool: ChildPool, msg: dict[str, Any], state: Any, responses: dict[str, Any]) -> Any:
        """A retry carrying requestState: the parked call it names takes it over, or -32602 and no child sees it
        (2026-07-28 mrtr Server Requirements 4-5: integrity, principal, expiry, originating request, single use)."""
        try:
            pending = pool.claim(state, msg, identity_of(request))
        except StateRejected as e:
            self.metrics.modern_outcome("state_unknown")
            self.log.info("{server}: requestState refused ({kind})", server=self._server.name, kind=e.kind)
            raise HttpError(400, jsonrpc.INVALID_PARAMS, e.message, msg["id"], data={"requestState": e.kind}) from e
        exchange = ModernExchange(self._ctx, pool, request, _meta(msg), self.metrics)
        exchange.pending = dispatch.resumed(self._ctx, pool, pending, msg, responses, exchange, server=self._server.name,
                                            principal=principal_of(request), headers=request.requestHeaders)
        exchange.outer = exchange.pending.route
        exchange.pending.on_input = exchange.on_input  # a further round asks through this exchange
        self.metrics.modern_outcome("resumed")
        return NOT_DONE_YET

    def _unsupported(self, request: Request, requested: Any, id: Any) -> bytes:
        supported = self.supported()
        mark_fallback(request)  # an auto-mode client's probe: it falls back to initialize, not an error
        return error_reply(request, 400, jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
                           f"Bad Request: unsupported protocol version {requested!r} for server {self._server.name} "
                           f"(supported: {', '.join(supported)})",
                           id, data={"supported": supported, "requested": requested if isinstance(requested, str) else ""})

    def _check(self, request: Request, msg: dict[str, Any], header: str | None) -> None:
        """The 2026-07-28 request envelope and its mirror headers (Server Validation)."""
        id = msg["id"]
        for name in ROUTING_HEADERS:
            if len(request.requestHeaders.getRawHeaders(name, [])) > 1:
                raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name.decode()} was sent more than once", id)
        meta = _meta(msg)
        if meta is None or META_VERSION not in meta or META_CAPABILITIES not in meta:
            raise HttpError(400, jsonrpc.INVALID_PARAMS,
                            f"params._meta must carry {META_VERSION!r} and {META_CAPABILITIES!r}", id)
        version = meta[META_VERSION]
        if header is None or header != version:
            raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: MCP-Protocol-Version {header!r} does not match "
                                                  f"the body's protocol version {version!r}", id)
        method = msg["method"]
        if _header(request, b"mcp-method") != method:
            raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: Mcp-Method does not match the body's method {method!r}", id)
        key = NAME_BEARING.get(method)
        if key is not None:
            value = msg["params"].get(key)
            if value is not None and decode_header_value(_header(request, b"mcp-name")) != value:
                raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: Mcp-Name does not match the body's {key!r}", id)
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower().startswith(b"mcp-param-"):
                for value in values:
                    if decode_header_value(value.decode("latin-1")) is None:
                        raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name.decode('latin-1')} is not a valid value", id)
        if version not in MODERN_VERSIONS:
            supported = self.supported()
            mark_fallback(request)
            raise HttpError(400, jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
                            f"Bad Request: unsupported protocol version {version!r} (supported: {', '.join(supported)})", id,
                            data={"supported": supported, "requested": version if isinstance(version, str) else ""})

    @staticmethod
    def _forwarded(msg: dict[str, Any]) -> dict[str, Any]:
        """The request as the child gets it: unchanged, ``_meta`` included (a server that reads the per-request
        capabilities asks only for what this client can do), but for ``inputResponses``, which the gateway
        itself answers the child's requests from (``ChildPool.answer_offered``)."""
        params = msg["params"]
        if "inputResponses" not in params:
            return msg
        return {**msg, "params": {k: v for k, v in params.items() if k != "inputResponses"}}

    def _discover(self, request: Request, pool: ChildPool, id: Any) -> Any:
        def answer(init: dict[str, Any]) -> None:
            result: dict[str, Any] = {
                "supportedVersions": self.supported(),
                "capabilities": init.get("capabilities") or {},
                "resultType": "complete",
                "ttlMs": 0,
                "cacheScope": "private",
            }
            if isinstance(init.get("instructions"), str):
                result["instructions"] = init["instructions"]
            if init.get("serverInfo") is not None:
                result["_meta"] = {META_SERVER_INFO: init["serverInfo"]}
            _write_json(request, 200, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": result}))

        def failed(f: Any) -> None:
            if not gone(request):
                request.setHeader(b"retry-after", b"1")
                request.write(error_reply(request, 503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {f.getErrorMessage()}", id))
                request.finish()

        pool.ready().addCallbacks(answer, failed).addErrback(
            lambda f: self.log.failure("server/discover for {server} failed", f, server=self._server.name))
        return NOT_DONE_YET

    def _listen(self, request: Request, pool: ChildPool, msg: dict[str, Any]) -> Any:
        """subscriptions/listen: an SSE stream of the change notifications the client opted in to."""
        id = msg["id"]
        wanted = msg["params"].get("notifications")
        if not isinstance(wanted, dict):
            raise HttpError(400, jsonrpc.INVALID_PARAMS, "subscriptions/listen needs params.notifications", id)
        caps = (pool.init_result or {}).get("capabilities") or {}
        honored: dict[str, Any] = {}
        methods: set[str] = set()
        for key, (capability, method) in LIST_CHANGED.items():
            cap = caps.get(capability)
            if wanted.get(key) is True and isinstance(cap, dict) and cap.get("listChanged"):
                honored[key] = True
                methods.add(method)
        uris: list[str] = []
        resources = caps.get("resources")
        if isinstance(wanted.get("resourceSubscriptions"), list) and isinstance(resources, dict) and resources.get("subscribe"):
            uris = [u for u in wanted["resourceSubscriptions"] if isinstance(u, str)]
            honored["resourceSubscriptions"] = uris
        live = SseResponse(request, self._ctx.heartbeat)
        tag = {META_SUBSCRIPTION: id}
        live.write(frame(jsonrpc.dumps({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                                        "params": {"notifications": honored, "_meta": tag}})))
        watched = set(uris)

        def listener(raw: bytes, note: dict[str, Any]) -> None:
            method = note.get("method")
            params = params_of(note)
            if method in methods or (method == "notifications/resources/updated" and params.get("uri") in watched):
                live.write(frame(jsonrpc.dumps({**note, "params": {**params, "_meta": {**(params.get("_meta") or {}), **tag}}})))

        pool.listeners.add(listener)
        pool.subscribe(uris)

        def closed(_: Any) -> None:
            pool.listeners.discard(listener)
            pool.unsubscribe(uris)

        live.on_close(closed)
        return NOT_DONE_YET


def _input_responses(value: Any) -> bool:
    """Whether ``value`` is an InputResponses map: an object of result objects (2026-07-28 mrtr Core Types)."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())


def _write_json(request: Request, status: int, body: bytes) -> None:
    if gone(request):
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()
