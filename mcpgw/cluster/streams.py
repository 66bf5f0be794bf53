"""SSE streams across instances: GET streams held away from the owner, resumption anywhere.

- A Streamable HTTP GET stream may be held by any instance: the owner's outlet then has a
  ``RemoteGet`` that publishes server messages to it (``Unbound``).
- Every SSE stream's events are also written to the shared event log. Event ids carry the
  holding instance (``<instance * 10^8 + n>_<seq>``), so ``Last-Event-ID`` can be resumed on any
  instance: it replays from the log, then asks the holder for what came after (``Attach``; the
  holder's ``RemoteLive`` writes to it), exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

import mcpgw.cluster.wire as wire
from mcpgw import jsonrpc, logs
from mcpgw.cluster.directory import Directory
from mcpgw.cluster.eventlog import IEventLog
from mcpgw.cluster.node import Node, holder_of
from mcpgw.responding import gone
from mcpgw.transports.common import HttpError, error_reply
from mcpgw.transports.sse import ReplayLog, SseResponse
from mcpgw.transports.streamable import StreamableOutlet


def reply(request: Request, e: HttpError) -> None:
    """Answer a request that is still open with the error ``e``."""
    for name, value in e.headers.items():
        request.setHeader(name, value)
    request.write(error_reply(request, e.status, e.code, e.message))
    request.finish()


class MirroredLog:
    """An EventStream's replay log, also appended to the shared event log."""

    def __init__(self, local: ReplayLog, events: IEventLog, session_id: str, number: int):
        self._local = local
        self._events = events
        self._session_id = session_id
        self._number = number

    def append(self, seq: int, event: bytes) -> None:
        self._local.append(seq, event)
        self._events.append(self._session_id, self._number, seq, event)

    def after(self, seq: int) -> list[bytes]:
        return self._local.after(seq)


class ClusterOutlet(StreamableOutlet):
    """A Streamable HTTP session's streams on this instance: numbered by instance, logged in the
    event log, resumable from any instance."""

    def __init__(self, session: Any, ctx: Any, streams: Streams):
        super().__init__(session, ctx)
        self.cluster_streams = streams

    def new_stream(self) -> Any:
        # Numbered by the instance's own counter: unique among all of the session's streams anywhere.
        self._next = self.cluster_streams.node.next_stream() - 1
        stream = super().new_stream()
        stream.log = MirroredLog(stream.log, self.cluster_streams.events, self.session.id, stream.number)
        return stream

    def resume(self, request: Request, number: int, seq: int) -> bool:
        if number in self.streams:
            return super().resume(request, number, seq)
        holder = holder_of(number)
        if holder is None or holder == self.cluster_streams.node.instance:
            return False
        self.cluster_streams.resume_elsewhere(self, request, holder, number, seq)
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
        self.cluster_streams.open_remote_get(self, request)

    def open_get_now(self, request: Request, rid: int) -> None:
        """The owner agreed: serve the GET stream here."""
        self.get_rid = rid
        self.cluster_streams.gets[rid] = self
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
        routes = self.cluster_streams.directory.routes
        routes.forward(self.session, wire.GetLive, rid, b"")
        live = stream.live

        def detached(_: Any) -> None:
            if self.get_rid == rid and (self.get_stream is None or self.get_stream.live is None):
                routes.forward(self.session, wire.GetGone, rid, b"")

        live.on_close(detached)

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        """Only the owner routes server messages; one for the GET stream here comes as ``Unbound``."""

    def session_ended(self, reason: str) -> None:
        super().session_ended(reason)
        if self.get_rid is not None:
            self.cluster_streams.gets.pop(self.get_rid, None)


