"""``twistd mcpgw``: options and the service tree."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service, strports
from twisted.python import usage

from mcpgw import logs
from mcpgw.config import ConfigError, GatewayConfig, load
from mcpgw.session import SessionManager
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import Heartbeat
from mcpgw.web import build_site


class Options(usage.Options):
    optParameters = [
        ["config", "c", "conf/gateway.json", "Path to the gateway's JSON config file."],
        ["listen", "l", None, "Endpoint to listen on, overriding host/port (e.g. tcp:3000:interface=127.0.0.1)."],
    ]


def endpoint_for(config: GatewayConfig) -> str:
    host = config.host.replace(":", "\\:")
    return f"tcp:{config.port}:interface={host}"


def build_service(config: GatewayConfig, reactor: Any, listen: str | None = None) -> service.MultiService:
    """Everything one gateway runs: sessions (and their children), keepalive, the web endpoint."""
    logs.set_level(config.logLevel)
    top = service.MultiService()
    sessions = SessionManager(config, reactor)
    sessions.setServiceParent(top)
    heartbeat = Heartbeat(config.sse.keepalive, reactor)
    heartbeat.setServiceParent(top)
    ctx = GatewayContext(config=config, sessions=sessions, heartbeat=heartbeat, reactor=reactor)
    top.context = ctx  # type: ignore[attr-defined]
    site = build_site(ctx)
    web = strports.service(listen or endpoint_for(config), site)
    web.setServiceParent(top)
    return top


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load(options["config"])
    except ConfigError as e:
        # One clear line, a non-zero exit, nothing listening.
        sys.stderr.write(f"mcpgw: config error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    return build_service(config, reactor, options["listen"])
