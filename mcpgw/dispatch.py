"""Where a client's message goes to its session: the one path of every transport.

Streamable HTTP, HTTP+SSE, WebSocket, the 2026-07-28 requests and the cluster's owner side hand a
client's message here rather than to the session, and it goes on in this order:

1. the per-tool scope policy (``auth.oauth.toolScopes``, mcpgw.toolpolicy): ``refusal`` before any
   message of a POST goes on, then ``route_for``, which hides from a ``tools/list`` what the token
   may not call;
2. the request's span (mcpgw.tracing: the MCP server span, continuing the client's trace) and its
   upstream leg (the MCP client span), whose context the upstream gets in ``params._meta``
   (``mcpgw.tracing.inject``; a remote server as a ``traceparent`` header, another cluster instance
   in the forwarded message);
3. the session (``session.request``) or the pool (``pool.request``), which answers on an
   ``ObservedRoute``: the transport's route, wrapped so that the answer, as it passes, ends both
   spans and writes the audit line (mcpgw.audit).

With tracing off and no audit trail (or with a method the trail does not audit) nothing is made
or wrapped: after two identity checks the route goes to the session as it is.

Requests refused before they reach a session are audited here too: ``refused_message`` (a ``tools/call``
the token has no scope for, a WebSocket message over the rate limit) and ``refused_http`` (the
Guard's 401, 403 and 429, decided on the request head, before the JSON-RPC method is known: their
line says ``"method": "http"`` and the path).

One audit line per request, written by the instance that runs the session: a request that another
cluster instance took carries its client's address in the forwarded message, and its trace goes on
from that instance's span (``parent``), so both instances' spans are in one trace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from zope.interface import implementer

from mcpgw import jsonrpc, toolpolicy
from mcpgw.audit import AUDITED, NOOP_AUDIT, AuditEvent
from mcpgw.auth import InsufficientScope, Principal, principal_of
from mcpgw.config import StdioServer
from mcpgw.interfaces import ILocalSession, IRoute
from mcpgw.pool import PoolFull
from mcpgw.session import SessionRefused
from mcpgw.tracing import NOOP, NOOP_SPAN, Span, inject, inject_line, inject_meta
from mcpgw.transports.common import GatewayContext, discover_unsupported

T = TypeVar("T")
#: Outcomes that are not failures (the console's recent failed calls leave them out).
_NOT_FAILED = frozenset({"ok", "cancelled", "input_required"})
#: The outcome of an answer whose JSON-RPC error is the gateway's limits.requestTimeout.
TIMEOUT = "timeout"
#: A large result is searched for these rather than decoded (a 1 MiB result is not turned into objects
#: to learn whether it failed). A quote inside a JSON string is escaped, so neither matches there.
_IS_ERROR = (b'"isError":true', b'"isError": true')


def observed(ctx: GatewayContext, method: str) -> bool:
    """Whether a request of ``method`` gets spans or an audit line."""
    return ctx.tracer is not NOOP or (ctx.audit is not NOOP_AUDIT and method in AUDITED)


# -- refusals ----------------------------------------------------------------------------


def refusal(ctx: GatewayContext, principal: Principal | None, server: str, messages: list[Any], *,
            transport: str, headers: Any = None) -> tuple[Any, InsufficientScope] | None:
    """The first ``tools/call`` among ``messages`` the principal's token has no scope for, and why
    (mcpgw.toolpolicy.refusal); audited as ``forbidden``. None: every message may go on."""
    auth = ctx.auth
    if auth is None or auth.oauth is None:
        return None  # no scopes without auth.oauth (and no call made on every request to learn it)
    refused = toolpolicy.refusal(auth, principal, server, messages)
    if refused is not None:
        code = toolpolicy.FORBIDDEN if transport == "ws" else jsonrpc.CONNECTION_CLOSED
        refused_message(ctx, "forbidden", code, refused[0].msg, principal=principal, server=server,
                        transport=transport, headers=headers)
    return refused


def refused_message(ctx: GatewayContext, outcome: str, error_code: int, msg: Any, *, principal: Principal | None,
                    server: str, transport: str, headers: Any = None) -> None:
    """A client message refused before its session saw it: a span ended at once (a request's) and an
    audit line. ``msg``: the decoded message, or None when it did not decode (its method is then the
    transport's name)."""
    tracer, audit = ctx.tracer, ctx.audit
    if tracer is NOOP and audit is NOOP_AUDIT:
        return
    method = msg.get("method") if isinstance(msg, dict) else None
    method = method if isinstance(method, str) else transport
    params = msg.get("params") if isinstance(msg, dict) else None
    identity, client_ip = _who(principal)
    trace_id = None
    if isinstance(msg, dict) and "id" in msg and tracer is not NOOP:
        span = tracer.request(method, params, server=server, transport=transport, request_id=msg["id"],
                              identity=identity, client_ip=client_ip, headers=headers)
        span.end(outcome, error_code)
        trace_id = span.trace_id
    audit.record(AuditEvent(time=ctx.reactor.seconds(), method=method, outcome=outcome, identity=identity,
                            client_ip=client_ip, server=server, target=target_of(method, params),
                            trace_id=trace_id, error_code=error_code))


def refused_http(ctx: GatewayContext, request: Any, outcome: str, status: int, *, server: str, transport: str) -> None:
    """An HTTP request the Guard refused with ``status`` (401, 403, 429), most often on its head, before its
    body (and so its JSON-RPC method) was read: ``method`` "http", the path as ``target``."""
    tracer, audit = ctx.tracer, ctx.audit
    if tracer is NOOP and audit is NOOP_AUDIT:
        return
    identity, client_ip = _who(principal_of(request))
    name = server if server != "other" else None
    span = tracer.request("http", None, server=name, transport=transport, identity=identity, client_ip=client_ip,
                          headers=request.requestHeaders)
    span.set(http_status=status)
    span.end(outcome, jsonrpc.CONNECTION_CLOSED)
    audit.record(AuditEvent(time=ctx.reactor.seconds(), method="http", outcome=outcome, identity=identity,
                            client_ip=client_ip, server=name, target=request.path.decode("latin-1"),
                            trace_id=span.trace_id, error_code=jsonrpc.CONNECTION_CLOSED))


# -- requests ----------------------------------------------------------------------------


def relay(ctx: GatewayContext, session: Any, m: Any, route: Any, *, principal: Principal | None, transport: str,
          headers: Any = None) -> None:
    """One client message (a mcpgw.transports.common.Incoming) to its session: a notification or a
    response as it is, ``server/discover`` answered here, a request by ``request``."""
    if m.kind != jsonrpc.REQUEST:
        session.notify(m.msg, m.raw)
    elif m.msg["method"] == "server/discover":
        route.answer(m.msg["id"], discover_unsupported(m.msg["id"]))
    else:
        request(ctx, session, m.msg, m.raw, route, principal=principal, transport=transport, headers=headers)


def request(ctx: GatewayContext, session: Any, msg: dict[str, Any], raw: bytes, route: Any, *,
            principal: Principal | None, transport: str, headers: Any = None, span: Span | None = None) -> None:
    """Client request ``msg`` (``raw`` as received) to ``session``; its answer to ``route``.

    ``headers``: the HTTP request's (a client's ``traceparent`` there); ``span``: the request's span
    when the transport began it already (``begin``: an ``initialize`` that spawned the child)."""
    auth = ctx.auth
    if auth is not None and auth.oauth is not None:
        route = toolpolicy.route_for(auth, principal, session.server.name, msg, route)
    if ctx.tracer is NOOP and (ctx.audit is NOOP_AUDIT or msg["method"] not in AUDITED):
        session.request(msg, raw, route)  # nothing observes it: no object made, no byte changed
        return
    if principal is None:
        _observed(ctx, session, msg, raw, route, transport, None, None, headers, None, span)
    else:
        _observed(ctx, session, msg, raw, route, transport, principal.identity, principal.client_ip, headers, None, span)


def forward(ctx: GatewayContext, session: Any, msg: dict[str, Any], raw: bytes, route: Any, *, transport: str,
            identity: str | None, client_ip: str | None = None, parent: Mapping[str, str] | None = None,
            hidden: Any = None) -> None:
    """``session.request`` with the request's spans and audit line, the tool policy applied already: the
    cluster's owner side (the instance that took the request applied it, and ``hidden`` is what its
    ``tools/list`` answer leaves out). ``parent``: the trace context of that instance's span."""
    if hidden and msg.get("method") == "tools/list":
        route = toolpolicy.HiddenTools(route, frozenset(hidden))
    if not observed(ctx, msg["method"]):
        session.request(msg, raw, route)
        return
    _observed(ctx, session, msg, raw, route, transport, identity, client_ip, None, parent, None)


def _observed(ctx: GatewayContext, session: Any, msg: dict[str, Any], raw: bytes, route: Any, transport: str,
              identity: str | None, client_ip: str | None, headers: Any, parent: Mapping[str, str] | None,
              span: Span | None) -> None:
    """``session.request`` under the request's span and upstream leg, answering on an ObservedRoute.
    (Positional: every traced request passes here.)"""
    local = session.instance is None  # ISession.instance: None when this instance runs it
    server = session.server
    if span is None:
        span = ctx.tracer.request(msg["method"], msg.get("params"), server=server.name, transport=transport,
                                  request_id=msg["id"], session_id=session.id, identity=identity, client_ip=client_ip,
                                  headers=headers, parent=parent)
    else:
        span.set(session_id=session.id)
    pid = None
    stdio = type(server) is StdioServer  # (not ``server.kind``, a property: every traced request passes here)
    if local and stdio and server.sessions != "pooled":  # a child of its own: it reads the bytes only
        pid = session.upstream.pid
        leg = span.upstream("stdio", server=server.name, pid=pid)
        raw = inject_line(msg, raw, leg)
    else:
        pid = session.upstream.pid if local else None
        leg = _leg(span, session, local, msg)
        if local:  # a session owned elsewhere gets the context in the cluster's message (ObservedRoute.hop)
            msg, raw = inject(msg, raw, leg)
    call = ObservedRoute(ctx, route, span, leg, msg, server=server.name, identity=identity,
                         client_ip=client_ip, audited=local)
    session.request(msg, raw, call)
    if local and pid is None and stdio:  # a child started by this request
        leg.set(pid=session.upstream.pid)


def begin(ctx: GatewayContext, msg: dict[str, Any], *, server: str, transport: str, request: Any) -> Span:
    """The span of a request that sets a session up (``initialize``) before ``request`` hands it over:
    its setup steps (``setup``) are its children. NOOP_SPAN while tracing is off."""
    identity, client_ip = _who(principal_of(request))
    return ctx.tracer.request(msg["method"], msg.get("params"), server=server, transport=transport, request_id=msg["id"],
                              identity=identity, client_ip=client_ip, headers=request.requestHeaders)


def setup(span: Span, server: str, create: Callable[[], T]) -> T:
    """``create()`` (a new session, its child spawned) timed as the "spawn" step of ``span``; a failure
    ends ``span`` too (the request goes no further)."""
    step = span.child("spawn", server=server)
    try:
        made = create()
    except BaseException as e:
        outcome = "unavailable" if isinstance(e, SessionRefused) else "error"
        step.end(outcome)
        span.end(outcome, jsonrpc.CONNECTION_CLOSED)
        raise
    if ILocalSession.providedBy(made):
        step.set(pid=made.upstream.pid)
    step.end()
    return made


def pooled(ctx: GatewayContext, pool: Any, msg: dict[str, Any], route: Any, *, server: str,
           principal: Principal | None, headers: Any = None, on_input: Any = None) -> Any:
    """A 2026-07-28 request to ``server``'s pool (``pool.request``): the tool policy's route, the spans,
    the audit line, as for a session. Returns the pool's Pending; PoolFull goes on to the caller."""
    route = toolpolicy.route_for(ctx.auth, principal, server, msg, route)
    identity = principal.identity if principal is not None else None
    if not observed(ctx, msg["method"]):
        return pool.request(msg, route, on_input=on_input, owner=identity)
    call = _pool_call(ctx, msg, route, server=server, principal=principal, headers=headers)
    params = msg.get("params")
    sent = inject_meta(params, call.leg)
    try:
        return pool.request(msg if sent is params else {**msg, "params": sent}, call, on_input=on_input, owner=identity)
    except PoolFull:  # answered 503 by the caller
        call.settle("unavailable", jsonrpc.CONNECTION_CLOSED)
        raise


def resumed(ctx: GatewayContext, pool: Any, pending: Any, msg: dict[str, Any], responses: Any, route: Any, *,
            server: str, principal: Principal | None, headers: Any = None) -> Any:
    """A 2026-07-28 retry with ``requestState``: the parked call it claimed (``pending``) answers on
    ``route`` (``pool.resume``), under a span and audit line of its own."""
    if observed(ctx, msg["method"]):
        route = _pool_call(ctx, msg, route, server=server, principal=principal, headers=headers)
    return pool.resume(pending, msg, responses, route)


def _pool_call(ctx: GatewayContext, msg: dict[str, Any], route: Any, *, server: str, principal: Principal | None,
               headers: Any) -> ObservedRoute:
    identity, client_ip = _who(principal)
    span = ctx.tracer.request(msg["method"], msg.get("params"), server=server, transport="streamable",
                              request_id=msg["id"], identity=identity, client_ip=client_ip, headers=headers)
    return ObservedRoute(ctx, route, span, span.upstream("pool", server=server), msg, server=server,
                         identity=identity, client_ip=client_ip)


def _who(principal: Principal | None) -> tuple[str | None, str | None]:
    return (None, None) if principal is None else (principal.identity, principal.client_ip)


def _leg(span: Span, session: Any, local: bool, msg: dict[str, Any]) -> Span:
    """The upstream leg of request ``msg`` to ``session``: the hop to the cluster instance that owns it,
    or its server's kind (a pooled server's handshake-era session: its pool; an aggregate's: the member
    it goes to, when it is known before the request goes out)."""
    if not local:
        return span.upstream("cluster", node=session.instance)
    server = session.server
    if server.kind == "remote":
        return span.upstream("remote", server=server.name, url=server.url)
    if server.kind == "aggregate":
        params = msg.get("params")
        member = session.upstream.member_for(msg["method"], params) if isinstance(params, dict) else None
        return span.upstream("aggregate", server=server.name, member=member)
    if isinstance(server, StdioServer) and server.sessions == "pooled":
        return span.upstream("pool", server=server.name)
    return span.upstream("stdio", server=server.name, pid=session.upstream.pid)


def target_of(method: str, params: Any) -> str | None:
    """What an audit line names: the tool, the resource URI, the log level."""
    if not isinstance(params, dict):
        return None
    key = {"tools/call": "name", "resources/subscribe": "uri", "logging/setLevel": "level"}.get(method, "name")
    value = params.get(key)
    return value if isinstance(value, str) else None


def outcome_of(raw: bytes, msg: Any = None) -> tuple[str, int | None]:
    """How the JSON-RPC answer ``raw`` ended a request: ("ok", None), ("tool_error", None) for a
    CallToolResult with ``isError``, ("input_required", None), ("timeout", -32001) for the gateway's
    limits.requestTimeout, else ("error", its code). ``msg``: ``raw`` decoded, if the caller has it
    (IRoute.answer's: a session's upstream decodes every answer; a large one's result is undecoded)."""
    if msg is None:
        find = raw.find  # (``find``, not ``in``: measured cheaper on short answers)
        if find(b'"error"') < 0 and find(b"isError") < 0 and find(b"input_required") < 0 and find(b"\\u") < 0:
            # None of what a failure, a flagged result or an InputRequiredResult holds, nor an escape that
            # could spell one: "ok", known without turning the answer into objects.
            return "ok", None
        try:
            msg = jsonrpc.loads(raw) if len(raw) < jsonrpc.LARGE_MESSAGE else jsonrpc.route_view(raw)
        except (jsonrpc.DecodeError, ValueError):
            return "error", None
    if not isinstance(msg, dict):
        return "error", None
    error = msg.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        return (TIMEOUT if code == jsonrpc.REQUEST_TIMEOUT else "error"), code
    result = msg.get("result")
    if isinstance(result, jsonrpc.Undecoded):
        return ("tool_error", None) if any(n in result.raw for n in _IS_ERROR) else ("ok", None)
    if isinstance(result, dict):
        if result.get("isError") is True:
            return "tool_error", None
        if result.get("resultType") == "input_required":
            return "input_required", None
    return "ok", None


@implementer(IRoute)
class ObservedRoute:
    """A route whose answer closes its request's spans and writes its audit line on the way through.

    ``settle`` does that once, whichever comes first: the answer, the client's cancellation
    (``forget``), or the caller's word (a pool that was full, a call the client left)."""

    __slots__ = ("_audit", "_ctx", "_done", "_identity", "_msg", "_server", "_started", "client_ip", "leg", "route", "span")

    def __init__(self, ctx: GatewayContext, route: Any, span: Span, leg: Span, msg: dict[str, Any], *,
                 server: str, identity: str | None, client_ip: str | None, audited: bool = True):
        self._ctx = ctx
        self.route = route
        self.span = span
        self.leg = leg
        #: The request: its method, and its params for the audit line's target when a line is written.
        self._msg = msg
        self._server = server
        self._identity = identity
        self.client_ip = client_ip
        audit = ctx.audit
        self._audit = audit if audited and audit is not NOOP_AUDIT and msg["method"] in AUDITED else None
        self._started = ctx.reactor.seconds()
        self._done = False

    @property
    def open_stream(self) -> bool:
        return bool(self.route.open_stream)

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.route.answer(id, raw, msg)
        if not self._done:
            self.settle(*outcome_of(raw, msg))

    def deliver(self, raw: bytes) -> None:
        self.route.deliver(raw)

    def forget(self, id: Any) -> None:
        self.route.forget(id)
        self.settle("cancelled")

    def hop(self) -> tuple[dict[str, str] | None, str | None]:
        """What the cluster's message to the session's owner carries: the leg's trace context (None
        when it propagates none) and the client's address, for the owner's span and audit line."""
        carrier = self.leg.carrier()
        return (dict(carrier) if carrier else None), self.client_ip

    def settle(self, outcome: str, error_code: int | None = None) -> None:
        """End the spans and write the audit line (once)."""
        if self._done:
            return
        self._done = True
        span = self.span
        span.end(outcome, error_code)  # and its leg, if it is the span's latest (Span.end)
        self.leg.end(outcome, error_code)
        ctx = self._ctx
        duration = ctx.reactor.seconds() - self._started
        if span is not NOOP_SPAN:  # traced: its trace id is the exemplar of its latency bucket
            ctx.metrics.exemplar(self._msg["method"], duration, span)
        failed = outcome not in _NOT_FAILED
        if failed or self._audit is not None:
            method = self._msg["method"]
            event = AuditEvent(time=self._started, method=method, outcome=outcome, identity=self._identity,
                               client_ip=self.client_ip, server=self._server, target=target_of(method, self._msg.get("params")),
                               duration=duration, trace_id=span.trace_id, error_code=error_code)
            if failed:
                ctx.failures.add(event)
            if self._audit is not None:
                self._audit.record(event)


def settle(route: Any, outcome: str, error_code: int | None = None) -> None:
    """A request that ends without an answer through ``route`` (its caller answered or dropped it): the
    spans and audit line of ``route`` if it is an ObservedRoute, else nothing."""
    if isinstance(route, ObservedRoute):
        route.settle(outcome, error_code)


def hidden_tools(route: Any) -> frozenset[str]:
    """The tools a route's ``tools/list`` answer loses (toolpolicy.HiddenTools among its wrappers)."""
    while isinstance(route, ObservedRoute):
        route = route.route
    return route.hidden if isinstance(route, toolpolicy.HiddenTools) else frozenset()


def base_route(route: Any) -> Any:
    """The transport's own route under dispatch's and the tool policy's wrappers."""
    while isinstance(route, (ObservedRoute, toolpolicy.HiddenTools)):
        route = route.route
    return route
