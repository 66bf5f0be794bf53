"""Several gateway instances as one gateway, over Redis.

Every session lives in one instance, its *owner*: the one that created it and
runs its child. Its record in Redis names the owner. Any instance may receive a
client's request for it (nginx balances without stickiness):

- On the owner, nothing changes: the session is in memory, no Redis round trip.
- Elsewhere (the *receiving* instance) the session is looked up once in Redis
  and kept as a ``RemoteSession``: a stand-in with the Session interface the
  transports use. Its messages are published to the owner's channel; the owner
  writes them to the child. Answers, progress and server requests for a POST
  come back to the receiving instance through a ``RemoteRoute`` (the owner's
  Route for that POST), and go to its local ``PostExchange``.
- A Streamable HTTP GET stream may be held by any instance: the owner's outlet
  then has a ``RemoteGet`` that publishes server messages to it.
- Every SSE stream's events are also logged in a Redis stream (bounded, with
  the session's idle TTL). Event ids carry the holding instance
  (``<instance * 10^8 + n>_<seq>``), so ``Last-Event-ID`` can be resumed on any
  instance: it replays from Redis, then asks the holder for what came after
  (``RemoteLive``), exactly once.
- An owner that is gone (killed: no connection to Redis left, see
  ``InstanceRegistry.alive``; or its heartbeat key expired): 404, and the record
  is deleted, so the client initializes a new session. Redis down: sessions owned
  here go on; everything that needs another instance answers 503.

Messages between instances are ``<JSON header>\\n<payload>`` on the channel
``PREFIX to:INSTANCE``; the header's ``t`` says what it is (see docs/scaling.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from mcpgw import jsonrpc, logs
from mcpgw.config import GatewayConfig
from mcpgw.responding import gone
from mcpgw.store.redis import (
    InstanceRegistry,
    Keys,
    RedisConnection,
    RedisSessionStore,
    Script,
    client_name,
    new_instance_id,
    parse_url,
)
from mcpgw.transports.common import Deferring, HttpError, error_reply
from mcpgw.transports.sse import ReplayLog, SseResponse
from mcpgw.transports.streamable import PostExchange, StreamableOutlet

#: SSE stream numbers are ``instance * STREAM_BASE + n``: the instance that holds a stream is in its id.
STREAM_BASE = 10**8

#: KEYS[1] the stream's event log, KEYS[2] the session's set of logs; ARGV seq, event, MAXLEN, TTL ms.
APPEND = Script("""
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1] .. '-0', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""")


def holder_of(number: int) -> str | None:
    """The instance that holds SSE stream ``number`` (None: a single-instance number)."""
    instance = number // STREAM_BASE
    return str(instance) if instance else None


def _unavailable(what: str) -> HttpError:
    """A 503 that says what could not be done, never where Redis is or how it failed: the
    connection's own log lines carry that (with its address) for the operator."""
    return HttpError(503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {what}: session store unavailable (Redis)",
                     headers={b"retry-after": b"2"})


# -- the receiving instance's side -----------------------------------------------------


class RemoteLegacyOutlet:
    """The outlet of an HTTP+SSE session owned elsewhere: its SSE stream is on the owner."""

    def __init__(self, session: RemoteSession):
        self.session = session

    def answer(self, id: Any, raw: bytes) -> None:
        """Something the gateway itself answers (``server/discover``): written on the owner's stream."""
        self.session.cluster.forward(self.session, "emit", None, raw)

    def deliver(self, raw: bytes) -> None:
        self.session.cluster.forward(self.session, "emit", None, raw)

    def forget(self, id: Any) -> None:
        pass

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        pass

    def session_ended(self, reason: str) -> None:
        pass


class RemoteSession:
    """A session owned by another instance, as the transports here see it."""

    def __init__(self, cluster: Cluster, record: Any, server: Any):
        self.cluster = cluster
        self.id = record.id
        self.server = server
        self.transport = record.transport
        self.protocol_version = record.protocol_version
        self.owner = record.owner
        #: The instance that runs the session's child.
        self.instance = record.instance
        self.metrics = cluster.ctx.metrics.bound(record.transport, server.name)
        self.ended = False
        self.end_reason = ""
        self.refreshing = False
        self.last_used = cluster._reactor.seconds()
        #: Route ids of this session's POSTs waiting here.
        self.routes: set[int] = set()
        self._route_ids: dict[Any, int] = {}
        self.outlet: Any = RemoteLegacyOutlet(self) if self.transport == "sse" else cluster.remote_outlet(self)

    # What the transports call

    def request(self, msg: dict[str, Any], raw: bytes, route: Any) -> None:
        self.last_used = self.cluster._reactor.seconds()
        if self.ended:
            route.answer(msg["id"], jsonrpc.error_bytes(msg["id"], jsonrpc.CONNECTION_CLOSED, self.end_reason))
            return
        if route is self.outlet:
            self.cluster.forward(self, "post", None, raw)
            return
        rid = self._route_ids.get(route)
        if rid is None:
            rid = self._route_ids[route] = self.cluster.add_route(route, self)
            self.routes.add(rid)
            if isinstance(route, PostExchange):
                route.request.notifyFinish().addErrback(lambda _: self.cluster.route_closed(self, rid))
        self.cluster.forward(self, "post", rid, raw)

    def notify(self, msg: dict[str, Any], raw: bytes) -> None:
        self.last_used = self.cluster._reactor.seconds()
        if not self.ended:
            self.cluster.forward(self, "post", None, raw)

    def close(self, reason: str = "session closed") -> defer.Deferred[None]:
        if not self.ended:
            self.cluster.forward(self, "del", None, reason.encode())
            self.cluster.forget_remote(self, reason, status=404)
        return defer.succeed(None)

    def has_pending(self) -> bool:
        return bool(self.routes)

    def pending_routes(self) -> list[Any]:
        return [self.cluster.routes[rid] for rid in self.routes if rid in self.cluster.routes]

    def route_done(self, route: Any) -> None:
        rid = self._route_ids.pop(route, None)
        if rid is not None:
            self.routes.discard(rid)

    def active(self) -> bool:
        """Something here still waits on the owner (a POST, a stream)."""
        if self.routes:
            return True
        outlet = self.outlet
        return isinstance(outlet, StreamableOutlet) and any(
            s.live is not None and not s.done for s in outlet.streams.values())

    # The producer of this session's SSE responses: backpressure stays on the owner.

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class MirroredLog:
    """An EventStream's replay log, also appended to the stream's log in Redis."""

    def __init__(self, local: ReplayLog, cluster: Cluster, session_id: str, number: int):
        self._local = local
        self._cluster = cluster
        self._key = cluster.keys.events(session_id, number)
        self._set = cluster.keys.streams(session_id)

    def append(self, seq: int, event: bytes) -> None:
        self._local.append(seq, event)
        self._cluster.log_event(self._key, self._set, seq, event)

    def after(self, seq: int) -> list[bytes]:
        return self._local.after(seq)


