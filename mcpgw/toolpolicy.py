"""Per-tool scope policy on the way in (``auth.oauth.toolScopes``): which ``tools/call`` an OAuth token
may make, and which tools its ``tools/list`` shows.

Scopes are a request's, not a session's: a client that was refused asks its authorization server for a
token with more scopes and retries on the same session (MCP authorization spec, "Step-Up Authorization
Flow"), so every request is judged by the token it came with. A refused call never reaches the server;
the HTTP transports answer it 403 with ``WWW-Authenticate: Bearer error="insufficient_scope"``
(mcpgw.web.forbidden_scope_reply), a WebSocket (a live stream, with no status to send) a JSON-RPC error.
A ``tools/list`` answer goes back through ``HiddenTools``, which leaves out what the token may not call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.web.server import Request
from zope.interface import implementer

from mcpgw import jsonrpc
from mcpgw.auth import Authenticator, InsufficientScope, Principal
from mcpgw.interfaces import IRoute
from mcpgw.transports.common import error_reply

#: The JSON-RPC error of a refused call on a WebSocket: in the server-defined range; ``data`` carries
#: RFC 6750's ``error`` and the ``scope`` to ask for, as the HTTP transports' WWW-Authenticate would.
FORBIDDEN = -32003


def refusal(auth: Authenticator | None, principal: Principal | None, server: str,
            messages: Iterable[Any]) -> tuple[Any, InsufficientScope] | None:
    """The first ``tools/call`` among ``messages`` (mcpgw.transports.common.Incoming) that the principal's
    token has no scope for, with its refusal; None when every one may go (and always without ``auth.oauth``)."""
    if auth is None or auth.oauth is None or principal is None or principal.scopes is None:
        return None
    for m in messages:
        if m.kind == jsonrpc.REQUEST and m.msg["method"] == "tools/call":
            params = m.msg.get("params")
            tool = params.get("name") if isinstance(params, dict) else None
            refused = auth.tool_refusal(principal, server, tool)
            if refused is not None:
                return m, refused
    return None


def forbidden_reply(auth: Authenticator, request: Request, e: InsufficientScope, id: Any = None) -> bytes:
    """403 with ``WWW-Authenticate: Bearer error="insufficient_scope", scope="..."``: the client may ask
    its authorization server for a token with those scopes and retry (MCP authorization spec, step-up)."""
    request.setHeader(b"www-authenticate", auth.step_up(e, request))
    return error_reply(request, 403, jsonrpc.CONNECTION_CLOSED, f"Forbidden: {e.description}", id)


def refusal_error(id: Any, e: InsufficientScope) -> bytes:
    """The JSON-RPC error answering a refused call where no HTTP status can be sent."""
    return jsonrpc.error_bytes(id, FORBIDDEN, f"Forbidden: {e.description}",
                               {"error": "insufficient_scope", "scope": " ".join(e.scopes)})


def route_for(auth: Authenticator | None, principal: Principal | None, server: str, msg: dict[str, Any],
              route: Any) -> Any:
    """``route``, or for a ``tools/list`` request of a principal that may not call every tool, a HiddenTools on it."""
    if auth is None or auth.oauth is None or msg.get("method") != "tools/list" or "id" not in msg:
        return route
    hidden = auth.hidden_tools(principal, server)
    return HiddenTools(route, hidden) if hidden else route


@implementer(IRoute)
class HiddenTools:
    """A route whose ``tools/list`` answer loses the tools in ``hidden``; everything else passes as is."""

    def __init__(self, route: Any, hidden: frozenset[str]):
        self.route = route
        self.hidden = hidden

    @property
    def open_stream(self) -> bool:
        return bool(self.route.open_stream)

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        msg = jsonrpc.as_message(raw)  # (not the caller's: a large answer's is a route view, its result undecoded)
        result = msg.get("result") if isinstance(msg, dict) else None
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            kept = [t for t in result["tools"] if not (isinstance(t, dict) and t.get("name") in self.hidden)]
            if len(kept) != len(result["tools"]):
                raw = jsonrpc.dumps({**msg, "result": {**result, "tools": kept}})
        self.route.answer(id, raw)

    def deliver(self, raw: bytes) -> None:
        self.route.deliver(raw)

    def forget(self, id: Any) -> None:
        self.route.forget(id)
