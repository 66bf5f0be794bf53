"""Pooled children: a few stdio MCP servers shared by every client of one server.

A server configured ``"sessions": "pooled"`` gets ``poolSize`` children that the
gateway starts and initializes itself (it is their MCP client: ``initialize``,
then ``notifications/initialized``). Client requests are spread over them:

- every request id is rewritten to a gateway-unique id (and the progress token
  with it), and the child's response gets the client's own id back, so ids that
  collide across clients (``1`` from everyone) never meet in a child;
- a request goes to the ready child with the fewest requests in flight; each
  child takes at most ``poolQueue`` at once, and beyond that the caller is told
  ``PoolFull`` (HTTP 503 with ``Retry-After``);
- a child that exits fails its in-flight requests at once (JSON-RPC -32000) and
  is replaced after a doubling backoff on the injected reactor; the other
  children's requests are untouched;
- a child's own request to its client (sampling, elicitation, roots) during a
  call becomes an ``InputRequiredResult`` for a 2026-07-28 caller when the call
  is the child's only one in flight that is not already waiting for its
  client's input (mcpgw.transports.modern); the requests such a call makes
  within ``INPUT_GATHER`` go out together, each under its own key; the call
  waits ``poolInputWait`` seconds for the client's retry, then the child's
  requests get JSON-RPC errors and the call ``notifications/cancelled``.
  Any other child request is answered with a JSON-RPC error at once: nothing
  waits for a client that cannot be asked;
- the ``x-mcp-header`` annotations of the tools (SEP-2243) are fetched with one
  ``tools/list`` when first needed, kept until a child says the list changed.

The pool keeps no per-client state beyond the requests in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from mcpgw import jsonrpc, logs
from mcpgw.config import GatewayConfig, ServerConfig
from mcpgw.upstream import make_upstream

#: The version the gateway offers its pooled children (the newest handshake version).
CHILD_VERSION = "2025-11-25"
#: What the gateway tells its pooled children it can do: sampling, elicitation and roots are
#: bridged to 2026-07-28 callers as InputRequiredResult (see module docstring).
CLIENT_CAPABILITIES: dict[str, Any] = {"sampling": {}, "elicitation": {"form": {}}, "roots": {}}
CLIENT_INFO = {"name": "mcpgw-pool", "version": "1"}
#: Backoff between replacements of a child that keeps dying (seconds): first, cap.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: Server-to-client methods that the 2026-07-28 InputRequiredResult flow can carry.
INPUT_METHODS = frozenset({"sampling/createMessage", "elicitation/create", "roots/list"})
#: A child's notifications that every pooled session hears (log lines and the like stay with one call, or nowhere).
SHARED_NOTIFICATIONS = frozenset({"notifications/tools/list_changed", "notifications/prompts/list_changed",
                                  "notifications/resources/list_changed"})
#: How long a parked call waits for the client's retry with inputResponses (seconds): the default of
#: ``mcpServers.NAME.poolInputWait``.
INPUT_WAIT = 60.0
#: How long further requests of a call that asked its client something are gathered into the same
#: InputRequiredResult (seconds): a child that asks several things at once sends them back to back.
INPUT_GATHER = 0.05
#: A child's own name for the inputRequests key of its request: ``params._meta["mcpgw/inputKey"]`` (taken out).
INPUT_KEY_META = "mcpgw/inputKey"
#: A child's request to its client -> the client capability it needs (every bridge checks it: ``undeclared``).
CAPABILITY_OF = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
#: The inputRequests key of a child's request that names none.
INPUT_KEYS = CAPABILITY_OF
#: What an MCP client SDK answers a request for a capability it does not have (mcp ClientSession's defaults).
NOT_SUPPORTED = {"sampling": "Sampling not supported", "elicitation": "Elicitation not supported",
                 "roots": "List roots not supported"}
#: A requestState as the gateway issues it: nonce . expiry (ms since the epoch) . MAC (both base64url).
_STATE = re.compile(r"([A-Za-z0-9_-]{22})\.([0-9]{1,16})\.([A-Za-z0-9_-]{43})")
_INPUT_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: An ``x-mcp-header`` value (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Types an ``x-mcp-header`` annotation may be on.
HEADER_TYPES = frozenset({"string", "integer", "boolean"})


def params_of(msg: dict[str, Any]) -> dict[str, Any]:
    """A message's params if they are an object, else an empty one."""
    params = msg.get("params")
    return params if isinstance(params, dict) else {}


def undeclared(method: Any, declared: Any) -> str | None:
    """The client capability a server-to-client request needs that the client did not declare, or None
    (2025-11-25 basic/lifecycle Capability Negotiation: a server asks only for what the client declared)."""
    needed = CAPABILITY_OF.get(method) if isinstance(method, str) else None
    if needed is None or (isinstance(declared, dict) and needed in declared):
        return None
    return needed


def capability_refusal(id: Any, capability: str) -> bytes:
    """The answer to a server's request for ``capability`` from a client that lacks it: what a client SDK
    without that capability answers (-32600, "Sampling not supported"), naming the undeclared capability."""
    return jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST,
                               f"{NOT_SUPPORTED[capability]}: the client did not declare the {capability} capability")