class ClusterOutlet(StreamableOutlet):
    """A Streamable HTTP session's streams on this instance: numbered by instance, logged in Redis,
    resumable from any instance."""

    def __init__(self, session: Any, ctx: Any):
        super().__init__(session, ctx)
        self.cluster: Cluster = ctx.cluster

    def new_stream(self) -> Any:
        # Numbered by the instance's own counter: unique among all of the session's streams anywhere.
        self._next = self.cluster.next_stream() - 1
        stream = super().new_stream()
        stream.log = MirroredLog(stream.log, self.cluster, self.session.id, stream.number)
        return stream

    def resume(self, request: Request, number: int, seq: int) -> bool:
        if number in self.streams:
            return super().resume(request, number, seq)
        holder = holder_of(number)
        if holder is None or holder == self.cluster.instance:
            return False
        self.cluster.resume_elsewhere(self, request, holder, number, seq)
        return True

    def get_attached(self) -> None:
        """The GET stream has a live response again (here or on another instance)."""
        self._flush_backlog()


class RemoteOutlet(ClusterOutlet):
    """The streams held here of a Streamable HTTP session owned by another instance."""

    session: Any  # a RemoteSession

    #: The route id under which the owner knows this instance's GET stream.
    get_rid: int | None = None

    def open_get(self, request: Request) -> None:
        self.cluster.open_remote_get(self, request)

    def open_get_now(self, request: Request, rid: int) -> None:
        """The owner agreed: serve the GET stream here."""
        self.get_rid = rid
        self.cluster.gets[rid] = self
        super().open_get(request)
        self._watch_get()

    def resume(self, request: Request, number: int, seq: int) -> bool:
        resumed = super().resume(request, number, seq)
        if resumed and self.get_stream is not None and self.streams.get(number) is self.get_stream:
            self._watch_get()
        return resumed

    def get_attached(self) -> None:
        self._watch_get()

    def _watch_get(self) -> None:
        stream = self.get_stream
        if stream is None or stream.live is None or self.get_rid is None:
            return
        rid = self.get_rid
        self.cluster.forward(self.session, "gl", rid, b"")
        live = stream.live

        def detached(_: Any) -> None:
            if self.get_rid == rid and (self.get_stream is None or self.get_stream.live is None):
                self.cluster.forward(self.session, "gx", rid, b"")

        live.on_close(detached)

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        """Only the owner routes server messages; one for the GET stream here comes as ``u``."""

    def session_ended(self, reason: str) -> None:
        super().session_ended(reason)
        if self.get_rid is not None:
            self.cluster.gets.pop(self.get_rid, None)


