"""``Cluster``: this instance's part of a gateway cluster, as a service.

It stands on a ``Backend``: the bus (``IPubSub``), the session records of every instance, the
instance registry (heartbeats), the shared event log. ``redis_backend`` builds it over one Redis
connection; ``mcpgw.cluster.memory`` builds one in memory for tests. On it, the parts: the
``Node`` (messages), ``Routes``/``OwnerRoutes`` (POSTs across instances), the ``Directory`` (who
owns a session), ``Streams`` (SSE streams across instances) and the ``Sweeper``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw import logs
from mcpgw.cluster.directory import Directory
from mcpgw.cluster.eventlog import IEventLog, RedisEventLog
from mcpgw.cluster.node import Node
from mcpgw.cluster.pubsub import IPubSub, RedisPubSub
from mcpgw.cluster.routes import OwnerRoutes, Routes
from mcpgw.cluster.streams import Streams
from mcpgw.cluster.sweep import Sweeper
from mcpgw.config import GatewayConfig
from mcpgw.store.redis import (
    InstanceRegistry,
    Keys,
    RedisConnection,
    RedisSessionStore,
    client_name,
    new_instance_id,
    parse_url,
)


@attrs.frozen
class Backend:
    """What a cluster instance stands on."""

    instance: str
    pubsub: IPubSub
    #: The session records of every instance (RedisSessionStore: also the SessionManager's store).
    store: Any
    #: The instance registry: ``alive(instance, connected=False)``, ``refresh_records_of(sessions)``.
    registry: Any
    events: IEventLog
    #: The channel an instance listens on.
    channel: Callable[[str], str]
    #: Why the backend cannot be used now, or None.
    problem: Callable[[], str | None]
    #: How long one operation may take (seconds).
    timeout: float
    #: Started in this order, stopped one after another in the reverse order.
    services: tuple[IService, ...] = ()
    describe: str = "memory"
    #: For the shared rate limiter (mcpgw.tap): the connection and key schema, or None.
    redis: Any = None
    keys: Any = None


def redis_backend(config: GatewayConfig, reactor: Any, metrics: Any = None, instance: str | None = None) -> Backend:
    assert config.redis is not None
    instance = instance or new_instance_id()
    keys = Keys(config.redis.keyPrefix)
    redis = RedisConnection(parse_url(config.redis.url, config.redis.password), reactor,
                            timeout=config.redis.timeout, metrics=metrics)
    redis.client_name = client_name(keys, instance)
    max_age = config.session.idleSeconds
    touch = min(30.0, max(config.redis.heartbeat, max_age / 4))
    store = RedisSessionStore(redis, keys, instance, max_age, reactor,
                              grace=2 * touch + config.redis.heartbeat)
    registry = InstanceRegistry(redis, store, reactor, interval=config.redis.heartbeat, touch_interval=touch)
    events = RedisEventLog(redis, keys, lambda: config.sse.replayEvents, max_age + store.grace)

    def problem() -> str | None:
        found = redis.problem()
        return None if found is None else f"redis: {found}"

    return Backend(instance=instance, pubsub=RedisPubSub(redis), store=store, registry=registry, events=events,
                   channel=keys.channel, problem=problem, timeout=config.redis.timeout, services=(redis, registry),
                   describe=f"Redis at {redis.address.describe()}", redis=redis, keys=keys)


class Cluster(MultiService):
    """This instance's part of a gateway cluster: the backend's services, the parts, the sweeper."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: GatewayConfig, reactor: Any, metrics: Any = None, instance: str | None = None,
                 backend: Backend | None = None):
        super().__init__()
        assert config.redis is not None
        self.backend = backend or redis_backend(config, reactor, metrics, instance)
        self._reactor = reactor
        self.instance = self.backend.instance
        self.store = self.backend.store
        self.redis = self.backend.redis
        self.keys = self.backend.keys
        self.heartbeat = config.redis.heartbeat
        for service in self.backend.services:
            service.setServiceParent(self)
        self.node = Node(self.instance, reactor, self.backend.pubsub, self.backend.channel, self.backend.timeout)
        self.routes = Routes(self.node, self.backend.registry.alive)
        self.owner = OwnerRoutes(self.node)
        self.directory = Directory(self.node, self.routes, self.store, self.backend.registry, config)
        self.streams = Streams(self.node, self.directory, self.backend.events)
        self.sweeper = Sweeper(self.directory, self.owner, self.streams, config.session.idleSeconds)
        self.store.on_remove = self.node.session_removed
        self.backend.pubsub.on_change(self.sweeper.bus_changed)
        self.outlet = self.streams.outlet
        self.lookup = self.directory.lookup
        self._loop: LoopingCall | None = None

    @property
    def config(self) -> GatewayConfig:
        return self.directory.config

    @config.setter
    def config(self, config: GatewayConfig) -> None:
        """A reload: sessions owned elsewhere are looked up in the new server list."""
        self.directory.config = config

    def bind(self, ctx: Any) -> None:
        """Serve the gateway of ``ctx`` (its SessionManager's store is ``self.store``)."""
        self.directory.ctx = self.streams.ctx = self.owner.ctx = ctx
        self.node.sessions = sessions = ctx.sessions
        # The registry refreshes the records of the sessions that are in use.
        self.backend.registry.refresh_records_of(lambda: list(sessions.sessions.values()))

    # -- state ---------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why this instance is not ready (for ``/ready``), or None."""
        return self.backend.problem()

    def unavailable(self) -> str | None:
        """Why no new session can start now: one other instances could not find."""
        if self.backend.pubsub.available:
            return None
        return "session store unavailable (Redis)"  # the why and where are in the log, not for clients

    def startService(self) -> None:
        self.log.info("cluster: instance {instance}, {address}", instance=self.instance, address=self.backend.describe)
        super().startService()  # the backend's services, in order
        self._loop = LoopingCall(self.sweeper.sweep)
        self._loop.clock = self._reactor
        self._loop.start(max(self.heartbeat, 0.5), now=False).addErrback(
            lambda f: self.log.failure("cluster sweeper stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)  # not MultiService's: the children stop in order, not all at once
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # The registry's DEL is answered after every write the sessions' shutdown queued before it.
        for service in reversed(self.backend.services):
            await defer.maybeDeferred(service.stopService)