class StateRejected(Exception):
    """A retry's ``requestState`` the pool does not honour: the client gets -32602 with ``message``.

    ``kind``: ``tampered`` (not a token this gateway issued, or altered), ``foreign`` (issued to another
    identity), ``mismatch`` (issued for another request), ``expired``, ``replayed`` (already used) or
    ``unknown`` (genuine, but the call it names no longer exists).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class StateTokens:
    """``requestState`` tokens: ``nonce.expiry.MAC``, the MAC (HMAC-SHA256 with a key derived from
    ``session.secret``) over the server, the nonce naming the parked call, the expiry, the identity that
    received the token and the request it answers (method and name).

    2026-07-28 basic/utilities/mrtr, Server Requirements (Basic Workflow) 4-5: requestState is attacker
    controlled input; the server protects its integrity, binds it to the authenticated principal, a short
    expiry and the originating request, and enforces single use itself (``ChildPool._spent``).
    """

    def __init__(self, secret: str | None, server: str):
        root = (secret or secrets.token_hex(32)).encode()
        # Domain separation: the same session.secret also tags session ids (mcpgw.session.SessionIds).
        self._key = hmac.new(root, b"mcpgw requestState v1", hashlib.sha256).digest()
        self._server = server

    def issue(self, nonce: str, expires_ms: int, owner: str | None, method: str, name: Any) -> str:
        return f"{nonce}.{expires_ms}.{self.tag(nonce, expires_ms, owner, method, name)}"

    def tag(self, nonce: str, expires_ms: int, owner: str | None, method: str, name: Any) -> str:
        signed = json.dumps([self._server, nonce, expires_ms, owner, method, name if isinstance(name, str) else None],
                            separators=(",", ":")).encode()
        return _b64(hmac.new(self._key, signed, hashlib.sha256).digest())

    @staticmethod
    def parse(token: Any) -> tuple[str, int, str] | None:
        """(nonce, expiry in ms, MAC) of a well-formed token, else None."""
        m = _STATE.fullmatch(token) if isinstance(token, str) else None
        return None if m is None else (m[1], int(m[2]), m[3])


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def request_name(msg: dict[str, Any]) -> Any:
    """The name a requestState is bound to: a tools/call's or prompts/get's ``name``, a resources/read's ``uri``."""
    params = params_of(msg)
    return params.get("uri") if msg.get("method") == "resources/read" else params.get("name")


