"""Runtime control of a built gateway: servers added and removed, sessions ended, draining.

One ``ServerControl`` per gateway (``mcpgw.tap.build_service`` makes it); the
public embedding API (``mcpgw.Gateway``) and the admin API (``mcpgw.admin``)
both go through it. Everything runs on the reactor thread.

The configuration stays a frozen value: adding or removing a server makes a new
``GatewayConfig`` (``attrs.evolve``) and hands it to whoever reads the server
list (the context, the SessionManager, the cluster), and the server's
``/servers/NAME/...`` resource is put into (or taken out of) the ``/servers``
tree, so requests find it from their next lookup on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource

from mcpgw import logs
from mcpgw.config import GatewayConfig, ServerConfig, parse_server
from mcpgw.session import Session
from mcpgw.transports.common import GatewayContext
from mcpgw.upstream import innermost
from mcpgw.upstream.remote import RemoteUpstream
from mcpgw.upstream.stdio import StdioUpstream


class UnknownServer(KeyError):
    """No server of that name."""


class ServerConflict(ValueError):
    """The server cannot be added or removed (it exists, it is the default one, ...)."""


class ServerControl:
    """Add, remove and restart servers, end sessions, drain; and describe them all as JSON values."""

    log = Logger(observer=logs.observer)

    def __init__(self, ctx: GatewayContext, root: Resource):
        self._ctx = ctx
        self._root = root
        self._reactor = ctx.reactor
        self.started = ctx.reactor.seconds()

    # -- servers ------------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The current configuration (a new value after each add_server / remove_server)."""
        return self._ctx.config

    @property
    def servers(self) -> Mapping[str, ServerConfig]:
        return self._ctx.config.servers

    def add_server(self, name: str, command: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                   **options: Any) -> ServerConfig:
        """Add a stdio server at ``/servers/NAME/{mcp,sse,messages,ws}``, reachable at once.

        ``options`` are the other ``mcpServers`` keys (``cwd``, ``maxSessions``, ``stopGrace``, ...),
        checked as the config file's are (ConfigError). ServerConflict if the name is taken.
        """
        if name in self.servers:
            raise ServerConflict(f"server {name!r} already exists")
        if options.get("default"):
            raise ServerConflict("a server added at runtime cannot be the default server")
        if options.get("sessions", "per-client") != "per-client" or "url" in options:
            raise ServerConflict("only per-client stdio servers can be added at runtime")
        raw: dict[str, Any] = {**options, "command": command, "args": list(args), "env": dict(env or {})}
        server = parse_server(name, raw)
        from mcpgw.web import (
            ServerResource,  # the Resource tree imports this module's users
        )

        self._replace_servers({**self.servers, name: server})
        if self._ctx.auth.resources is not None:  # auth.oauth: its metadata and audiences
            self._ctx.auth.resources.add_server(name)
        self._index().putChild(name.encode(), ServerResource(self._ctx, server))
        self.log.info("server {server} added ({command})", server=name, command=command)
        return server

    def remove_server(self, name: str) -> defer.Deferred[int]:
        """Take server ``name`` away: new requests to it get 404, its sessions end and its children
        are stopped. Fires with the number of sessions ended once every child has exited."""
        server = self._server(name)
        if server.name == self._ctx.config.default_server.name:
            raise ServerConflict(f"server {name!r} is the default server (also at /mcp, /sse, /ws) and cannot be removed")
        self._index().children.pop(name.encode(), None)
        self._replace_servers({k: v for k, v in self.servers.items() if k != name})
        if self._ctx.auth.resources is not None:
            self._ctx.auth.resources.remove_server(name)
        self.log.info("server {server} removed", server=name)
        return self._end_all(name, "server removed")

    def restart_server(self, name: str) -> defer.Deferred[int]:
        """End every session of ``name`` and stop its children (clients re-initialize and get new
        ones); fires with the number of sessions ended once they have exited."""
        self._server(name)
        self.log.info("server {server} restarted", server=name)
        return self._end_all(name, "server restarted by an operator")

    def _end_all(self, name: str, reason: str) -> defer.Deferred[int]:
        ending = [s for s in list(self._ctx.sessions.sessions.values()) if s.server.name == name]
        waits = [s.close(reason) for s in ending]
        return defer.DeferredList(waits).addCallback(lambda _: len(ending))

    def _server(self, name: str) -> ServerConfig:
        server = self.servers.get(name)
        if server is None:
            raise UnknownServer(name)
        return server

    def _index(self) -> Resource:
        return self._root.children[b"servers"]

    def _replace_servers(self, servers: dict[str, ServerConfig]) -> None:
        config = attrs.evolve(self._ctx.config, servers=servers)
        self._ctx.config = config
        self._ctx.sessions.config = config
        cluster = self._ctx.cluster
        if cluster is not None:
            cluster.config = config

    # -- sessions -----------------------------------------------------------

    def end_session(self, session_id: str) -> defer.Deferred[None] | None:
        """End one session and stop its child (fires when it has exited); None if there is no such session."""
        session = self._ctx.sessions.sessions.get(session_id)
        if session is None:
            return None
        return session.close("ended by an operator")

    # -- draining -----------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._ctx.sessions.draining

    def drain(self) -> None:
        """Take no new sessions (503 with Retry-After, /ready 503); the current ones go on."""
        sessions = self._ctx.sessions
        sessions.draining = True
        sessions.accepting = False
        self.log.info("draining: no new sessions; {count} still open", count=len(sessions.sessions))

    def resume(self) -> None:
        """Take new sessions again (after ``drain``; not while shutting down)."""
        sessions = self._ctx.sessions
        if sessions.draining:
            sessions.draining = False
            sessions.accepting = bool(sessions.running)
            self.log.info("draining ended: new sessions accepted")

    # -- descriptions (JSON values) ------------------------------------------

    def sessions_by_transport(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in list(self._ctx.sessions.sessions.values()):
            counts[session.transport] = counts.get(session.transport, 0) + 1
        return counts

    def describe_session(self, session: Session) -> dict[str, Any]:
        now = self._reactor.seconds()
        upstream = session.upstream
        return {
            "id": session.id,
            "server": session.server.name,
            "transport": session.transport,
            "owner": session.owner,
            "protocolVersion": session.protocol_version,
            "age": round(now - session.created, 3),
            "idle": round(now - session.last_seen, 3),
            "inFlight": len(session.pending_routes()),
            "pid": upstream.pid,
        }

    def describe_sessions(self, server: str | None = None) -> list[dict[str, Any]]:
        return [self.describe_session(s) for s in list(self._ctx.sessions.sessions.values())
                if server is None or s.server.name == server]

    def describe_server(self, name: str) -> dict[str, Any]:
        server = self._server(name)
        now = self._reactor.seconds()
        sessions = [s for s in list(self._ctx.sessions.sessions.values()) if s.server.name == name]
        activity = self._ctx.sessions.activity.get(name)
        crashes = activity.crashes if activity is not None else 0
        children = []
        for s in sessions:
            upstream = s.upstream
            # A stdio child or a remote session has its own start time; a pool lease or an aggregate, the session's.
            inner = innermost(upstream)
            started = inner.started_at if isinstance(inner, (StdioUpstream, RemoteUpstream)) else s.created
            children.append({
                "pid": upstream.pid,
                "session": s.id,
                "transport": s.transport,
                "uptime": round(now - started, 3),
                "sessions": 1,
                "inFlight": len(s.pending_routes()),
            })
        kind = server.kind
        problems = []
        if server.kind == "stdio" and not os.access(server.executable, os.X_OK):
            problems.append(f"{server.executable} is not executable")
        base = f"/servers/{name}"
        return {
            "name": name,
            "kind": kind,
            "default": name == self._ctx.config.default_server.name,
            "command": server.command if server.kind == "stdio" else "",
            "args": list(server.args) if server.kind == "stdio" else [],
            "executable": server.executable if server.kind == "stdio" else "",
            "health": "ok" if not problems else "unavailable",
            "problems": problems,
            "paths": {"mcp": f"{base}/mcp", "sse": f"{base}/sse", "messages": f"{base}/messages", "ws": f"{base}/ws"},
            "sessions": len(sessions),
            "inFlight": sum(c["inFlight"] for c in children),
            "starts": activity.starts if activity is not None else 0,
            "crashes": crashes,
            "restarts": crashes,  # deprecated: the same count, under a name that says restarts
            "children": children,
            "stderr": list(activity.stderr) if activity is not None else [],
        }

    def describe_servers(self) -> list[dict[str, Any]]:
        return [self.describe_server(name) for name in list(self.servers)]

    def overview(self) -> dict[str, Any]:
        from mcpgw import __version__

        sessions = self._ctx.sessions
        return {
            "version": __version__,
            "uptime": round(self._reactor.seconds() - self.started, 3),
            "draining": self.draining,
            "accepting": sessions.accepting,
            "sessions": {"total": len(sessions.sessions), "byTransport": self.sessions_by_transport()},
            "servers": len(self.servers),
            "instance": self._ctx.cluster.instance if self._ctx.cluster is not None else None,
        }
