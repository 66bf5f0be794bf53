"""Scope policy: which scopes open a session on a server, and which call (and show) a tool.

A list of scopes is a choice: a token needs one of them. No list: the server (or the tool) asks for none
beyond a token accepted for it. Tool names are the ones the client sees (an aggregated server's
``member__tool`` names are listed under the aggregate's name).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from mcpgw.config.oauth import OAuthConfig


def session_scopes(config: OAuthConfig, server: str) -> tuple[str, ...]:
    return config.scopes.get(server, ())


def tool_scopes(config: OAuthConfig, server: str, tool: str) -> tuple[str, ...]:
    return config.toolScopes.get(server, {}).get(tool, ())


def may_open_session(config: OAuthConfig, server: str, granted: Collection[str]) -> bool:
    required = session_scopes(config, server)
    return not required or any(s in granted for s in required)


def may_call_tool(config: OAuthConfig, server: str, tool: str, granted: Collection[str]) -> bool:
    """Also what ``tools/list`` filters on: a client sees only the tools its token may call."""
    required = tool_scopes(config, server, tool)
    return not required or any(s in granted for s in required)


def visible_tools(config: OAuthConfig, server: str, names: Iterable[str], granted: Collection[str]) -> list[str]:
    return [name for name in names if may_call_tool(config, server, name, granted)]


def step_up_scopes(config: OAuthConfig, server: str, granted: Collection[str], needed: Iterable[str]) -> tuple[str, ...]:
    """The ``scope`` of a 403 insufficient_scope: the scopes the token has that mean something on this
    server, then the ones needed (MCP authorization spec, "Recommended approach": a client that asks for
    exactly these loses none of what it could do)."""
    known = set(config.scopesSupported) | set(session_scopes(config, server))
    for scopes in config.toolScopes.get(server, {}).values():
        known.update(scopes)
    kept = sorted(s for s in granted if s in known)
    return tuple(dict.fromkeys([*kept, *needed]))
