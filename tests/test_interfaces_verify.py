"""mcpgw.interfaces: every provider has what its interfaces promise (``verifyObject``), built with fakes.

The last test walks every class of mcpgw that declares one of these interfaces: a new provider
without a check here fails it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from typing import Any

from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

import mcpgw
from mcpgw.aggregate import AggregateUpstream
from mcpgw.aggregate_members import _Member, _MemberDelegate
from mcpgw.config import ServerConfig, ToolFilter, parse
from mcpgw.interfaces import ILocalSession, IOutlet, IRoute, ISession, IUpstream, IUpstreamDelegate
from mcpgw.pool import ChildPool, PooledChild, PooledSession, PoolLease, ToolsFetch
from mcpgw.pool.session import _SessionRoute
from mcpgw.session import Session
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.modern import ModernExchange
from mcpgw.transports.sse import Heartbeat
from mcpgw.transports.websocket import WsConnection
from mcpgw.upstream import FilteredUpstream, make_upstream
from mcpgw.upstream.remote import RemoteUpstream
from mcpgw.upstream.stdio import StdioUpstream
from mcpgw.upstream.warm import WarmChildren, _Waiting
from tests.fake_process import FakeProcessReactor
from tests.fakes import RecordingRoute

OURS = (ISession, ILocalSession, IRoute, IOutlet, IUpstream, IUpstreamDelegate)


def stdio(**kw: Any) -> ServerConfig:
    return ServerConfig(**{"name": "s", "command": sys.executable, "executable": sys.executable, **kw})


class Delegate:
    """An IUpstreamDelegate that records nothing (the upstreams under test only need one to exist)."""

    routes_on_view = False

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        pass

    def upstreamProtocolError(self, reason: str) -> None:
        pass

    def upstreamEnded(self, reason: str) -> None:
        pass


class ProviderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.pool = ChildPool(stdio(name="p", sessions="pooled", poolSize=1), self.reactor)

    def verified(self, *pairs: tuple[Any, Any]) -> set[type]:
        for interface, obj in pairs:
            self.assertTrue(verifyObject(interface, obj))
        return {type(obj) for _, obj in pairs}

    def providers(self) -> set[type]:
        """Every provider, verified; the classes checked."""
        reactor = self.reactor
        session = Session("sid", stdio(), "streamable", reactor, lambda s: None)
        pooled = PooledSession(self.pool, "pid", self.pool.server, "sse", reactor, lambda s: None)
        config = parse({"mcpServers": {"a": {"command": sys.executable}, "b": {"command": sys.executable}},
                        "aggregate": {"name": "all", "servers": ["a", "b"]}}, {})
        aggregate = AggregateUpstream(config.servers["all"], Delegate(), reactor)
        filtered = make_upstream(stdio(tools=ToolFilter(allow=("x",))), Delegate(), reactor)
        remote = RemoteUpstream(stdio(url="http://127.0.0.1:1/mcp"), Delegate(), reactor, http=object())
        warm = WarmChildren(stdio(warmPool=1), reactor)
        child = StdioUpstream(stdio(), Delegate(), reactor)
        ctx = GatewayContext(config=config, sessions=None, heartbeat=Heartbeat(15, reactor),  # type: ignore[arg-type]
                             reactor=reactor)
        ws = WsConnection(session, protocol=None)  # type: ignore[arg-type]
        return self.verified(
            (ILocalSession, session), (ISession, session), (IUpstreamDelegate, session),
            (ILocalSession, pooled), (IUpstream, pooled.upstream),
            (IUpstream, child), (IUpstream, remote), (IUpstream, aggregate), (IUpstream, filtered),
            (IUpstreamDelegate, filtered), (IUpstreamDelegate, PooledChild(self.pool, 1)),
            (IUpstreamDelegate, _Waiting(warm, child)),
            (IUpstreamDelegate, _MemberDelegate(aggregate, _Member(config.servers["a"], 0))),
            (IRoute, ws), (IOutlet, ws), (IRoute, ModernExchange(ctx, self.pool, DummyRequest([b""]))),
            (IRoute, _SessionRoute(pooled, RecordingRoute(), 1)), (IRoute, ToolsFetch(self.pool, 0)),
        )

    def test_every_provider_verifies(self) -> None:
        checked = self.providers()
        self.assertIn(FilteredUpstream, checked)
        self.assertIn(PoolLease, checked)

    def test_every_declared_provider_is_verified_here(self) -> None:
        checked = self.providers()
        declared = {cls for cls in _classes() if any(i.implementedBy(cls) for i in OURS)}
        self.assertEqual({c.__qualname__ for c in declared - checked}, set())


def _classes() -> set[type]:
    """Every class defined in mcpgw's modules (each module imported)."""
    found: set[type] = set()
    for info in pkgutil.walk_packages(mcpgw.__path__, "mcpgw."):
        module = importlib.import_module(info.name)
        found.update(obj for _, obj in inspect.getmembers(module, inspect.isclass)
                     if obj.__module__ == info.name)
    return found