class RemoteLive:
    """The live response of one of this instance's streams, open on another instance (a resume there)."""

    def __init__(self, streams: Streams, instance: str, rid: int):
        self._streams = streams
        self.instance = instance
        self.rid = rid
        self.open = True
        self._on_close: list[Callable[[Any], None]] = []

    def on_close(self, callback: Callable[[Any], None]) -> None:
        self._on_close.append(callback)

    def write(self, data: bytes) -> None:
        if self.open and data:
            self._streams.node.send(self.instance, wire.Write(self.rid, data)).addCallbacks(
                self._heard, lambda f: self.gone())

    def write_many(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def keepalive(self) -> None:
        pass

    def finish(self) -> None:
        if self.open:
            self._streams.node.tell(self.instance, wire.Finish(self.rid))
            self.gone()

    def gone(self) -> None:
        if self.open:
            self.open = False
            self._streams.lives_out.pop((self.instance, self.rid), None)
            callbacks, self._on_close = self._on_close, []
            for cb in callbacks:
                cb(self)

    def _heard(self, receivers: int) -> None:
        if receivers == 0:
            self.gone()


class Pipe:
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


class RemoteGet:
    """The owner's view of a session's GET stream held by another instance."""

    def __init__(self, node: Node, instance: str, rid: int):
        self._node = node
        self.instance = instance
        self.rid = rid
        #: True while the client is connected there (StreamableOutlet checks ``live is not None``).
        self.live: bool | None = True
        self.done = False

    def emit(self, raw: bytes) -> None:
        d = self._node.send(self.instance, wire.Unbound(self.rid, raw))
        d.addCallbacks(lambda n: None if n else self._unreachable(), lambda f: self._unreachable())

    def close(self) -> None:
        self.done = True

    def _unreachable(self) -> None:
        self.live = None


class Streams:
    """Every SSE stream of this instance that involves another one, both ways."""

    log = Logger(observer=logs.observer)

    def __init__(self, node: Node, directory: Directory, events: IEventLog):
        self.node = node
        self.directory = directory
        self.events = events
        #: The gateway's context (set by ``Cluster.bind``).
        self.ctx: Any = None
        # held here, for sessions owned elsewhere
        self.gets: dict[int, RemoteOutlet] = {}
        self.pipes: dict[int, Pipe] = {}
        # ours, held (or resumed) elsewhere
        self.lives_out: dict[tuple[str, int], RemoteLive] = {}
        directory.remote_outlet = lambda session: RemoteOutlet(session, self.ctx, self)
        node.handle(wire.OpenGet, self._on_get)
        node.handle(wire.GetLive, self._on_get_live)
        node.handle(wire.GetGone, self._on_get_gone)
        node.handle(wire.Unbound, self._on_unbound)
        node.handle(wire.Attach, self._on_attach)
        node.handle(wire.LiveGone, self._on_live_gone)
        node.handle(wire.Write, self._on_write)
        node.handle(wire.Finish, self._on_finish)

    def outlet(self, session: Any, ctx: Any) -> ClusterOutlet:
        """The outlet of a Streamable HTTP session created here."""
        return ClusterOutlet(session, ctx, self)

    # -- GET streams held here for a session owned elsewhere -----------------------------

    def open_remote_get(self, outlet: RemoteOutlet, request: Request) -> None:
        session = outlet.session
        rid = self.node.new_rid()
        d = self.node.call(session.instance, wire.OpenGet(session.id, self.node.instance, rid))
        d.addCallbacks(self._get_answered, self._get_failed, callbackArgs=(outlet, request, rid),
                       errbackArgs=(request,))
        d.addErrback(lambda f: self.log.failure("cluster: GET stream", f))

    def _get_answered(self, status: str, outlet: RemoteOutlet, request: Request, rid: int) -> None:
        session = outlet.session
        if gone(request):
            if status == "ok":
                self.directory.routes.forward(session, wire.GetGone, rid, b"")
            return
        if status == "ok":
            outlet.open_get_now(request, rid)
        elif status == "conflict":
            reply(request, HttpError(409, jsonrpc.CONNECTION_CLOSED, "Conflict: this session already has an open GET stream"))
        elif status == "gone":
            self.directory.forget(session, "Session not found", status=404)
            reply(request, HttpError(404, jsonrpc.SESSION_NOT_FOUND, "Session not found"))
        else:  # unreachable: killed (404), or its pub/sub connection is coming back (503)
            self.directory.registry.alive(session.instance, connected=True).addBoth(
                self._owner_checked, session, request)

    def _owner_checked(self, alive: Any, session: Any, request: Request) -> None:
        if alive is False:
            self.directory.owner_gone(session)
            e = HttpError(404, jsonrpc.SESSION_NOT_FOUND, "Session not found")
        else:
            e = HttpError(503, jsonrpc.CONNECTION_CLOSED, "Service Unavailable: the gateway instance that owns "
                          "this session is not reachable now; try again", headers={b"retry-after": b"1"})
        if not gone(request):
            reply(request, e)

    def _get_failed(self, f: Any, request: Request) -> None:
        if not gone(request):
            reply(request, HttpError(503, jsonrpc.CONNECTION_CLOSED, f"Service Unavailable: {f.getErrorMessage()}",
                                     headers={b"retry-after": b"2"}))

    # -- resuming a stream held by another instance ---------------------------------------

    def resume_elsewhere(self, outlet: ClusterOutlet, request: Request, holder: str, number: int, seq: int) -> None:
        d = defer.Deferred.fromCoroutine(self._resume(outlet, request, holder, number, seq))
        d.addErrback(lambda f: self.log.failure("cluster: resuming stream {number} failed", f, number=number))

    async def _replayed(self, session_id: str, number: int, seq: int) -> tuple[list[bytes], int]:
        """The events of stream ``number`` after ``seq`` in the event log, and the last one's seq."""
        frames: list[bytes] = []
        last = seq
        try:
            entries = await self.events.after(session_id, number, seq)
        except Exception as e:  # noqa: BLE001 - without the replay, the stream still goes on from its holder
            self.log.info("cluster: no replay from Redis for stream {number}: {error}", number=number, error=str(e))
            entries = []
        for n, event in entries:
            if n > last:
                frames.append(event)
                last = n
        return frames, last

    async def _resume(self, outlet: ClusterOutlet, request: Request, holder: str, number: int, seq: int) -> None:
        session = outlet.session
        frames, last = await self._replayed(session.id, number, seq)
        rid = self.node.new_rid()
        pipe = self.pipes[rid] = Pipe()
        try:
            status = await self.node.call(holder, wire.Attach(session.id, number, last, self.node.instance, rid))
        except Exception as e:  # noqa: BLE001 - Redis down or a timeout: the holder counts as unreachable
            self.log.info("cluster: holder {holder} of stream {number} did not answer: {error}", holder=holder,
                          number=number, error=str(e))
            status = "unreachable"
        if gone(request):
            self.pipes.pop(rid, None)
            if status == "ok":
                self.node.tell(holder, wire.LiveGone(self.node.instance, rid))
            return
        if status != "ok":
            self.pipes.pop(rid, None)
            if not frames:
                # Neither the log nor the holder knows the stream: as for an unknown Last-Event-ID here.
                self._fresh_get(outlet, request)
                return
        response = SseResponse(request, self.ctx.heartbeat, metrics=outlet.metrics)
        response.write_many(frames)
        if status != "ok":
            response.finish()  # the holder is gone: what the log had is all there is
            return
        self._pipe_to(response, pipe, holder, rid)

    def _pipe_to(self, response: SseResponse, pipe: Pipe, holder: str, rid: int) -> None:
        pipe.response = response
        response.write_many(pipe.buffer)
        pipe.buffer = []
        if pipe.finished:
            response.finish()

        def closed(_: Any) -> None:
            if self.pipes.pop(rid, None) is not None:
                self.node.tell(holder, wire.LiveGone(self.node.instance, rid))

        response.on_close(closed)

    def _fresh_get(self, outlet: ClusterOutlet, request: Request) -> None:
        if outlet.get_stream is not None and outlet.get_stream.live is not None:
            reply(request, HttpError(409, jsonrpc.CONNECTION_CLOSED, "Conflict: this session already has an open GET stream"))
            return
        outlet.open_get(request)

    def _on_write(self, message: wire.Write) -> None:
        pipe = self.pipes.get(message.route)
        if pipe is not None:
            pipe.write(message.payload)

    def _on_finish(self, message: wire.Finish) -> None:
        pipe = self.pipes.pop(message.route, None)
        if pipe is not None:
            pipe.finish()

    def _on_attach(self, message: wire.Attach) -> None:
        """Another instance resumes one of our streams: it gets what came after ``after``, then the rest."""
        frm, rid = message.sender, message.route
        outlet = self._outlet_of(message.session)
        stream = outlet.streams.get(message.stream) if outlet is not None else None
        if outlet is None or stream is None:
            self.node.tell(frm, wire.Ack(rid, "unknown"))
            return
        self.node.tell(frm, wire.Ack(rid, "ok"))
        live = self.lives_out[(frm, rid)] = RemoteLive(self, frm, rid)
        stream.attach_live(live, after=message.after)
        if stream is outlet.get_stream:
            outlet.get_attached()

    def _on_live_gone(self, message: wire.LiveGone) -> None:
        live = self.lives_out.get((message.sender, message.route))
        if live is not None:
            live.gone()

    def _outlet_of(self, session_id: str) -> ClusterOutlet | None:
        session = self.node.sessions.sessions.get(session_id) or self.directory.remote.get(session_id)
        outlet = session.outlet if session is not None else None
        return outlet if isinstance(outlet, ClusterOutlet) else None

    def _on_unbound(self, message: wire.Unbound) -> None:
        outlet = self.gets.get(message.route)
        if outlet is not None and outlet.get_stream is not None:
            outlet.get_stream.emit(message.payload)

    # -- the owner's side of GET streams held elsewhere ------------------------------------

    def _on_get(self, message: wire.OpenGet) -> None:
        frm, rid = message.sender, message.route
        session = self.node.owned(message)
        if session is None:
            return
        outlet = session.outlet
        if not isinstance(outlet, ClusterOutlet):
            self.node.tell(frm, wire.Ack(rid, "gone"))
            return
        if outlet.get_stream is not None and outlet.get_stream.live is not None:
            self.node.tell(frm, wire.Ack(rid, "conflict"))
            return
        # RemoteGet stands in for the EventStream (live, done, emit, close); streamable.py declares
        # get_stream as an EventStream only.
        outlet.get_stream = RemoteGet(self.node, frm, rid)  # type: ignore[assignment]
        self.node.tell(frm, wire.Ack(rid, "ok"))
        outlet.get_attached()

    def _remote_get(self, message: wire.GetLive | wire.GetGone) -> tuple[ClusterOutlet, RemoteGet] | None:
        session = self.node.sessions.sessions.get(message.session)
        outlet = session.outlet if session is not None else None
        if isinstance(outlet, ClusterOutlet):
            stream = outlet.get_stream
            if isinstance(stream, RemoteGet) and stream.instance == message.sender and stream.rid == message.route:
                return outlet, stream
        return None

    def _on_get_live(self, message: wire.GetLive) -> None:
        found = self._remote_get(message)
        if found is not None:
            found[1].live = True
            found[0].get_attached()

    def _on_get_gone(self, message: wire.GetGone) -> None:
        found = self._remote_get(message)
        if found is not None:
            found[1].live = None

    def remote_gets(self) -> list[RemoteGet]:
        """The GET streams of sessions owned here that other instances hold."""
        found: list[RemoteGet] = []
        for session in self.node.sessions.sessions.values() if self.node.sessions else []:
            outlet = session.outlet
            if isinstance(outlet, ClusterOutlet) and isinstance(outlet.get_stream, RemoteGet):
                found.append(outlet.get_stream)
        return found