class RemoteLive:
    """The live response of one of this instance's streams, open on another instance (a resume there)."""

    def __init__(self, cluster: Cluster, instance: str, rid: int):
        self._cluster = cluster
        self.instance = instance
        self.rid = rid
        self.open = True
        self._on_close: list[Callable[[Any], None]] = []

    def on_close(self, callback: Callable[[Any], None]) -> None:
        self._on_close.append(callback)

    def write(self, data: bytes) -> None:
        if self.open and data:
            self._cluster.send(self.instance, {"t": "w", "r": self.rid}, data).addCallbacks(self._heard, lambda f: self.gone())

    def write_many(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def keepalive(self) -> None:
        pass

    def finish(self) -> None:
        if self.open:
            self._cluster.tell(self.instance, {"t": "fin", "r": self.rid})
            self.gone()

    def gone(self) -> None:
        if self.open:
            self.open = False
            self._cluster.lives_out.pop((self.instance, self.rid), None)
            callbacks, self._on_close = self._on_close, []
            for cb in callbacks:
                cb(self)

    def _heard(self, receivers: int) -> None:
        if receivers == 0:
            self.gone()


class _Pipe:
    """The receiving end of a resumed stream held by another instance: its frames -> our response."""

    def __init__(self) -> None:
        self.response: SseResponse | None = None
        self.buffer: list[bytes] = []
        self.finished = False

    def write(self, data: bytes) -> None:
        if self.response is not None:
            self.response.write(data)
        else:
            self.buffer.append(data)

    def finish(self) -> None:
        self.finished = True
        if self.response is not None:
            self.response.finish()


# -- the owner's side ---------------------------------------------------------------


class RemoteRoute:
    """The owner's Route for a POST waiting on another instance: answers are published to it."""

    def __init__(self, cluster: Cluster, session: Any, instance: str, rid: int):
        self._cluster = cluster
        self.session = session
        self.instance = instance
        self.rid = rid
        self.waiting: set[Any] = set()
        self.closed = False
        self.lost = False

    @property
    def open_stream(self) -> bool:
        """Server messages may go to it (StreamableOutlet.unbound): its POST still waits."""
        return bool(self.waiting) and not self.closed and not self.lost

    def answer(self, id: Any, raw: bytes) -> None:
        self.waiting.discard(id)
        self._send({"t": "a", "r": self.rid, "id": id}, raw)
        self._maybe_done()

    def deliver(self, raw: bytes) -> None:
        self._send({"t": "d", "r": self.rid}, raw)

    def forget(self, id: Any) -> None:
        self.waiting.discard(id)
        self._send({"t": "f", "r": self.rid, "id": id}, b"")
        self._maybe_done()

    def _send(self, header: dict[str, Any], payload: bytes) -> None:
        if self.lost:
            return
        d = self._cluster.send(self.instance, header, payload)
        d.addCallbacks(self._sent, lambda f: self.lose(f.getErrorMessage()))

    def _sent(self, receivers: int) -> None:
        if not receivers:
            self.lose("nobody listens there")

    def _maybe_done(self) -> None:
        if not self.waiting:
            self._cluster.routes_out.pop((self.instance, self.rid), None)

    def lose(self, why: str) -> None:
        """The instance that waits for this POST is unreachable: cancel its requests at the child."""
        if self.lost:
            return
        self.lost = True
        self._cluster.routes_out.pop((self.instance, self.rid), None)
        for id in list(self.waiting):
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                      "params": {"requestId": id, "reason": f"the client's gateway instance is unreachable ({why})"}}
            if not self.session.ended:
                self.session.notify(cancel, jsonrpc.dumps(cancel))
        self.waiting.clear()


class RemoteGet:
    """The owner's view of a session's GET stream held by another instance."""

    def __init__(self, cluster: Cluster, instance: str, rid: int):
        self._cluster = cluster
        self.instance = instance
        self.rid = rid
        #: True while the client is connected there (StreamableOutlet checks ``live is not None``).
        self.live: bool | None = True
        self.done = False

    def emit(self, raw: bytes) -> None:
        d = self._cluster.send(self.instance, {"t": "u", "r": self.rid}, raw)
        d.addCallbacks(lambda n: None if n else self._unreachable(), lambda f: self._unreachable())

    def close(self) -> None:
        self.done = True

    def _unreachable(self) -> None:
        self.live = None


# -- the cluster ----------------------------------------------------------------------


