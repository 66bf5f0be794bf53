"""Upstreams: what a Session relays to. ``make_upstream`` picks one by the server's kind.

Every upstream provides ``mcpgw.interfaces.IUpstream`` and reports to an ``IUpstreamDelegate``.
Each kind registers itself with ``mcpgw.interfaces.upstream_kind`` when its module is imported:
stdio and remote are imported here; mcpgw.aggregate, which makes its members with
``make_upstream``, registers itself when mcpgw.session imports it.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from mcpgw import jsonrpc
from mcpgw.config import ServerConfig, ToolFilter
from mcpgw.interfaces import UPSTREAM_KINDS, IUpstream, IUpstreamDelegate, upstream_kind
from mcpgw.metrics import BoundMetrics
from mcpgw.upstream import remote, stdio

__all__ = ["IUpstream", "FilteredUpstream", "innermost", "make_upstream", "upstream_kind"]
#: The kinds every gateway serves (imported so that they are registered).
BUILTIN_KINDS = (remote.RemoteUpstream, stdio.StdioUpstream)


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


def innermost(upstream: Any) -> Any:
    """The upstream behind a tool filter (or ``upstream`` itself, when it has none)."""
    return upstream.inner if isinstance(upstream, FilteredUpstream) else upstream


def _adopt(base: Any, delegate: Any) -> Any:
    base.delegate = delegate
    return base


def _base(server: ServerConfig, delegate: Any, reactor: Any) -> Any:
    make = UPSTREAM_KINDS.get(server.kind)
    if make is None:
        raise LookupError(f"no upstream serves {server.kind!r} servers: its module is not imported")
    return make(server, delegate, reactor)


@implementer(IUpstream, IUpstreamDelegate)
class FilteredUpstream:
    """``tools.allow`` / ``tools.deny``: hidden tools are left out of ``tools/list`` results and a
    ``tools/call`` of one is answered here (-32602, as for an unknown tool) without reaching the server.

    It has the IUpstream surface and no more: what only one kind of upstream has (an aggregate's
    ``member_down``, a child's ``started_at``) is read from ``innermost(upstream)``."""

    inner: Any
    routes_on_view = False

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
        metrics: BoundMetrics = self.inner.metrics
        return metrics

    @metrics.setter
    def metrics(self, value: BoundMetrics) -> None:
        self.inner.metrics = value

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

