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
from mcpgw.cluster.directory import RemoteLegacyOutlet, RemoteSession
from mcpgw.cluster.memory import MemoryWorld
from mcpgw.cluster.routes import RemoteRoute
from mcpgw.cluster.service import Cluster
from mcpgw.cluster.streams import ClusterOutlet, RemoteOutlet
from mcpgw.config import RemoteServer, StdioServer, ToolFilter, parse
from mcpgw.dispatch import ObservedRoute
from mcpgw.interfaces import ILocalSession, IOutlet, IRoute, ISession, IUpstream, IUpstreamDelegate
from mcpgw.pool import ChildPool, PooledChild, PooledSession, PoolLease, ToolsFetch
from mcpgw.pool.session import _SessionRoute
from mcpgw.session import Session, SessionManager
from mcpgw.store import SessionRecord
from mcpgw.toolpolicy import HiddenTools
from mcpgw.tracing import NOOP_SPAN
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.legacy import LegacyStream
from mcpgw.transports.modern import ModernExchange
from mcpgw.transports.sse import Heartbeat
from mcpgw.transports.streamable import PostExchange, StreamableOutlet
from mcpgw.transports.websocket import WsConnection
from mcpgw.upstream import FilteredUpstream, make_upstream
from mcpgw.upstream.remote import RemoteUpstream
from mcpgw.upstream.stdio import StdioUpstream
from mcpgw.upstream.warm import WarmChildren, _Waiting
from tests.fake_process import FakeProcessReactor
from tests.fakes import RecordingRoute, SilentDelegate

OURS = (ISession, ILocalSession, IRoute, IOutlet, IUpstream, IUpstreamDelegate)


def stdio(**kw: Any) -> StdioServer:
    return StdioServer(**{"name": "s", "command": sys.executable, "executable": sys.executable, **kw})


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
        aggregate = AggregateUpstream(config.servers["all"], SilentDelegate(), reactor)
        filtered = make_upstream(stdio(tools=ToolFilter(allow=("x",))), SilentDelegate(), reactor)
        remote = RemoteUpstream(RemoteServer(name="r", url="http://127.0.0.1:1/mcp"), SilentDelegate(), reactor, http=object())
        warm = WarmChildren(stdio(warmPool=1), reactor)
        child = StdioUpstream(stdio(), SilentDelegate(), reactor)
        return self.verified(
            (ILocalSession, session), (ISession, session), (IUpstreamDelegate, session),
            (ILocalSession, pooled), (IUpstream, pooled.upstream),
            (IUpstream, child), (IUpstream, remote), (IUpstream, aggregate), (IUpstream, filtered),
            (IUpstreamDelegate, filtered), (IUpstreamDelegate, PooledChild(self.pool, 1)),
            (IUpstreamDelegate, _Waiting(warm, child)),
            (IUpstreamDelegate, _MemberDelegate(aggregate, _Member(config.servers["a"], 0))),
        ) | self.transport_providers(session, pooled) | self.cluster_providers()

    def transport_providers(self, session: Session, pooled: PooledSession) -> set[type]:
        """The routes and outlets of the transports (and of the pool's own requests), verified."""
        reactor = self.reactor
        heartbeat = Heartbeat(15, reactor)
        ctx = GatewayContext(config=parse({"mcpServers": {"a": {"command": sys.executable}}}, {}),
                             sessions=None, heartbeat=heartbeat, reactor=reactor)  # type: ignore[arg-type]
        ws = WsConnection(session, protocol=None)  # type: ignore[arg-type]
        outlet = StreamableOutlet(session, ctx)
        legacy = LegacyStream(session, DummyRequest([b""]), heartbeat)
        return self.verified(
            (IRoute, ws), (IOutlet, ws), (IRoute, ModernExchange(ctx, self.pool, DummyRequest([b""]))),
            (IRoute, _SessionRoute(pooled, RecordingRoute(), 1)), (IRoute, ToolsFetch(self.pool, 0)),
            (IOutlet, outlet), (IRoute, PostExchange(outlet, DummyRequest([b""]), [1], False)),
            (IRoute, legacy), (IOutlet, legacy), (IRoute, HiddenTools(RecordingRoute(), frozenset({"x"}))),
            (IRoute, ObservedRoute(ctx, RecordingRoute(), NOOP_SPAN, NOOP_SPAN, {"method": "tools/call"}, server="a",
                                   identity=None, client_ip=None)),
        )

    def cluster_providers(self) -> set[type]:
        """What an instance of a cluster makes of sessions owned here and elsewhere, verified."""
        reactor = self.reactor
        config = parse({"mcpServers": {"a": {"command": sys.executable}}, "redis": {"url": "redis://127.0.0.1:9/0"}}, {})
        cluster = Cluster(config, reactor, backend=MemoryWorld(reactor).backend("100000001"))
        ctx = GatewayContext(config=config, sessions=SessionManager(config, reactor, store=cluster.store),
                             heartbeat=Heartbeat(15, reactor), reactor=reactor, cluster=cluster)
        cluster.bind(ctx)
        server = config.servers["a"]
        streamable, legacy = (RemoteSession(cluster.directory, SessionRecord(id, "a", transport, 0.0, instance="100000002"),
                                            server) for id, transport in (("s1", "streamable"), ("s2", "sse")))
        owned = Session("sid", server, "streamable", reactor, lambda s: None, outlet=lambda s: cluster.outlet(s, ctx))
        return self.verified(
            (ISession, streamable), (IOutlet, streamable.outlet), (ISession, legacy), (IRoute, legacy.outlet),
            (IOutlet, legacy.outlet), (IOutlet, owned.outlet), (IRoute, RemoteRoute(cluster.owner, owned, "100000002", 1)),
        )

    def test_every_provider_verifies(self) -> None:
        checked = self.providers()
        self.assertLessEqual({FilteredUpstream, PoolLease, RemoteSession, RemoteOutlet, RemoteLegacyOutlet, ClusterOutlet,
                              RemoteRoute, StreamableOutlet, PostExchange, LegacyStream}, checked)

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
