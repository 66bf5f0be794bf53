"""The HTTP client side of a remote upstream: one quiet treq client per reactor, the SSE parser and
the response bodies a RemoteUpstream reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

_clients: dict[int, Any] = {}


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint whose connections' factories say nothing: no "Starting factory" log line per
    upstream connection."""

    def __init__(self, endpoint: IStreamClientEndpoint):
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """Agent's own endpoints (TCP for http, TLS over TCP with the browser-like policy for https), quiet."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"The host of the provided URI ({uri.host!r}) contains non-ASCII octets, "
                             "it should be ASCII decodable.") from None
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, host, uri.port, bindAddress=None)
        if uri.scheme in (b"https", b"wss"):
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme not in (b"http", b"ws"):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return _QuietEndpoint(endpoint)


def http_client(reactor: Any) -> Any:
    """One treq HTTPClient (and connection pool) per reactor."""
    client = _clients.get(id(reactor))
    if client is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
        agent = Agent.usingEndpointFactory(reactor, _QuietEndpoints(reactor), pool=pool)
        client = _clients[id(reactor)] = HTTPClient(agent)
    return client


class SseParser:
    """Incremental ``text/event-stream`` parser: ``event(name, data, id)`` per dispatched event."""

    def __init__(self, event: Callable[[str, str, str | None], None], max_bytes: int, overflow: Callable[[], None]):
        self._event = event
        self._max = max_bytes
        self._overflow = overflow
        self._buffer = b""
        self._data: list[str] = []
        self._name = ""
        self._size = 0
        self.last_id: str | None = None
        self.retry: int | None = None
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        self._buffer += chunk
        while True:
            cut = min((i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line = self._buffer[:cut]
            end = cut + 1
            if self._buffer[cut:cut + 2] == b"\r\n":
                end += 1
            elif self._buffer[cut:cut + 1] == b"\r" and end == len(self._buffer):
                break  # a CR at the end of the chunk may be half a CRLF
            self._buffer = self._buffer[end:]
            self._line(line.decode("utf-8", "replace"))
            if self.broken:
                return
        if len(self._buffer) + self._size > self._max:
            self._break()

    def _line(self, line: str) -> None:
        if not line:
            if self._data:
                self._event(self._name or "message", "\n".join(self._data), self.last_id)
            self._data, self._name, self._size = [], "", 0
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max:
                self._break()
        elif field == "event":
            self._name = value
        elif field == "id" and "\0" not in value:
            self.last_id = value
        elif field == "retry" and value.isdigit():
            self.retry = int(value)

    def _break(self) -> None:
        self.broken = True
        self._buffer = b""
        self._data = []
        self._overflow()


class Body(Protocol):
    """One response body being read (a POST's SSE answer, the GET stream), fed to ``feed``.

    Its transport (twisted.web's TransportProxyProducer) pauses and resumes the connection;
    ``close()`` drops it, so an upstream stream never outlives its session."""

    def __init__(self, feed: Callable[[bytes], None]):
        self._feed = feed
        self.d: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.d.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.d.callback(None)
        else:
            self.d.errback(reason)

    def pause(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def resume(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).resumeProducing()

    def close(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()
        if not self.d.called:
            self.d.callback(None)
