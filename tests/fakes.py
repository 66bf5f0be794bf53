"""In-memory stand-ins shared by the unit tests: an upstream (a session's child) and a route (the
client side of one request). Real processes: tests/fake_process.py plays them on a fake reactor;
a real redis-server: tests/redis_server.py (its pytest fixtures are in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mcpgw import jsonrpc
from mcpgw.session import Session


class FakeUpstream:
    """Stands in for StdioUpstream: records sends; ``exit()`` plays the child's death.

    Given the session it serves, ``stop()`` waits for ``exit()`` (a child that takes its time),
    and ``exit()`` tells the session; without one, ``stop()`` ends at once (nothing to tell)."""

    def __init__(self, session: Any = None):
        self.session = session
        self.sent: list[bytes] = []
        self.ended = False
        self.stopping = False
        #: pauseProducing calls not yet resumed.
        self.paused = 0
        self._stops: list[defer.Deferred[None]] = []

    def send(self, raw: bytes, msg: Any = None) -> bool:
        if self.ended or self.stopping:
            return False
        self.sent.append(raw)
        return True

    def stop(self) -> defer.Deferred[None]:
        if self.session is None:
            self.ended = True
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        if self.ended:
            d.callback(None)
        else:
            self.stopping = True
            self._stops.append(d)
        return d

    def exit(self, how: str = "exited with status 1") -> None:
        self.ended = True
        if self.session is not None:
            self.session.upstreamEnded(how)
        stops, self._stops = self._stops, []
        for d in stops:
            d.callback(None)

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.paused -= 1


class SilentDelegate:
    """An IUpstreamDelegate that keeps nothing: for upstreams whose test needs only that one exists."""

    routes_on_view = False

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        pass

    def upstreamProtocolError(self, reason: str) -> None:
        pass

    def upstreamEnded(self, reason: str) -> None:
        pass


class RecordingRoute:
    """A route (the client side of requests) that keeps what the session hands it."""

    #: IRoute.open_stream: a transport's route that is not a POST's open stream.
    open_stream = False

    def __init__(self) -> None:
        self.answers: list[tuple[Any, bytes]] = []
        #: The ``msg`` of each answer: what the caller had decoded (None: nothing).
        self.decoded: list[Any] = []
        self.delivered: list[bytes] = []
        self.forgotten: list[Any] = []

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.answers.append((id, raw))
        self.decoded.append(msg)

    def deliver(self, raw: bytes) -> None:
        self.delivered.append(raw)

    def forget(self, id: Any) -> None:
        self.forgotten.append(id)

    def errors(self) -> list[tuple[Any, int, str]]:
        """(id, code, message) of every answer, each an error."""
        out = []
        for id, raw in self.answers:
            msg = jsonrpc.loads(raw)
            out.append((id, msg["error"]["code"], msg["error"]["message"]))
        return out


class FakeChildSession(Session):
    """A Session whose child is a FakeUpstream (made in its constructor, as a real child would be)."""

    def _upstream_for(self, base: Any) -> FakeUpstream:
        return FakeUpstream(self)