class PoolFull(Exception):
    """No child can take the request now: answer 503 with ``Retry-After``."""

    def __init__(self, reason: str, retry_after: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@attrs.define(eq=False)
class Pending:
    """One client request in a child: whom to answer, under which id."""

    route: Any
    id: Any
    gid: str
    method: str
    token: Any = None
    child: PooledChild | None = None
    #: ``reactor.seconds()`` when it came (limits.requestTimeout runs from here: ``ChildPool._expire``).
    started: float = 0.0
    #: The caller's hook for a child's request during this call (mcpgw.transports.modern), or None.
    on_input: Callable[[Pending, dict[str, Any]], bool] | None = None
    #: The rewritten request as sent to the child.
    raw: bytes = b""
    #: The child's requests to the client during this call not answered yet: inputRequests key -> the child's id.
    asked: dict[str, Any] = attrs.Factory(dict)
    #: The same: key -> {method, params} as the client sees it.
    inputs: dict[str, Any] = attrs.Factory(dict)
    #: The nonce of the requestState of an InputRequiredResult the call waits on (None: not waiting).
    state: str | None = None
    #: The gathering timer (INPUT_GATHER), then the waiting one (poolInputWait).
    input_timer: Any = None
    #: The identity that sent the call (mcpgw.auth; None while auth is off): its requestState is bound to it.
    owner: str | None = None
    #: The call's name (tool / prompt name, resource URI): its requestState is bound to it too.
    name: Any = None
    #: Answers the client sent with the call itself (``inputResponses`` without ``requestState``): a child's
    #: request whose key is among them is answered from them at once (2026-07-28 mrtr Error Handling).
    offered: dict[str, Any] | None = None


def header_annotations(schema: Any) -> list[tuple[tuple[str, ...], str, str]]:
    """A tool inputSchema's ``x-mcp-header`` annotations: (property path, lower-case header name, type).

    Only properties reached through ``properties`` keys count (SEP-2243 "statically reachable"); an
    annotation of an invalid name or type is left out, and a tool whose names collide has none.
    """
    found: list[tuple[tuple[str, ...], str, str]] = []

    def walk(props: Any, path: tuple[str, ...]) -> None:
        if not isinstance(props, dict):
            return
        for name, sub in props.items():
            if not isinstance(sub, dict):
                continue
            header = sub.get("x-mcp-header")
            if isinstance(header, str) and _TOKEN.fullmatch(header) and sub.get("type") in HEADER_TYPES:
                found.append(((*path, name), header.lower(), sub["type"]))
            walk(sub.get("properties"), (*path, name))

    if isinstance(schema, dict):
        walk(schema.get("properties"), ())
    if len({h for _, h, _ in found}) != len(found):
        return []
    return found


class _ToolsFetch:
    """The route of the gateway's own ``tools/list`` (every page) for the x-mcp-header cache."""

    def __init__(self, pool: ChildPool, generation: int):
        self.pool = pool
        self.generation = generation
        self.tools: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        self.pages = 0

    def next(self, cursor: Any = None) -> None:
        self.pages += 1
        params = {"cursor": cursor} if cursor is not None else {}
        self.pool.request({"jsonrpc": "2.0", "id": f"{self.pool._prefix}tools-{self.pages}", "method": "tools/list",
                           "params": params}, self)

    def answer(self, id: Any, raw: bytes) -> None:
        result = jsonrpc.loads(raw).get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            self.pool._tools_fetched(self, None)
            return
        for tool in result["tools"]:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                found = header_annotations(tool.get("inputSchema"))
                if found:
                    self.tools[tool["name"]] = found
        cursor = result.get("nextCursor")
        if isinstance(cursor, str) and cursor and self.pages < 100:
            try:
                self.next(cursor)
            except PoolFull:
                self.pool._tools_fetched(self, None)
            return
        self.pool._tools_fetched(self, self.tools)

    def deliver(self, raw: bytes) -> None:
        pass

    def forget(self, id: Any) -> None:
        self.pool._tools_fetched(self, None)


class PooledChild:
    """One child of a pool; the gateway is its MCP client."""

    log = Logger(observer=logs.observer)

    def __init__(self, pool: ChildPool, number: int):
        self.pool = pool
        self.number = number
        self.ready = False
        self.dead = False
        self.inflight: dict[str, Pending] = {}
        self.upstream = make_upstream(pool.server, self, pool._reactor)  # behind the server's tool filter
        self._init_id = f"mcpgw-init-{number}"

    def start(self) -> None:
        self.upstream.spawn()
        self.upstream.send(jsonrpc.dumps({
            "jsonrpc": "2.0", "id": self._init_id, "method": "initialize",
            "params": {"protocolVersion": CHILD_VERSION, "capabilities": CLIENT_CAPABILITIES, "clientInfo": CLIENT_INFO},
        }))

    @property
    def load(self) -> int:
        return len(self.inflight)

    # -- UpstreamDelegate ---------------------------------------------------

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        if "method" not in msg:
            if msg.get("id") == self._init_id:
                self._initialized(msg)
            else:
                self.pool._response(self, msg)
        elif "id" in msg:
            self.pool._server_request(self, msg)
        else:
            self.pool._notification(self, msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self.log.warn("pool {server} child {number}: {reason}", server=self.pool.server.name, number=self.number, reason=reason)
        self.upstream.stop()

    def upstreamEnded(self, reason: str) -> None:
        self.dead = True
        self.ready = False
        self.pool._child_died(self, f"MCP server {reason}")

    def _initialized(self, msg: dict[str, Any]) -> None:
        result = msg.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("protocolVersion"), str):
            self.log.error("pool {server} child {number}: initialize failed: {error}", server=self.pool.server.name,
                           number=self.number, error=msg.get("error"))
            self.upstream.stop()
            return
        self.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        self.ready = True
        self.pool._child_ready(self, result)


class ChildPool:
    """``poolSize`` initialized children of one server, and the requests in flight on them."""

    log = Logger(observer=logs.observer)
    #: The Session class this pool's sessions are made from (``pooled_session_factory``); None until asked for.
    _session_class: Callable[..., Any] | None = None

    def __init__(self, server: ServerConfig, reactor: Any, request_timeout: float | None = None,
                 secret: str | None = None):
        self.server = server
        self._reactor = reactor
        self.size = server.poolSize
        self.queue = server.poolQueue
        self.request_timeout = request_timeout
        self.children: list[PooledChild] = []
        #: The first child's initialize result (server/discover and pooled handshakes answer from it).
        self.init_result: dict[str, Any] | None = None
        self.running = False
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._prefix = f"g{secrets.token_hex(3)}-"
        self._pending: dict[str, Pending] = {}
        #: limits.requestTimeout: one timer, at the oldest request's deadline (``_expire``).
        self._deadline: Any = None
        self._waiting: list[Pending] = []
        #: requestState nonce -> a call waiting for the client's retry with its inputResponses.
        self._parked: dict[str, Pending] = {}
        #: requestState nonces already used -> (expiry ms, owner, method, name), kept until they expire
        #: (after that the expiry refuses them): a replay is told apart from a forgery. Oldest first.
        self._spent: dict[str, tuple[int, str | None, str, Any]] = {}
        self.tokens = StateTokens(secret, server.name)
        self.input_wait = float(getattr(server, "poolInputWait", INPUT_WAIT))
        #: Tool name -> its x-mcp-header annotations (tools without any left out); None: not fetched yet.
        self.tool_headers: dict[str, list[tuple[tuple[str, ...], str, str]]] | None = None
        self._tools_waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._tools_generation = 0
        self._ready_waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._backoff = BACKOFF_FIRST
        self._restarts: list[Any] = []
        #: Notification listeners (subscriptions/listen): callables of (raw, msg).
        self.listeners: set[Callable[[bytes, dict[str, Any]], None]] = set()
        #: Resource URIs some listener watches -> how many listeners; every ready child is subscribed to each.
        self._subscriptions: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.running = True
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        child = PooledChild(self, next(self._numbers))
        self.children.append(child)
        try:
            child.start()
        except OSError as e:
            self.log.error("pool {server}: cannot start a child: {error}", server=self.server.name, error=str(e))
            self.children.remove(child)
            self._schedule_restart()

    def stop(self) -> defer.Deferred[Any]:
        """Stop every child; fires when all have exited."""
        self.running = False
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        for pending in list(self._waiting):
            self._fail(pending, "gateway shutting down")
        self._waiting = []
        for waiter in self._ready_waiters:
            waiter.errback(PoolFull("gateway shutting down"))
        self._ready_waiters = []
        return defer.DeferredList([c.upstream.stop() for c in list(self.children)])

    def ready(self) -> defer.Deferred[dict[str, Any]]:
        """Fires with the cached initialize result once a child is initialized."""
        if self.init_result is not None:
            return defer.succeed(self.init_result)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def _child_ready(self, child: PooledChild, result: dict[str, Any]) -> None:
        self._backoff = BACKOFF_FIRST
        if self.init_result is None:
            self.init_result = result
        self.log.info("pool {server} child {number} ready pid={pid} ({version})", server=self.server.name,
                      number=child.number, pid=child.upstream.pid, version=result.get("protocolVersion"))
        for uri in self._subscriptions:
            self._send_own(child, "resources/subscribe", {"uri": uri})
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self.init_result)
        waiting, self._waiting = self._waiting, []
        for pending in waiting:
            self._dispatch(pending)

    def _child_died(self, child: PooledChild, reason: str) -> None:
        if child in self.children:
            self.children.remove(child)
        for pending in list(child.inflight.values()):
            self._fail(pending, reason)
        if self.running:
            self.log.warn("pool {server} child {number}: {reason}; replacing it in {delay}s", server=self.server.name,
                          number=child.number, reason=reason, delay=self._backoff)
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(delay, self._restart))

    def _restart(self) -> None:
        if self.running and len(self.children) < self.size:
            self._spawn()

    # -- requests -----------------------------------------------------------

    def request(self, msg: dict[str, Any], route: Any,
                on_input: Callable[[Pending, dict[str, Any]], bool] | None = None, owner: str | None = None) -> Pending:
        """Send client request ``msg`` to the least-loaded child; its response goes to ``route.answer``.
        ``owner``: the identity that sent it (a requestState issued for the call is bound to it).

        Raises PoolFull when every child has ``poolQueue`` requests in flight (or none can start).
        """
        child = self._least_loaded()
        if child is None:
            if not self.running or (not self.children and not self._restarts):
                raise PoolFull(f"server {self.server.name} has no running child")
            if any(c.ready for c in self.children) or len(self._waiting) >= self.queue * self.size:
                raise PoolFull(f"server {self.server.name}: every pooled child is busy (poolQueue={self.queue})")
        gid = f"{self._prefix}{next(self._ids)}"
        pending = Pending(route=route, id=msg["id"], gid=gid, method=str(msg.get("method")), on_input=on_input, owner=owner)
        params = msg.get("params")
        out = dict(msg)
        out["id"] = gid
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(params, dict) and isinstance(meta, dict) and "progressToken" in meta:
            pending.token = meta["progressToken"]
            out["params"] = {**params, "_meta": {**meta, "progressToken": gid}}
        pending.raw = jsonrpc.dumps(out)
        pending.started = self._reactor.seconds()
        self._pending[gid] = pending
        if self.request_timeout is not None and self._deadline is None:
            self._deadline = self._reactor.callLater(self.request_timeout, self._expire)
        if child is None:
            self._waiting.append(pending)
        else:
            self._send(child, pending)
        return pending

    def _least_loaded(self) -> PooledChild | None:
        best = None
        for child in self.children:
            if child.ready and child.load < self.queue and (best is None or child.load < best.load):
                best = child
        return best

    def _dispatch(self, pending: Pending) -> None:
        if pending.gid not in self._pending:
            return
        child = self._least_loaded()
        if child is None:
            self._fail(pending, f"server {self.server.name}: no pooled child could take the request")
            return
        self._send(child, pending)

    def _send(self, child: PooledChild, pending: Pending) -> None:
        pending.child = child
        child.inflight[pending.gid] = pending
        if not child.upstream.send(pending.raw):
            self._fail(pending, "MCP server is stopping")

    def cancel(self, pending: Pending, reason: str = "client closed the stream") -> None:
        """The caller went away: forget the request and tell its child (``notifications/cancelled``)."""
        if self._take(pending.gid, f"cancelled: {reason}") is None:
            return
        if pending in self._waiting:
            self._waiting.remove(pending)
        elif pending.child is not None:
            pending.child.upstream.send(jsonrpc.dumps({
                "jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": pending.gid, "reason": reason}}))

    def in_flight(self) -> int:
        return len(self._pending)

    def _take(self, gid: str, why: str = "the call is over") -> Pending | None:
        pending = self._pending.pop(gid, None)
        if pending is None:
            return None
        if pending.child is not None:
            pending.child.inflight.pop(gid, None)
        self._drop_inputs(pending, why)
        return pending

    def _drop_inputs(self, pending: Pending, why: str) -> None:
        """The call is over: its timers stop, and every request it still waits on gets an error in the child."""
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        pending.input_timer = None
        if pending.state is not None:
            self._parked.pop(pending.state, None)
            pending.state = None
        asked, pending.asked, pending.inputs = pending.asked, {}, {}
        child = pending.child
        if child is not None and not child.dead:
            for child_id in asked.values():
                child.upstream.send(jsonrpc.error_bytes(child_id, jsonrpc.REQUEST_CANCELLED, f"no input from the client: {why}"))

    @staticmethod
    def asker(child: PooledChild) -> Pending | None:
        """The call a child's request to its client (or log line) belongs to: the child's only call that is
        not waiting for its client's retry; None when there is none, or several (who asked is unknowable)."""
        found = None
        for pending in child.inflight.values():
            if pending.state is None:
                if found is not None:
                    return None
                found = pending
        return found

    def _fail(self, pending: Pending, message: str, code: int = jsonrpc.CONNECTION_CLOSED) -> None:
        if self._take(pending.gid) is not None:
            if pending in self._waiting:
                self._waiting.remove(pending)
            pending.route.answer(pending.id, jsonrpc.error_bytes(pending.id, code, message))

    def _expire(self) -> None:
        """Time out every request older than limits.requestTimeout, then wait for the next deadline:
        ``_pending`` keeps arrival order (as ``Session._expire``), so no timer per request."""
        self._deadline = None
        timeout = self.request_timeout
        if timeout is None:
            return
        now = self._reactor.seconds()
        for gid, pending in list(self._pending.items()):
            if pending.started + timeout > now:
                self._deadline = self._reactor.callLater(pending.started + timeout - now, self._expire)
                return
            self._timed_out(gid)

    def _timed_out(self, gid: str) -> None:
        pending = self._pending.get(gid)
        if pending is None:
            return
        reason = f"Request timed out after {self.request_timeout:g} s (limits.requestTimeout)"
        child = pending.child
        self._fail(pending, reason, jsonrpc.REQUEST_TIMEOUT)
        if child is not None:
            child.upstream.send(jsonrpc.dumps({
                "jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": gid, "reason": reason}}))

    # -- child -> clients ---------------------------------------------------

    def _response(self, child: PooledChild, msg: dict[str, Any]) -> None:
        gid = msg.get("id")
        pending = self._take(gid) if isinstance(gid, str) else None
        if pending is None:
            return  # an answer to a cancelled or timed-out request, or to the gateway's own request
        msg["id"] = pending.id
        pending.route.answer(pending.id, jsonrpc.dumps(msg))

    def _notification(self, child: PooledChild, msg: dict[str, Any]) -> None:
        method = msg.get("method")
        params = msg.get("params")
        if method == "notifications/progress" and isinstance(params, dict):
            token = params.get("progressToken")
            pending = self._pending.get(token) if isinstance(token, str) else None  # gids are strings
            if pending is not None:
                msg["params"] = {**params, "progressToken": pending.token}
                pending.route.deliver(jsonrpc.dumps(msg))
            return
        if method == "notifications/message":
            # A log line while the child runs exactly one call (not counting calls parked for input): that call's.
            owner = self.asker(child)
            if owner is not None:
                owner.route.deliver(jsonrpc.dumps(msg))
                return
        if method == "notifications/tools/list_changed":
            self.tool_headers = None
            self._tools_generation += 1
        if self.listeners:
            raw = jsonrpc.dumps(msg)
            for listener in list(self.listeners):
                listener(raw, msg)

    def _server_request(self, child: PooledChild, msg: dict[str, Any]) -> None:
        """The child asks its client something: bridge it for a 2026-07-28 call, else refuse at once."""
        method = msg.get("method")
        if method == "ping":
            child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {}}))
            return
        owners = list(child.inflight.values())
        owner = self.asker(child)
        if method in INPUT_METHODS and owner is not None and owner.on_input is not None and owner.on_input(owner, msg):
            return
        if method == "roots/list" and not owners:
            child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {"roots": []}}))
            return
        why = ("the calling client cannot be asked through a pooled child" if owners
               else "no client call is in progress on this pooled child")
        self.log.info("pool {server} child {number}: refused {method}: {why}", server=self.server.name,
                      number=child.number, method=method, why=why)
        child.upstream.send(jsonrpc.error_bytes(msg["id"], jsonrpc.METHOD_NOT_FOUND, f"{method} is not available: {why}"))

    # -- resource subscriptions (subscriptions/listen) -------------------------

    def subscribe(self, uris: list[str]) -> None:
        """A listener watches ``uris``: every ready child is asked for ``resources/subscribe`` once per URI."""
        for uri in uris:
            self._subscriptions[uri] = self._subscriptions.get(uri, 0) + 1
            if self._subscriptions[uri] == 1:
                for child in self.children:
                    if child.ready:
                        self._send_own(child, "resources/subscribe", {"uri": uri})

    def unsubscribe(self, uris: list[str]) -> None:
        for uri in uris:
            left = self._subscriptions.get(uri, 0) - 1
            if left > 0:
                self._subscriptions[uri] = left
                continue
            self._subscriptions.pop(uri, None)
            for child in self.children:
                if child.ready:
                    self._send_own(child, "resources/unsubscribe", {"uri": uri})

    def _send_own(self, child: PooledChild, method: str, params: dict[str, Any]) -> None:
        """A request of the gateway's own (its answer matches no client request and is dropped)."""
        child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": f"{self._prefix}own-{next(self._ids)}",
                                           "method": method, "params": params}))

    # -- InputRequiredResult (2026-07-28) -------------------------------------

    def input_key(self, pending: Pending, server_request: dict[str, Any], taken: Any) -> str:
        """The inputRequests key of a child's request: its ``_meta["mcpgw/inputKey"]`` hint, else the
        method's own name; made unique among ``taken`` with ``_2``, ``_3``..."""
        meta = params_of(server_request).get("_meta")
        hint = meta.get(INPUT_KEY_META) if isinstance(meta, dict) else None
        base = hint if isinstance(hint, str) and _INPUT_KEY.fullmatch(hint) else INPUT_KEYS.get(server_request["method"], "input")
        key, n = base, 2
        while key in taken:
            key, n = f"{base}_{n}", n + 1
        return key

    def answer_offered(self, pending: Pending, server_request: dict[str, Any]) -> bool:
        """The call came with ``inputResponses`` (and no requestState): if one answers this request of the
        child (same key), the child gets it at once and nothing is asked of the client; else False."""
        offered = pending.offered
        if not offered or pending.child is None:
            return False
        base = self.input_key(pending, server_request, ())
        key = next((k for k in [base, *(f"{base}_{n}" for n in range(2, len(offered) + 2))] if k in offered), None)
        if key is None:
            return False
        answer = offered.pop(key)
        pending.child.upstream.send(jsonrpc.dumps({"jsonrpc": "2.0", "id": server_request["id"], "result": answer}))
        return True

    def ask(self, pending: Pending, server_request: dict[str, Any],
            flush: Callable[[dict[str, Any], str], None]) -> str:
        """The child asks the caller of ``pending`` something: gather it (and whatever else the call asks
        within INPUT_GATHER), then park the call and ``flush(inputRequests, requestState)``; its key."""
        params = params_of(server_request)
        key = self.input_key(pending, server_request, pending.asked)
        meta = params.get("_meta")
        if isinstance(meta, dict) and INPUT_KEY_META in meta:
            meta = {k: v for k, v in meta.items() if k != INPUT_KEY_META}
            params = {**params, "_meta": meta} if meta else {k: v for k, v in params.items() if k != "_meta"}
        asked: dict[str, Any] = {"method": server_request["method"]}
        if params or "params" in server_request:
            asked["params"] = params
        pending.asked[key] = server_request["id"]
        pending.inputs[key] = asked
        if pending.input_timer is None:
            pending.input_timer = self._reactor.callLater(INPUT_GATHER, self._park, pending, flush)
        return key

    def _park(self, pending: Pending, flush: Callable[[dict[str, Any], str], None]) -> None:
        pending.input_timer = None
        if pending.gid not in self._pending or not pending.asked:
            return
        nonce = secrets.token_urlsafe(16)
        expires_ms = int((self._reactor.seconds() + self.input_wait) * 1000)
        if pending.name is None:
            pending.name = request_name(jsonrpc.loads(pending.raw))
        token = self.tokens.issue(nonce, expires_ms, pending.owner, pending.method, pending.name)
        pending.state = nonce
        self._parked[nonce] = pending
        pending.input_timer = self._reactor.callLater(self.input_wait, self._abandon, nonce)
        flush(dict(pending.inputs), token)

    def park(self, pending: Pending, server_request: dict[str, Any]) -> str:
        """Park ``pending`` at once on this one request of its child (its route is answered by the caller);
        the requestState. (What ``ask`` does after its gathering time, for callers that answer themselves.)"""
        issued: list[str] = []
        self.ask(pending, server_request, lambda inputs, state: None)
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        self._park(pending, lambda inputs, state: issued.append(state))
        return issued[0]

    def claim(self, token: Any, client_msg: dict[str, Any], owner: str | None = None) -> Pending:
        """The parked call a retry's ``requestState`` names, taken out of the parked set (a token is good
        once); StateRejected (-32602 for the client) when the token fails its MAC, belongs to another
        identity or request, has expired, was used already, or names a call that no longer exists."""
        parsed = StateTokens.parse(token)
        if parsed is None:
            raise StateRejected("tampered", "Invalid requestState: it failed its integrity check (tampered or not issued here)")
        nonce, expires_ms, tag = parsed
        method, name = str(client_msg.get("method")), request_name(client_msg)
        if not hmac.compare_digest(tag, self.tokens.tag(nonce, expires_ms, owner, method, name)):
            raise self._why_not_yours(nonce, expires_ms, tag, owner)
        if self._reactor.seconds() * 1000 >= expires_ms:
            raise StateRejected("expired", f"Invalid requestState: it expired (poolInputWait={self.input_wait:g} s); "
                                           "send the request again without requestState")
        if nonce in self._spent:
            raise StateRejected("replayed", "Invalid requestState: it was already used (a requestState is good for one retry)")
        pending = self._parked.pop(nonce, None)
        if pending is None:
            raise StateRejected("unknown", "Invalid requestState: the call it names no longer exists "
                                           "(it ended, or its server's child exited); send the request again without requestState")
        self._spend(nonce, expires_ms, pending)
        if pending.input_timer is not None and pending.input_timer.active():
            pending.input_timer.cancel()
        pending.input_timer = None
        pending.state = None
        return pending

    def _why_not_yours(self, nonce: str, expires_ms: int, tag: str, owner: str | None) -> StateRejected:
        """A token whose MAC does not hold for this identity and request: genuine but someone else's (or for
        another request), or forged."""
        record: tuple[Any, ...] | None = None
        pending = self._parked.get(nonce)
        if pending is not None:
            record = (pending.owner, pending.method, pending.name)
        elif nonce in self._spent:
            record = self._spent[nonce][1:]
        if record is not None and hmac.compare_digest(tag, self.tokens.tag(nonce, expires_ms, *record)):
            if record[0] != owner:
                return StateRejected("foreign", "Invalid requestState: it was issued to another identity")
            return StateRejected("mismatch", f"Invalid requestState: it was issued for another request ({record[1]} {record[2]!r})")
        return StateRejected("tampered", "Invalid requestState: it failed its integrity check (tampered or not issued here)")

    def _spend(self, nonce: str, expires_ms: int, pending: Pending) -> None:
        """Remember a used token until it expires (then its expiry refuses it); the oldest go first."""
        now_ms = self._reactor.seconds() * 1000
        while self._spent:
            oldest = next(iter(self._spent))
            if self._spent[oldest][0] > now_ms:
                break
            del self._spent[oldest]
        self._spent[nonce] = (expires_ms, pending.owner, pending.method, pending.name)

    def resume(self, pending: Pending, client_msg: dict[str, Any], responses: Any, route: Any) -> Pending:
        """A claimed call's retry: answer the child's requests from the client's inputResponses (an error for
        each key the client left out), re-route the call's eventual response to ``route`` under the retry's id."""
        pending.route = route
        pending.id = client_msg["id"]
        asked, pending.asked, pending.inputs = pending.asked, {}, {}
        child = pending.child
        assert child is not None
        for name, child_id in asked.items():
            answer = responses.get(name) if isinstance(responses, dict) else None
            if isinstance(answer, dict):
                reply = jsonrpc.dumps({"jsonrpc": "2.0", "id": child_id, "result": answer})
            else:
                reply = jsonrpc.error_bytes(child_id, jsonrpc.INVALID_PARAMS, f"the client gave no input for {name!r}")
            child.upstream.send(reply)
        return pending

    def parked(self) -> int:
        """Calls waiting for their client's retry with inputResponses."""
        return len(self._parked)

    def _abandon(self, nonce: str) -> None:
        pending = self._parked.get(nonce)
        if pending is not None:
            pending.input_timer = None
            self.log.info("pool {server}: {method} {gid} abandoned: no retry with its input within {wait}s",
                          server=self.server.name, method=pending.method, gid=pending.gid, wait=self.input_wait)
            self.cancel(pending, f"the client did not retry with its input within {self.input_wait:g} s")

    # -- x-mcp-header annotations (SEP-2243) -------------------------------------

    def headers_of_tools(self) -> defer.Deferred[dict[str, Any]]:
        """The tools' x-mcp-header annotations: cached, else fetched once (one tools/list, every page)."""
        if self.tool_headers is not None:
            return defer.succeed(self.tool_headers)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._tools_waiters.append(d)
        if len(self._tools_waiters) == 1:
            try:
                _ToolsFetch(self, self._tools_generation).next()
            except PoolFull as e:
                self._tools_fetched(None, None, e)
        return d

    def _tools_fetched(self, fetch: _ToolsFetch | None, tools: dict[str, Any] | None, error: Exception | None = None) -> None:
        waiters, self._tools_waiters = self._tools_waiters, []
        if tools is not None and fetch is not None and fetch.generation == self._tools_generation:
            self.tool_headers = tools
        for d in waiters:
            if tools is not None:
                d.callback(tools)
            else:
                d.errback(error or PoolFull(f"server {self.server.name}: tools/list failed"))


