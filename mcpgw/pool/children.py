"""A pool's children and the requests in flight on them: dispatch, id rewriting, replacement of
the children that die, limits.requestTimeout."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import jsonrpc, logs
from mcpgw.config import StdioServer
from mcpgw.deadlines import DeadlineQueue
from mcpgw.interfaces import IUpstreamDelegate
from mcpgw.pool.headers import ToolHeaders
from mcpgw.pool.inputs import InputParking
from mcpgw.pool.pending import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CHILD_VERSION,
    CLIENT_CAPABILITIES,
    CLIENT_INFO,
    INPUT_METHODS,
    Pending,
    PoolFull,
)
from mcpgw.pool.subscriptions import Subscriptions
from mcpgw.upstream import make_upstream


@implementer(IUpstreamDelegate)
class PooledChild:
    """One child of a pool; the gateway is its MCP client."""

    log = Logger(observer=logs.observer)
    routes_on_view = False

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


class ChildPool(ToolHeaders, InputParking, Subscriptions):
    """``poolSize`` initialized children of one server, and the requests in flight on them."""

    log = Logger(observer=logs.observer)

    def __init__(self, server: StdioServer, reactor: Any, request_timeout: float | None = None,
                 secret: str | None = None):
        self.server = server
        self._reactor = reactor
        self.size = server.poolSize
        self.queue = server.poolQueue
        self.children: list[PooledChild] = []
        #: The first child's initialize result (server/discover and pooled handshakes answer from it).
        self.init_result: dict[str, Any] | None = None
        self.running = False
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._prefix = f"g{secrets.token_hex(3)}-"
        self._pending: dict[str, Pending] = {}
        #: limits.requestTimeout: one timer, at the oldest request's deadline.
        self._deadlines: DeadlineQueue[str] = DeadlineQueue(
            reactor, request_timeout, lambda: ((gid, p.started) for gid, p in self._pending.items()), self._timed_out)
        self._waiting: list[Pending] = []
        self._init_inputs(secret)
        self._init_headers()
        self._init_subscriptions()
        self._ready_waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._backoff = BACKOFF_FIRST
        self._restarts: list[Any] = []

    @property
    def request_timeout(self) -> float | None:
        """limits.requestTimeout (seconds), or None."""
        return self._deadlines.timeout

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
        self._deadlines.stop()
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
        self.subscribed(child)
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
        self._deadlines.added()
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

    def _fail(self, pending: Pending, message: str, code: int = jsonrpc.CONNECTION_CLOSED) -> None:
        if self._take(pending.gid) is not None:
            if pending in self._waiting:
                self._waiting.remove(pending)
            pending.route.answer(pending.id, jsonrpc.error_bytes(pending.id, code, message))

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
        pending.route.answer(pending.id, jsonrpc.dumps(msg), msg)

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
            self.tools_changed()
        self.broadcast(msg)

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
