"""Upstreams: what a Session relays to. ``make_upstream`` picks one by the server's config.

Every upstream has the StdioUpstream surface: ``spawn()``, ``send(raw) -> bool``,
``stop() -> Deferred`` (fires when it is really gone), ``pauseProducing()`` /
``resumeProducing()``, ``ended``, ``pid`` (None when there is no child), ``metrics``;
it reports to an UpstreamDelegate (``upstreamMessage`` / ``upstreamProtocolError`` /
``upstreamEnded``).
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface, classImplements, implementer

from mcpgw import jsonrpc
from mcpgw.config import ServerConfig, ToolFilter
from mcpgw.metrics import NULL_BOUND, BoundMetrics


class IUpstream(Interface):
    """What a Session relays to (stdio child, remote server, aggregate, tool filter)."""

    ended = Attribute("True once the upstream is gone for good")
    pid = Attribute("the child's process id, or None (no child of its own)")
    metrics = Attribute("the session's BoundMetrics (child gauges)")

    def spawn() -> None:
        """Start (a child, an SSE stream, the members); may raise if it cannot."""

    def send(raw: bytes, msg: Any = None) -> bool:
        """Relay one client message (``msg``: ``raw`` decoded, when the caller has it: an upstream
        that reads the message need not decode it again); False if it can no longer take it."""

    def stop() -> Any:
        """End it; a Deferred that fires once it is really gone."""

    def pauseProducing() -> None:
        """A slow client: stop reading from upstream."""

    def resumeProducing() -> None:
        """Read from upstream again."""


def make_upstream(server: ServerConfig, delegate: Any, reactor: Any, base: Any = None) -> Any:
    """A stdio child, a remote server or an aggregate, behind its tool filter if it has one.

    ``base``: an upstream that already exists (a warm child, mcpgw.upstream.warm): it is
    re-pointed at ``delegate`` (or at the tool filter) instead of a new one being made.
    """
    if server.tools is not None:
        filtered = FilteredUpstream(server.tools, delegate)
        filtered.inner = _base(server, filtered, reactor) if base is None else _adopt(base, filtered)
        return filtered
    return _base(server, delegate, reactor) if base is None else _adopt(base, delegate)


def _adopt(base: Any, delegate: Any) -> Any:
    base.delegate = delegate
    return base


def _base(server: ServerConfig, delegate: Any, reactor: Any) -> Any:
    if server.aggregate is not None:
        from mcpgw.aggregate import AggregateUpstream

        return AggregateUpstream(server, delegate, reactor)
    if server.url is not None:
        from mcpgw.upstream.remote import RemoteUpstream

        return RemoteUpstream(server, delegate, reactor)
    from mcpgw.upstream.stdio import StdioUpstream

    return StdioUpstream(server, delegate, reactor)


@implementer(IUpstream)
class FilteredUpstream:
    """``tools.allow`` / ``tools.deny``: hidden tools are left out of ``tools/list`` results and a
    ``tools/call`` of one is answered here (-32602, as for an unknown tool) without reaching the server."""

    inner: Any

    def __init__(self, tools: ToolFilter, delegate: Any):
        self.tools = tools
        self.delegate = delegate
        self._lists: set[Any] = set()

    # -- the upstream surface, passed through --------------------------------

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    @property
    def ended(self) -> bool:
        return bool(self.inner.ended)

    @property
    def metrics(self) -> BoundMetrics:
        return getattr(self.inner, "metrics", NULL_BOUND)

    @metrics.setter
    def metrics(self, value: BoundMetrics) -> None:
        self.inner.metrics = value

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def spawn(self) -> None:
        self.inner.spawn()

    def stop(self) -> Any:
        return self.inner.stop()

    def pauseProducing(self) -> None:
        self.inner.pauseProducing()

    def resumeProducing(self) -> None:
        self.inner.resumeProducing()

    def send(self, raw: bytes, msg: Any = None) -> bool:
        if msg is not None or b'"tools/' in raw:
            msg = jsonrpc.as_message(raw, msg)
            if isinstance(msg, dict) and "id" in msg:
                method = msg.get("method")
                params: dict[str, Any] = msg["params"] if isinstance(msg.get("params"), dict) else {}
                if method == "tools/list":
                    self._lists.add(_key(msg["id"]))
                elif method == "tools/call" and not self.tools.permits(params.get("name")):
                    if self.inner.ended:
                        return False
                    error = jsonrpc.error_bytes(msg["id"], jsonrpc.INVALID_PARAMS, f"Unknown tool: {params.get('name')}")
                    self.delegate.upstreamMessage(error, jsonrpc.loads(error))
                    return True
        return bool(self.inner.send(raw, msg))

    # -- the delegate surface ------------------------------------------------

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        if self._lists and "method" not in msg and _key(msg.get("id")) in self._lists:
            self._lists.discard(_key(msg.get("id")))
            result = msg.get("result")
            if isinstance(result, dict) and isinstance(result.get("tools"), list):
                kept = [t for t in result["tools"] if isinstance(t, dict) and self.tools.permits(t.get("name"))]
                if len(kept) != len(result["tools"]):
                    msg = {**msg, "result": {**result, "tools": kept}}
                    raw = jsonrpc.dumps(msg)
        self.delegate.upstreamMessage(raw, msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self.delegate.upstreamProtocolError(reason)

    def upstreamEnded(self, reason: str) -> None:
        self.delegate.upstreamEnded(reason)


def _key(id: Any) -> Any:
    return (type(id).__name__, id) if isinstance(id, (str, int, float)) else None


def _declare() -> None:
    """Every upstream class provides IUpstream (StdioUpstream declared from here)."""
    from mcpgw.aggregate import AggregateUpstream
    from mcpgw.upstream.remote import RemoteUpstream
    from mcpgw.upstream.stdio import StdioUpstream

    # One call per class, not a loop: mypy-zope reads the class from each call's first argument.
    classImplements(StdioUpstream, IUpstream)
    classImplements(RemoteUpstream, IUpstream)
    classImplements(AggregateUpstream, IUpstream)


_declare()
