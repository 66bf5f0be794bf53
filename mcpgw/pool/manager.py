"""Every pooled server's ChildPool, as one service of the gateway."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from mcpgw import logs
from mcpgw.config import GatewayConfig, ServerConfig, StdioServer
from mcpgw.pool.children import ChildPool
from mcpgw.pool.session import pooled_session_factory
from mcpgw.session import Session


class PoolManager(Service):
    """Every pooled server's ChildPool: started with the gateway, stopped (children exited) with it."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: GatewayConfig, reactor: Any):
        self.pools: dict[str, ChildPool] = {
            name: ChildPool(server, reactor, config.limits.requestTimeout, config.session.secret)
            for name, server in config.servers.items()
            if isinstance(server, StdioServer) and server.sessions == "pooled"
        }

    def get(self, server: ServerConfig) -> ChildPool | None:
        return self.pools.get(server.name)

    def session_factory(self, server: ServerConfig) -> Callable[..., Session] | None:
        """SessionManager's ``pooled``: a pooled server's sessions, on any transport, are served by its
        pool; every other server gets None (a Session of its own)."""
        pool = self.get(server)
        return None if pool is None else pooled_session_factory(pool)

    def startService(self) -> None:
        super().startService()
        for pool in self.pools.values():
            pool.start()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return defer.DeferredList([p.stop() for p in self.pools.values()])
