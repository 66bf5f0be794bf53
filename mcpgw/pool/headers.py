"""The tools' ``x-mcp-header`` annotations (SEP-2243): fetched with one ``tools/list`` when first
needed, kept until a child says the list changed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mcpgw import jsonrpc
from mcpgw.config import StdioServer
from mcpgw.interfaces import IRoute
from mcpgw.pool.pending import Pending, PoolFull

#: An ``x-mcp-header`` value (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Types an ``x-mcp-header`` annotation may be on.
HEADER_TYPES = frozenset({"string", "integer", "boolean"})


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


@implementer(IRoute)
class ToolsFetch:
    """The route of the gateway's own ``tools/list`` (every page) for the x-mcp-header cache."""

    #: No client reads it.
    open_stream = False

    def __init__(self, pool: ToolHeaders, generation: int):
        self.pool = pool
        self.generation = generation
        self.tools: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        self.pages = 0

    def next(self, cursor: Any = None) -> None:
        self.pages += 1
        params = {"cursor": cursor} if cursor is not None else {}
        self.pool.request({"jsonrpc": "2.0", "id": f"{self.pool._prefix}tools-{self.pages}", "method": "tools/list",
                           "params": params}, self)

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
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


class ToolHeaders:
    """A ChildPool's cache of its tools' x-mcp-header annotations."""

    server: StdioServer
    _prefix: str
    #: ChildPool.request: the gateway's own tools/list goes to a child as a client's would.
    request: Callable[..., Pending]

    def _init_headers(self) -> None:
        #: Tool name -> its x-mcp-header annotations (tools without any left out); None: not fetched yet.
        self.tool_headers: dict[str, list[tuple[tuple[str, ...], str, str]]] | None = None
        self._tools_waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._tools_generation = 0

    def tools_changed(self) -> None:
        """A child said ``notifications/tools/list_changed``: the cache (and a fetch under way) is stale."""
        self.tool_headers = None
        self._tools_generation += 1

    def headers_of_tools(self) -> defer.Deferred[dict[str, Any]]:
        """The tools' x-mcp-header annotations: cached, else fetched once (one tools/list, every page)."""
        if self.tool_headers is not None:
            return defer.succeed(self.tool_headers)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._tools_waiters.append(d)
        if len(self._tools_waiters) == 1:
            try:
                ToolsFetch(self, self._tools_generation).next()
            except PoolFull as e:
                self._tools_fetched(None, None, e)
        return d

    def _tools_fetched(self, fetch: ToolsFetch | None, tools: dict[str, Any] | None, error: Exception | None = None) -> None:
        waiters, self._tools_waiters = self._tools_waiters, []
        if tools is not None and fetch is not None and fetch.generation == self._tools_generation:
            self.tool_headers = tools
        for d in waiters:
            if tools is not None:
                d.callback(tools)
            else:
                d.errback(error or PoolFull(f"server {self.server.name}: tools/list failed"))