class PoolManager(Service):
    """Every pooled server's ChildPool: started with the gateway, stopped (children exited) with it."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: GatewayConfig, reactor: Any):
        self.pools: dict[str, ChildPool] = {
            name: ChildPool(server, reactor, config.limits.requestTimeout, config.session.secret)
            for name, server in config.servers.items()
            if server.sessions == "pooled" and server.url is None and getattr(server, "aggregate", None) is None
        }

    def get(self, server: ServerConfig) -> ChildPool | None:
        return self.pools.get(server.name)

    def startService(self) -> None:
        super().startService()
        for pool in self.pools.values():
            pool.start()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return defer.DeferredList([p.stop() for p in self.pools.values()])


# -- handshake-era sessions served by a pool -----------------------------------------------------


class _NoChild:
    """A pooled session's ``upstream``: it has no child of its own to start, pause or stop."""

    ended = True
    pid = None
    metrics: Any = None

    def send(self, raw: bytes, msg: Any = None) -> bool:
        return False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class _SessionRoute:
    """Between a pool and a pooled session's route: the session forgets the request once it is answered."""

    def __init__(self, session: Any, route: Any, id: Any):
        self.session = session
        self.route = route
        self.id = id

    def answer(self, id: Any, raw: bytes) -> None:
        self.session._inflight.pop(self.id, None)
        self.route.answer(id, raw)

    def deliver(self, raw: bytes) -> None:
        self.route.deliver(raw)

    def forget(self, id: Any) -> None:
        self.session._inflight.pop(self.id, None)
        self.route.forget(id)