class Cluster(MultiService):
    """This instance's part of a gateway cluster: Redis connection, session store, heartbeat, routing."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: GatewayConfig, reactor: Any, metrics: Any = None, instance: str | None = None):
        assert config.redis is not None
        self.redis_config = config.redis
        self.config = config
        self._reactor = reactor
        self.instance = instance or new_instance_id()
        self.keys = Keys(config.redis.keyPrefix)
        self.redis = RedisConnection(parse_url(config.redis.url, config.redis.password), reactor,
                                     timeout=config.redis.timeout, metrics=metrics)
        self.redis.client_name = client_name(self.keys, self.instance)
        self.max_age = config.session.maxAge / 1000.0
        touch = min(30.0, max(config.redis.heartbeat, self.max_age / 4))
        self.store = RedisSessionStore(self.redis, self.keys, self.instance, config.session.maxAge, reactor,
                                       grace=2 * touch + config.redis.heartbeat)
        self.store.on_remove = self._session_removed
        self.registry = InstanceRegistry(self.redis, self.store, reactor, interval=config.redis.heartbeat,
                                         touch_interval=touch)
        super().__init__()
        self.redis.setServiceParent(self)
        self.registry.setServiceParent(self)
        self.redis.subscribe(self.keys.channel(self.instance), self._received)
        self.redis.on_change(self._redis_changed)
        self.ctx: Any = None
        self.sessions: Any = None
        self.outlet = ClusterOutlet
        self._sweeper: LoopingCall | None = None
        self._next_rid = 0
        self._streams = 0
        # receiving side
        self.remote: dict[str, RemoteSession] = {}
        self.routes: dict[int, Any] = {}
        self._route_session: dict[int, RemoteSession] = {}
        self.gets: dict[int, RemoteOutlet] = {}
        self.pipes: dict[int, _Pipe] = {}
        self._acks: dict[int, defer.Deferred[str]] = {}
        self._looking: dict[str, list[tuple[Request, Callable[[Request], Any]]]] = {}
        #: Requests rendered again after a lookup: a second miss for one of them is a 404, not another lookup.
        self._rendered_again: weakref.WeakSet[Request] = weakref.WeakSet()
        # owning side
        self.routes_out: dict[tuple[str, int], RemoteRoute] = {}
        self.lives_out: dict[tuple[str, int], RemoteLive] = {}
        self.peers: dict[str, set[str]] = {}
        self._handlers = {
            "post": self._on_post, "emit": self._on_emit, "del": self._on_delete, "rc": self._on_route_closed,
            "get": self._on_get, "gl": self._on_get_live, "gx": self._on_get_gone, "att": self._on_attach,
            "lx": self._on_live_gone, "a": self._on_answer, "d": self._on_deliver, "f": self._on_forget,
            "gone": self._on_gone, "end": self._on_end, "ack": self._on_ack, "u": self._on_unbound,
            "w": self._on_write, "fin": self._on_finish,
        }
        self._log_failures = 0

    def bind(self, ctx: Any) -> None:
        """Serve the gateway of ``ctx`` (its SessionManager's store is ``self.store``)."""
        self.ctx = ctx
        self.sessions = sessions = ctx.sessions
        sessions.unavailable = self.unavailable
        self.registry._sessions = lambda: list(sessions.sessions.values())

    # -- state ---------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why this instance is not ready (for ``/ready``), or None."""
        problem = self.redis.problem()
        return None if problem is None else f"redis: {problem}"

    def unavailable(self) -> str | None:
        """Why no new session can start now: one other instances could not find."""
        if self.redis.available:
            return None
        return "session store unavailable (Redis)"  # the why and where are in the log, not for clients

    def startService(self) -> None:
        self.log.info("cluster: instance {instance}, Redis at {address}", instance=self.instance,
                      address=self.redis.address.describe())
        super().startService()  # the connection, then the registry (children in order)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self._reactor
        self._sweeper.start(max(self.redis_config.heartbeat, 0.5), now=False).addErrback(
            lambda f: self.log.failure("cluster sweeper stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)  # not MultiService's: the children stop in order, not all at once
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        # The registry's DEL is answered after every write the sessions' shutdown queued before it.
        await self.registry.stopService()
        await self.redis.stopService()

    def _redis_changed(self, available: bool) -> None:
        if available:
            return
        # Nothing published now can be answered: fail what waits on other instances.
        why = "Redis connection lost"
        for remote in list(self.remote.values()):
            self._fail_routes(remote, 503, f"Service Unavailable: {why}; the session's instance cannot be reached")
            if isinstance(remote.outlet, StreamableOutlet):
                for stream in list(remote.outlet.streams.values()):
                    if stream.live is not None:
                        stream.live.finish()
        for pipe in list(self.pipes.values()):
            pipe.finish()
        self.pipes.clear()
        for route in list(self.routes_out.values()):
            route.lose(why)
        for live in list(self.lives_out.values()):
            live.gone()
        for session in list(self.sessions.sessions.values()) if self.sessions else []:
            outlet = session.outlet
            if isinstance(outlet, ClusterOutlet) and isinstance(outlet.get_stream, RemoteGet):
                outlet.get_stream.live = None

    # -- messages -----------------------------------------------------------------

    def send(self, instance: str, header: dict[str, Any], payload: bytes = b"") -> defer.Deferred[int]:
        """Publish one message to ``instance``; fires with how many got it (0: nobody listens)."""
        return self.redis.publish(self.keys.channel(instance), jsonrpc.dumps(header) + b"\n" + payload)

    def tell(self, instance: str, header: dict[str, Any], payload: bytes = b"") -> None:
        """``send``, for a message whose delivery nothing waits on."""
        self.send(instance, header, payload).addErrback(
            lambda f: self.log.debug("cluster: {t} to {instance} not sent: {e}", t=header.get("t"), instance=instance,
                                     e=f.getErrorMessage()))

    def _received(self, data: bytes) -> None:
        head, _, payload = data.partition(b"\n")
        header = jsonrpc.loads(head)
        handler = self._handlers.get(header.get("t"))
        if handler is None:
            self.log.warn("cluster: unknown message type {t!r} dropped", t=header.get("t"))  # noqa: G010 (twisted.logger)
            return
        handler(header, payload)

    def next_stream(self) -> int:
        self._streams += 1
        return int(self.instance) * STREAM_BASE + self._streams

    def new_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    def call(self, instance: str, header: dict[str, Any]) -> defer.Deferred[str]:
        """Publish a message that the other instance acknowledges (``ack``); fires with its status,
        "unreachable" when nobody listens, RedisUnavailable or a timeout otherwise."""
        rid = header["r"]
        waiting: defer.Deferred[str] = defer.Deferred()
        self._acks[rid] = waiting

        def sent(receivers: int) -> None:
            if receivers == 0 and not waiting.called:
                self._acks.pop(rid, None)
                waiting.callback("unreachable")

        def failed(f: Any) -> None:
            if not waiting.called:
                self._acks.pop(rid, None)
                waiting.errback(f)

        self.send(instance, header).addCallbacks(sent, failed)
        waiting.addTimeout(3 * self.redis.timeout, self._reactor)
        waiting.addBoth(lambda r: (self._acks.pop(rid, None), r)[1])
        return waiting

    def _on_ack(self, h: dict[str, Any], payload: bytes) -> None:
        waiting = self._acks.pop(h["r"], None)
        if waiting is not None and not waiting.called:
            waiting.callback(h["status"])

    # -- finding a session owned elsewhere ------------------------------------------

    def session(self, session_id: str, identity: str | None, request: Request, render: Callable[[Request], Any]) -> Any:
        """The RemoteSession for ``session_id``, or None (unknown: 404).

        The first request for a session owned elsewhere is held while its record is
        read from Redis (``Deferring``), then ``render(request)`` runs again.
        """
        remote = self.remote.get(session_id) if session_id else None
        if remote is not None:
            if remote.owner != identity:
                return None
            if not self.redis.available:
                raise _unavailable("the session is owned by another gateway instance")
            if remote.protocol_version is None and not remote.refreshing:
                self._refresh(remote)
            return remote
        if not session_id or not self.sessions.ids.valid(session_id):
            return None  # forged: never looked up
        if request in self._rendered_again or session_id in self.sessions.sessions:
            return None  # looked up already, or ours (and another identity's): 404
        if not self.redis.available:
            raise _unavailable("cannot look the session up")
        waiters = self._looking.get(session_id)
        if waiters is not None:
            waiters.append((request, render))
            raise Deferring()
        self._looking[session_id] = [(request, render)]
        d = defer.Deferred.fromCoroutine(self._lookup(session_id))
        d.addBoth(self._looked_up, session_id)
        d.addErrback(lambda f: self.log.failure("cluster: after looking up session {session}", f, session=session_id))
        raise Deferring()

    def _refresh(self, remote: RemoteSession) -> None:
        """Read the record again for what the owner learnt after we first read it (the protocol version)."""
        remote.refreshing = True

        def read(record: Any) -> None:
            remote.refreshing = False
            if record is not None and record.protocol_version is not None:
                remote.protocol_version = record.protocol_version

        def failed(f: Any) -> None:
            remote.refreshing = False

        self.store.get(remote.id).addCallbacks(read, failed)

    async def _lookup(self, session_id: str) -> RemoteSession | None:
        record = await self.store.get(session_id)
        if record is None or record.instance is None:
            return None
        server = self.config.servers.get(record.server)
        if server is None:
            return None
        if record.instance == self.instance:  # ours, but not in memory: a leftover
            if session_id not in self.sessions.sessions and self.store.local(session_id) is None:
                await self.store.remove(session_id)
            return None
        if not await self.registry.alive(record.instance):
            self.log.info("cluster: session {session} belonged to instance {instance}, which is gone; record removed",
                          session=session_id, instance=record.instance)
            await self.store.remove(session_id)
            return None
        return RemoteSession(self, record, server)

    def _looked_up(self, result: Any, session_id: str) -> None:
        waiters = self._looking.pop(session_id, [])
        if isinstance(result, Failure):
            self.log.info("cluster: lookup of session {session} failed: {error}", session=session_id,
                          error=result.getErrorMessage())
            e = _unavailable("cannot look the session up")
            for request, _ in waiters:
                if not gone(request):
                    self._reply(request, e)
            return
        if result is not None:
            self.remote.setdefault(session_id, result)
        for request, render in waiters:
            self._render_again(request, render)

    def _render_again(self, request: Request, render: Callable[[Request], Any]) -> None:
        if gone(request):
            return
        self._rendered_again.add(request)
        try:
            body = render(request)
        except Exception:  # noqa: BLE001 - what twisted.web does for a render that raises
            request.processingFailed(Failure())
            return
        if body is not NOT_DONE_YET and not request.finished:
            if body:
                request.write(body)
            request.finish()

    # -- forwarding (receiving side) --------------------------------------------------

    def remote_outlet(self, session: RemoteSession) -> RemoteOutlet:
        return RemoteOutlet(session, self.ctx)

    def add_route(self, route: Any, session: RemoteSession) -> int:
        rid = self.new_rid()
        self.routes[rid] = route
        self._route_session[rid] = session
        return rid

    def forward(self, session: RemoteSession, kind: str, rid: int | None, payload: bytes) -> None:
        """Publish a message of ``session`` to its owner; routes fail if it cannot get there."""
        header = {"t": kind, "s": session.id, "f": self.instance, "r": rid}
        d = self.send(session.instance, header, payload)
        d.addCallbacks(self._forwarded, self._forward_failed, callbackArgs=(session, rid), errbackArgs=(session, rid))

    def _forwarded(self, receivers: int, session: RemoteSession, rid: int | None) -> Any:
        if receivers:
            return None
        # Nobody listens on the owner's channel: killed (no heartbeat, or no connection to Redis
        # left), or its pub/sub connection is coming back.
        d = self.registry.alive(session.instance, connected=True)
        d.addCallbacks(self._owner_checked, self._forward_failed, callbackArgs=(session, rid), errbackArgs=(session, rid))
        return d

    def _owner_checked(self, alive: bool, session: RemoteSession, rid: int | None) -> None:
        if not alive:
            self.owner_gone(session)
        elif rid is not None:
            self._fail_route(rid, 503, "Service Unavailable: the gateway instance that owns this session "
                                       "is not reachable now; try again")

    def _forward_failed(self, f: Any, session: RemoteSession, rid: int | None) -> None:
        self.log.info("cluster: message for session {session} not delivered: {error}", session=session.id,
                      error=f.getErrorMessage())
        if rid is not None:
            self._fail_route(rid, 503, "Service Unavailable: the message could not be passed on to the "
                                       "session's gateway instance; try again")

    def _fail_route(self, rid: int, status: int, message: str) -> None:
        route = self.routes.pop(rid, None)
        session = self._route_session.pop(rid, None)
        if session is not None:
            session.route_done(route)
        if route is None:
            return
        code = jsonrpc.SESSION_NOT_FOUND if status == 404 else jsonrpc.CONNECTION_CLOSED
        if isinstance(route, PostExchange):
            if status == 503 and not route.request.startedWriting:
                route.request.setHeader(b"retry-after", b"1")
            route.fail(status, code, message)
        else:
            for id in list(getattr(route, "waiting", ())):
                route.answer(id, jsonrpc.error_bytes(id, code, message))

    def _fail_routes(self, session: RemoteSession, status: int, message: str) -> None:
        for rid in list(session.routes):
            self._fail_route(rid, status, message)

    def route_closed(self, session: RemoteSession, rid: int) -> None:
        """The client of a POST here went away: the owner sends server messages elsewhere."""
        route = self.routes.get(rid)
        if route is not None and getattr(route, "waiting", None) and self.redis.available:
            self.forward(session, "rc", rid, b"")

    def owner_gone(self, session: RemoteSession) -> None:
        self.log.info("cluster: instance {instance} (owner of session {session}) is gone", instance=session.instance,
                      session=session.id)
        self.store.remove(session.id).addErrback(lambda f: None)
        self.forget_remote(session, "the gateway instance that owned the session is gone", status=404)

    def forget_remote(self, session: RemoteSession, reason: str, status: int) -> None:
        """The session is over (or unreachable for good): fail what waits, close the streams here."""
        if self.remote.get(session.id) is session:
            del self.remote[session.id]
        session.ended = True
        session.end_reason = reason
        self._fail_routes(session, status, "Session not found" if status == 404 else reason)
        outlet = session.outlet
        if isinstance(outlet, StreamableOutlet):
            outlet.session_ended(reason)

    # messages for the receiving side

    def _on_answer(self, h: dict[str, Any], payload: bytes) -> None:
        route = self.routes.get(h["r"])
        if route is None:
            return
        route.answer(h["id"], payload)
        self._route_maybe_done(h["r"], route)

    def _on_deliver(self, h: dict[str, Any], payload: bytes) -> None:
        route = self.routes.get(h["r"])
        if route is not None:
            route.deliver(payload)

    def _on_forget(self, h: dict[str, Any], payload: bytes) -> None:
        route = self.routes.get(h["r"])
        if route is not None:
            route.forget(h["id"])
            self._route_maybe_done(h["r"], route)

    def _route_maybe_done(self, rid: int, route: Any) -> None:
        if not getattr(route, "waiting", None):
            self.routes.pop(rid, None)
            session = self._route_session.pop(rid, None)
            if session is not None:
                session.route_done(route)

    def _on_gone(self, h: dict[str, Any], payload: bytes) -> None:
        session = self.remote.get(h["s"])
        if session is not None:
            self.forget_remote(session, "Session not found", status=404)
        elif h.get("r") is not None:
            self._fail_route(h["r"], 404, "Session not found")

    def _on_end(self, h: dict[str, Any], payload: bytes) -> None:
        session = self.remote.get(h["s"])
        if session is not None:
            self.forget_remote(session, payload.decode("utf-8", "replace") or "session ended", status=404)

    def _on_unbound(self, h: dict[str, Any], payload: bytes) -> None:
        outlet = self.gets.get(h["r"])
        if outlet is not None and outlet.get_stream is not None:
            outlet.get_stream.emit(payload)

    # -- GET streams held here for a session owned elsewhere -----------------------------

    def open_remote_get(self, outlet: RemoteOutlet, request: Request) -> None:
        session = outlet.session
        rid = self.new_rid()
        d = self.call(session.instance, {"t": "get", "s": session.id, "f": self.instance, "r": rid})

        def answered(status: str) -> None:
            if gone(request):
                if status == "ok":
                    self.forward(session, "gx", rid, b"")
                return
            if status == "ok":
                outlet.open_get_now(request, rid)
                return
            if status == "conflict":
                e = HttpError(409, jsonrpc.CONNECTION_CLOSED, "Conflict: this session already has an open GET stream")
            elif status == "gone":
                self.forget_remote(session, "Session not found", status=404)
                e = HttpError(404, jsonrpc.SESSION_NOT_FOUND, "Session not found")
            else:  # unreachable: killed (404), or its pub/sub connection is coming back (503)
                self.registry.alive(session.instance, connected=True).addBoth(unreachable)
                return
            self._reply(request, e)

        def unreachable(alive: Any) -> None:
            if alive is False:
                self.owner_gone(session)
                e = HttpError(404, jsonrpc.SESSION_NOT_FOUND, "Session not found")
            else:
                e = HttpError(503, jsonrpc.CONNECTION_CLOSED, "Service Unavailable: the gateway instance that owns "
                              "this session is not reachable now; try again", headers={b"retry-after": b"1"})
            if not gone(request):
                self._reply(request, e)

        def failed(f: Any) -> None:
            if not gone(request):
                self._reply(request, HttpError(503, jsonrpc.CONNECTION_CLOSED,
                                               f"Service Unavailable: {f.getErrorMessage()}", headers={b"retry-after": b"2"}))

        d.addCallbacks(answered, failed).addErrback(lambda f: self.log.failure("cluster: GET stream", f))

    @staticmethod
    def _reply(request: Request, e: HttpError) -> None:
        for name, value in e.headers.items():
            request.setHeader(name, value)
        request.write(error_reply(request, e.status, e.code, e.message))
        request.finish()

    # -- resuming a stream held by another instance ---------------------------------------

    def resume_elsewhere(self, outlet: ClusterOutlet, request: Request, holder: str, number: int, seq: int) -> None:
        d = defer.Deferred.fromCoroutine(self._resume(outlet, request, holder, number, seq))
        d.addErrback(lambda f: self.log.failure("cluster: resuming stream {number} failed", f, number=number))

    async def _resume(self, outlet: ClusterOutlet, request: Request, holder: str, number: int, seq: int) -> None:
        session = outlet.session
        frames: list[bytes] = []
        last = seq
        try:
            entries = await self.redis.execute("XRANGE", self.keys.events(session.id, number), f"{seq + 1}-0", "+")
        except Exception as e:  # noqa: BLE001 - without the replay, the stream still goes on from its holder
            self.log.info("cluster: no replay from Redis for stream {number}: {error}", number=number, error=str(e))
            entries = []
        for entry_id, fields in entries or []:
            n = int(bytes(entry_id).split(b"-")[0])
            if n <= last:
                continue
            values = dict(zip(fields[::2], fields[1::2]))
            frames.append(values.get(b"e", b""))
            last = n
        rid = self.new_rid()
        pipe = self.pipes[rid] = _Pipe()
        try:
            status = await self.call(holder, {"t": "att", "s": session.id, "n": number, "after": last,
                                              "f": self.instance, "r": rid})
        except Exception as e:  # noqa: BLE001 - Redis down or a timeout: the holder counts as unreachable
            self.log.info("cluster: holder {holder} of stream {number} did not answer: {error}", holder=holder,
                          number=number, error=str(e))
            status = "unreachable"
        if gone(request):
            self.pipes.pop(rid, None)
            if status == "ok":
                self.tell(holder, {"t": "lx", "f": self.instance, "r": rid})
            return
        if status != "ok":
            self.pipes.pop(rid, None)
            if not frames:
                # Neither Redis nor the holder knows the stream: as for an unknown Last-Event-ID here.
                self._render_again(request, lambda r: self._fresh_get(outlet, r))
                return
        response = SseResponse(request, self.ctx.heartbeat, metrics=outlet.metrics)
        response.write_many(frames)
        if status != "ok":
            response.finish()  # the holder is gone: what Redis had is all there is
            return
        pipe.response = response
        response.write_many(pipe.buffer)
        pipe.buffer = []
        if pipe.finished:
            response.finish()

        def closed(_: Any) -> None:
            if self.pipes.pop(rid, None) is not None:
                self.tell(holder, {"t": "lx", "f": self.instance, "r": rid})

        response.on_close(closed)

    def _fresh_get(self, outlet: ClusterOutlet, request: Request) -> Any:
        if outlet.get_stream is not None and outlet.get_stream.live is not None:
            return error_reply(request, 409, jsonrpc.CONNECTION_CLOSED, "Conflict: this session already has an open GET stream")
        outlet.open_get(request)
        return NOT_DONE_YET

    def _on_write(self, h: dict[str, Any], payload: bytes) -> None:
        pipe = self.pipes.get(h["r"])
        if pipe is not None:
            pipe.write(payload)

    def _on_finish(self, h: dict[str, Any], payload: bytes) -> None:
        pipe = self.pipes.pop(h["r"], None)
        if pipe is not None:
            pipe.finish()

    def _on_attach(self, h: dict[str, Any], payload: bytes) -> None:
        """Another instance resumes one of our streams: it gets what came after ``after``, then the rest."""
        frm, rid = h["f"], h["r"]
        outlet = self._outlet_of(h["s"])
        stream = outlet.streams.get(h["n"]) if outlet is not None else None
        if outlet is None or stream is None:
            self.tell(frm, {"t": "ack", "r": rid, "status": "unknown"})
            return
        self.tell(frm, {"t": "ack", "r": rid, "status": "ok"})
        live = self.lives_out[(frm, rid)] = RemoteLive(self, frm, rid)
        stream.attach_live(live, after=h["after"])
        if stream is outlet.get_stream:
            outlet.get_attached()

    def _on_live_gone(self, h: dict[str, Any], payload: bytes) -> None:
        live = self.lives_out.get((h["f"], h["r"]))
        if live is not None:
            live.gone()

    def _outlet_of(self, session_id: str) -> ClusterOutlet | None:
        session = self.sessions.sessions.get(session_id) or self.remote.get(session_id)
        outlet = getattr(session, "outlet", None)
        return outlet if isinstance(outlet, ClusterOutlet) else None

    # -- the owner's side --------------------------------------------------------------

    def _owned(self, h: dict[str, Any]) -> Any:
        session = self.sessions.sessions.get(h["s"])
        if session is None or session.ended:
            if h.get("t") not in ("gx", "rc", "del"):
                self.tell(h["f"], {"t": "gone", "s": h["s"], "r": h.get("r")})
            return None
        self.peers.setdefault(session.id, set()).add(h["f"])
        return session

    def _on_post(self, h: dict[str, Any], payload: bytes) -> None:
        session = self._owned(h)
        if session is None:
            return
        frm, rid = h["f"], h.get("r")
        route: Any = None
        if session.transport == "sse":
            route = session.outlet
        elif rid is not None:
            route = self.routes_out.get((frm, rid))
            if route is None:
                route = self.routes_out[(frm, rid)] = RemoteRoute(self, session, frm, rid)
        for line in payload.split(b"\n"):
            if not line:
                continue
            try:
                msg = jsonrpc.loads(line)
                kind = jsonrpc.classify(msg)
            except (jsonrpc.DecodeError, jsonrpc.MessageError, TypeError):
                self.log.warn("cluster: malformed message for session {session} dropped", session=session.id)  # noqa: G010 (twisted.logger)
                continue
            if kind == jsonrpc.REQUEST:
                if route is None:
                    continue
                if isinstance(route, RemoteRoute):
                    route.waiting.add(msg["id"])
                session.request(msg, line, route)
            else:
                session.notify(msg, line)

    def _on_emit(self, h: dict[str, Any], payload: bytes) -> None:
        session = self._owned(h)
        if session is not None and session.outlet is not None:
            session.outlet.deliver(payload)

    def _on_delete(self, h: dict[str, Any], payload: bytes) -> None:
        session = self._owned(h)
        if session is not None:
            session.close(payload.decode("utf-8", "replace") or "client ended the session (DELETE)")

    def _on_route_closed(self, h: dict[str, Any], payload: bytes) -> None:
        route = self.routes_out.get((h["f"], h["r"]))
        if route is not None:
            route.closed = True

    def _on_get(self, h: dict[str, Any], payload: bytes) -> None:
        frm, rid = h["f"], h["r"]
        session = self._owned(h)
        if session is None:
            return
        outlet = session.outlet
        if not isinstance(outlet, ClusterOutlet):
            self.tell(frm, {"t": "ack", "r": rid, "status": "gone"})
            return
        if outlet.get_stream is not None and outlet.get_stream.live is not None:
            self.tell(frm, {"t": "ack", "r": rid, "status": "conflict"})
            return
        # RemoteGet stands in for the EventStream (live, done, emit, close); streamable.py declares
        # get_stream as an EventStream only.
        outlet.get_stream = RemoteGet(self, frm, rid)  # type: ignore[assignment]
        self.tell(frm, {"t": "ack", "r": rid, "status": "ok"})
        outlet.get_attached()

    def _remote_get(self, h: dict[str, Any]) -> tuple[ClusterOutlet, RemoteGet] | None:
        session = self.sessions.sessions.get(h["s"])
        outlet = getattr(session, "outlet", None)
        if isinstance(outlet, ClusterOutlet):
            stream = outlet.get_stream
            if isinstance(stream, RemoteGet) and stream.instance == h["f"] and stream.rid == h["r"]:
                return outlet, stream
        return None

    def _on_get_live(self, h: dict[str, Any], payload: bytes) -> None:
        found = self._remote_get(h)
        if found is not None:
            found[1].live = True
            found[0].get_attached()

    def _on_get_gone(self, h: dict[str, Any], payload: bytes) -> None:
        found = self._remote_get(h)
        if found is not None:
            found[1].live = None

    def _session_removed(self, session_id: str) -> None:
        """One of our sessions ended: tell the instances that hold something of it."""
        for peer in self.peers.pop(session_id, ()):
            self.tell(peer, {"t": "end", "s": session_id}, b"session ended")

    # -- event logs ---------------------------------------------------------------------

    def log_event(self, key: str, streams_key: str, seq: int, event: bytes) -> None:
        if not self.redis.commands.up:
            return
        ttl = int((self.max_age + self.store.grace) * 1000)
        d = self.redis.eval(APPEND, [key, streams_key], [seq, event, self.config.sse.replayEvents, ttl])
        d.addCallbacks(self._logged, self._log_failed)

    def _logged(self, _: Any) -> None:
        self._log_failures = 0

    def _log_failed(self, f: Any) -> None:
        self._log_failures += 1
        if self._log_failures == 1 or self._log_failures % 100 == 0:
            self.log.warn("cluster: event not logged in Redis ({n} so far): {error}", n=self._log_failures,  # noqa: G010 (twisted.logger)
                          error=f.getErrorMessage())

    # -- housekeeping --------------------------------------------------------------------

    def sweep(self) -> None:
        """Notice owners and peers that went away; forget idle remote sessions."""
        if not self.redis.available:
            return
        now = self._reactor.seconds()
        owners: dict[str, list[RemoteSession]] = {}
        for remote in list(self.remote.values()):
            if remote.active():
                owners.setdefault(remote.instance, []).append(remote)
            elif now - remote.last_used > self.max_age:
                del self.remote[remote.id]
                if isinstance(remote.outlet, StreamableOutlet):
                    remote.outlet.session_ended("forgotten here after session.maxAge without use")
        peers = {i for i, _ in self.routes_out} | {i for i, _ in self.lives_out}
        for session in self.sessions.sessions.values():
            stream = getattr(session.outlet, "get_stream", None)
            if isinstance(stream, RemoteGet) and stream.live is not None:
                peers.add(stream.instance)
        for instance in set(owners) | peers:
            self.registry.alive(instance).addCallback(self._swept, instance, owners.get(instance, [])) \
                .addErrback(lambda f: None)

    def _swept(self, alive: bool, instance: str, remotes: list[RemoteSession]) -> None:
        if alive:
            return
        for remote in remotes:
            self.owner_gone(remote)
        for key, route in list(self.routes_out.items()):
            if key[0] == instance:
                route.lose("instance gone")
        for key, live in list(self.lives_out.items()):
            if key[0] == instance:
                live.gone()
        for session in self.sessions.sessions.values():
            stream = getattr(session.outlet, "get_stream", None)
            if isinstance(stream, RemoteGet) and stream.instance == instance:
                stream.live = None


