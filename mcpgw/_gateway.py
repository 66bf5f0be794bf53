"""``mcpgw.Gateway``: the gateway as a library, to mount in an existing Twisted application."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpgw.config import ConfigError, GatewayConfig, ServerConfig, load, parse
from mcpgw.metrics import Metrics

if TYPE_CHECKING:
    from mcpgw.control import ServerControl


class _Built(Protocol):
    """What ``mcpgw.tap.build_service`` sets on the service it returns, besides the service itself."""

    site: Site
    metrics: Metrics
    control: ServerControl


class Gateway:
    """One MCP gateway: its sessions and children, its ``Resource`` tree and its ``Service``.

    Build it from a config (a ``GatewayConfig``, or a dict shaped like the JSON config file)
    or from a file, then either mount :attr:`resource` in your own ``twisted.web`` site and add
    :attr:`service` to your application, or call :meth:`listen` to give it a port of its own::

        gateway = Gateway.from_config({"mcpServers": {"time": {"command": "mcp-server-time"}}})
        root.putChild(b"mcp-gw", gateway.resource)   # /mcp-gw/mcp, /mcp-gw/servers/time/sse, ...
        gateway.service.setServiceParent(application)
        gateway.add_server("files", command="npx", args=["-y", "@modelcontextprotocol/server-filesystem", "/tmp"])

    The service must be running (``startService``, or a running parent) for sessions to be
    reaped and stats sampled; stopping it ends every session and fires when every child has
    exited. Nothing here listens on a port unless :meth:`listen` is called (the metrics port of
    ``twistd mcpgw`` is not opened either; :attr:`metrics` holds them).
    """

    def __init__(self, config: GatewayConfig | Mapping[str, Any], reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if not isinstance(config, GatewayConfig):
            config = parse(dict(config))
        from mcpgw.tap import build_service

        self._reactor = reactor
        self._top = build_service(config, reactor, serve=False)
        # The attributes are assigned in build_service, not declared on GatewayService: the cast names them.
        self._built = cast(_Built, self._top)
        self._control = self._built.control

    @classmethod
    def from_config(cls, config: GatewayConfig | Mapping[str, Any], reactor: Any = None) -> Gateway:
        """A gateway from a ``GatewayConfig`` or a dict in the config file's shape (checked: ConfigError)."""
        return cls(config, reactor)

    @classmethod
    def from_file(cls, path: str, reactor: Any = None, environ: Mapping[str, str] | None = None) -> Gateway:
        """A gateway from a JSON config file, with the environment overrides ``twistd mcpgw`` applies."""
        return cls(load(path, environ), reactor)

    @classmethod
    def from_json(cls, text: str, reactor: Any = None) -> Gateway:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError("", f"not valid JSON: {e}") from None
        return cls(raw, reactor)

    # -- what to mount -------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The current configuration (a new value after each add_server / remove_server)."""
        return self._control.config

    @property
    def resource(self) -> Resource:
        """The root ``Resource``: ``mcp``, ``sse``, ``messages``, ``ws``, ``servers/NAME/...``,
        ``health``, ``ready`` (and ``admin``, ``console`` with an admin token). Mount it with
        ``putChild``; its paths work under any prefix."""
        return self.site.resource

    @property
    def site(self) -> Site:
        """A ``Site`` of :attr:`resource` with the gateway's request handling (405s, body and header limits)."""
        return self._built.site

    @property
    def service(self) -> MultiService:
        """The ``Service`` to add to an application (``gateway.service.setServiceParent(app)``)."""
        return self._top

    @property
    def metrics(self) -> Metrics:
        return self._built.metrics

    def listen(self, endpoint: str) -> None:
        """Also serve :attr:`site` on ``endpoint`` (``"tcp:3000:interface=127.0.0.1"``), as a child
        service: it listens when the service starts."""
        from twisted.application import strports

        strports.service(endpoint, self.site).setServiceParent(self._top)

    def start(self) -> None:
        """Start the service (for applications without a service tree)."""
        if not self._top.running:
            self._top.startService()

    def stop(self) -> defer.Deferred[None]:
        """Stop the service: every session ends; fires when every child has exited."""
        return defer.maybeDeferred(self._top.stopService).addCallback(lambda _: None)

    def attach(self, parent: IServiceCollection) -> None:
        self._top.setServiceParent(parent)

    # -- servers at runtime --------------------------------------------------

    @property
    def servers(self) -> Mapping[str, ServerConfig]:
        return self._control.servers

    def add_server(self, name: str, command: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                   **options: Any) -> ServerConfig:
        """Serve a new stdio MCP server at ``servers/NAME/{mcp,sse,messages,ws}`` at once, without a
        restart. ``options`` are the other ``mcpServers`` keys (``cwd``, ``maxSessions``,
        ``inheritEnv``, ``stopGrace``, ``maxMessageBytes``). ``command`` is resolved on PATH now.

        Raises ConfigError (a bad value, a command that is not found) or ValueError (the name is taken).
        """
        return self._control.add_server(name, command, args=args, env=env, **options)

    def remove_server(self, name: str) -> defer.Deferred[int]:
        """Stop serving ``name``: its paths answer 404 from now on, its sessions end and its children
        are stopped. The Deferred fires with the number of sessions ended once every child has exited.

        Raises KeyError for an unknown name, ValueError for the default server (it is also served
        at the root paths).
        """
        return self._control.remove_server(name)

    def restart_server(self, name: str) -> defer.Deferred[int]:
        """End every session of ``name`` and stop its children; clients re-initialize and get new ones."""
        return self._control.restart_server(name)

    def drain(self) -> None:
        """Take no new sessions (503, ``/ready`` 503); the current ones go on."""
        self._control.drain()

    def resume(self) -> None:
        self._control.resume()

    def sessions(self) -> list[dict[str, Any]]:
        """The live sessions, as the admin API lists them."""
        return self._control.describe_sessions()