def pooled_session_factory(pool: ChildPool) -> Callable[..., Any]:
    """A SessionManager.create factory whose sessions are served by ``pool`` (one class per pool)."""
    made = pool._session_class
    if made is None:
        made = pool._session_class = _pooled_session_class(pool)
    return made


def _pooled_session_class(pool: ChildPool) -> Callable[..., Any]:
    from mcpgw.session import Session

    class PooledSession(Session):
        """A handshake-era client session (2024-11-05 .. 2025-11-25) served by a ChildPool.

        ``initialize`` is answered from the pool's cached result with the version negotiated for
        this client; ``ping`` and ``logging/setLevel`` by the gateway; ``resources/subscribe`` and
        ``unsubscribe`` become the pool's shared subscriptions; everything else goes to the least-loaded
        child with a gateway-unique id. A child's sampling / elicitation / roots request while it runs
        only this session's call is relayed to the client on that call's stream (its answer goes back
        to the child). What the session gives up is in docs/protocol-versions.md.
        """

        def __init__(self, *args: Any, **kw: Any):
            super().__init__(*args, **kw)
            self.upstream = _NoChild()
            self.pool = pool
            self._inflight: dict[Any, Pending] = {}
            self._uris: set[str] = set()
            #: A child's requests relayed to this client: the id the client saw -> (child, the child's id).
            self._asked: dict[str, tuple[PooledChild, Any]] = {}
            #: The capabilities this client declared in its initialize (the pool's children saw the gateway's).
            self.client_capabilities: dict[str, Any] = {}

        def start(self) -> None:
            self.pool.listeners.add(self._notification)

        def request(self, msg: dict[str, Any], raw: bytes, route: Any) -> None:
            self.last_seen = self._reactor.seconds()
            id = msg["id"]
            method = msg["method"]
            self.metrics.request(method, len(raw))
            if self.ended:
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, self.end_reason))
                return
            if id in self._inflight:
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST, f"request id {id!r} is already in flight"))
                return
            if self.max_pending is not None and len(self._inflight) >= self.max_pending:
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED,
                                                     f"too many requests in flight on this session (limits.maxPendingRequests={self.max_pending})"))
                return
            if method == "initialize":
                self._initialize(msg, route)
                return
            params = params_of(msg)
            if method in ("ping", "logging/setLevel"):
                route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {}}))
                return
            if method in ("resources/subscribe", "resources/unsubscribe") and isinstance(params.get("uri"), str):
                uri = params["uri"]
                if method == "resources/subscribe" and uri not in self._uris:
                    self._uris.add(uri)
                    self.pool.subscribe([uri])
                elif method == "resources/unsubscribe" and uri in self._uris:
                    self._uris.discard(uri)
                    self.pool.unsubscribe([uri])
                route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {}}))
                return
            try:
                self._inflight[id] = self.pool.request(msg, _SessionRoute(self, route, id), on_input=self._relay)
            except PoolFull as e:
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {e.reason}"))

        def _initialize(self, msg: dict[str, Any], route: Any) -> None:
            from mcpgw.transports.common import SUPPORTED_VERSIONS

            id = msg["id"]
            params = params_of(msg)
            asked = params.get("protocolVersion")
            version = asked if asked in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]
            declared = params.get("capabilities")
            self.client_capabilities = declared if isinstance(declared, dict) else {}

            def answer(init: dict[str, Any]) -> None:
                self.protocol_version = version
                if self.on_version is not None:
                    self.on_version(self)
                route.answer(id, jsonrpc.dumps({"jsonrpc": "2.0", "id": id, "result": {**init, "protocolVersion": version}}))

            def failed(f: Any) -> None:
                route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, f.getErrorMessage()))

            self.pool.ready().addCallbacks(answer, failed).addErrback(
                lambda f: self.log.failure("pooled initialize for {session} failed", f, session=self.id))

        def _relay(self, pending: Pending, request: dict[str, Any]) -> bool:
            """The child asks sampling / elicitation / roots while running only this session's call: the
            request goes to the client on that call's stream, under an id of the gateway's. A request for a
            capability this client did not declare never reaches it: the gateway answers the child as the
            client's SDK would (the child itself was told the gateway's capabilities, not the client's)."""
            if pending.child is None:
                return False
            needed = undeclared(request.get("method"), self.client_capabilities)
            if needed is not None:
                pending.child.upstream.send(capability_refusal(request["id"], needed))
                return True
            key = f"{self.pool._prefix}ask-{next(self.pool._ids)}"
            self._asked[key] = (pending.child, request["id"])
            pending.route.deliver(jsonrpc.dumps({**request, "id": key}))
            return True

        def notify(self, msg: dict[str, Any], raw: bytes) -> None:
            """Client notifications and responses: an answer to a relayed child request goes back to that
            child under the child's id; a cancellation reaches the child under the gateway id; the rest
            (initialized, roots/list_changed) stop here."""
            self.last_seen = self._reactor.seconds()
            if "method" not in msg:
                mid = msg.get("id")
                asked = self._asked.pop(mid, None) if isinstance(mid, str) else None
                if asked is not None:
                    child, child_id = asked
                    child.upstream.send(jsonrpc.dumps({**msg, "id": child_id}))
                return
            if msg.get("method") == "notifications/cancelled":
                params = msg.get("params")
                rid = params.get("requestId") if isinstance(params, dict) else None
                pending = self._inflight.pop(rid, None) if isinstance(rid, (str, int)) else None
                if pending is not None:
                    self.pool.cancel(pending, "cancelled by the client")
                    pending.route.route.forget(rid)

        def _notification(self, raw: bytes, msg: dict[str, Any]) -> None:
            """A child's notification for every client: list changes, and updates of URIs this session watches."""
            if self.outlet is None or self.ended:
                return
            params = params_of(msg)
            method = msg.get("method")
            if method in SHARED_NOTIFICATIONS or (method == "notifications/resources/updated" and params.get("uri") in self._uris):
                self.outlet.unbound(raw, msg)

        def has_pending(self) -> bool:
            return bool(self._inflight)

        def pending_routes(self) -> list[Any]:
            return [p.route.route for p in self._inflight.values()]

        def close(self, reason: str = "session closed") -> defer.Deferred[None]:
            self._end(reason)
            return defer.succeed(None)

        def _end(self, reason: str) -> None:
            if self.ended:
                return
            self.pool.listeners.discard(self._notification)
            if self._uris:
                self.pool.unsubscribe(list(self._uris))
                self._uris.clear()
            asked, self._asked = self._asked, {}
            for child, child_id in asked.values():
                child.upstream.send(jsonrpc.error_bytes(child_id, jsonrpc.CONNECTION_CLOSED, reason))
            inflight, self._inflight = self._inflight, {}
            for id, pending in inflight.items():
                self.pool.cancel(pending, reason)
                pending.route.route.answer(id, jsonrpc.error_bytes(id, jsonrpc.CONNECTION_CLOSED, reason))
            super()._end(reason)

    return PooledSession
