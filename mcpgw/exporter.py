"""``twistd mcpgw-exporter``: cluster-wide figures from Redis on one ``/metrics``.

Each gateway exports its own metrics on its metrics port; this exporter reads
what the instances share in Redis (the key schema of ``mcpgw.store.redis``) at
each scrape, so one scrape sees the whole cluster:

- ``PREFIX instance:ID`` (heartbeat, ``{"pid", "host", "started", "redis"}``, ``PX`` TTL): live
  instances, each one's heartbeat age (its TTL minus what is left of it) and uptime;
- ``PREFIX session:ID`` (hash ``server transport instance ...``): sessions per server and
  transport, per owning instance, and those whose owner is no longer alive.

Reads are ``SCAN`` + ``GET``/``PTTL``/``HMGET`` (never ``KEYS``); concurrent scrapes
share one read. When Redis cannot be read, ``mcp_gateway_cluster_up`` is 0 and
the other families are empty.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs
import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from twisted.application import strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpgw import jsonrpc, logs
from mcpgw.config import LOG_FORMATS, ConfigError, GatewayConfig, load
from mcpgw.metrics import MetricsSite, _Index
from mcpgw.responding import gone
from mcpgw.store.redis import Keys, RedisConnection, parse_url
from mcpgw.tap import GatewayService

#: Keys asked for per SCAN page.
SCAN_COUNT = 500
#: Label value for a session record without an owning instance.
NO_INSTANCE = "none"


def heartbeat_ttl(interval: float) -> float:
    """The TTL of an instance's heartbeat key for a heartbeat ``interval`` (``InstanceRegistry.ttl``)."""
    return max(3 * interval, interval + 1.0)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@attrs.define
class Instance:
    id: str
    host: str
    pid: int | None
    started: float | None
    #: Seconds since its last heartbeat (None: the key has no TTL).
    heartbeat_age: float | None


@attrs.define
class Snapshot:
    """What one read of Redis found."""

    up: bool = False
    read_seconds: float = 0.0
    instances: list[Instance] = attrs.field(factory=list)
    #: (server, transport) -> sessions
    sessions: dict[tuple[str, str], int] = attrs.field(factory=dict)
    #: instance id (or NO_INSTANCE) -> sessions
    by_instance: dict[str, int] = attrs.field(factory=dict)
    orphans: int = 0
    taken_at: float = 0.0


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ("" if value is None else str(value))


class ClusterReader:
    """Reads a Snapshot of the cluster from Redis; one read at a time, shared by concurrent callers."""

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, keys: Keys, heartbeat: float, reactor: Any):
        self._redis = redis
        self._keys = keys
        self._ttl = heartbeat_ttl(heartbeat)
        self._reactor = reactor
        self.snapshot = Snapshot()
        self._reading: list[defer.Deferred[Snapshot]] | None = None
        self._failures = 0

    def refresh(self) -> defer.Deferred[Snapshot]:
        """A fresh Snapshot (never fails: an unreadable Redis gives ``up=False``)."""
        d: defer.Deferred[Snapshot] = defer.Deferred()
        if self._reading is not None:
            self._reading.append(d)
            return d
        self._reading = [d]
        defer.Deferred.fromCoroutine(self._read()).addBoth(self._done)
        return d

    def _done(self, result: Any) -> None:
        if isinstance(result, Snapshot):
            self._failures = 0
            self.snapshot = result
        else:
            self._failures += 1
            if self._failures == 1 or self._failures % 60 == 0:
                self.log.warn("exporter: cannot read the cluster from Redis: {error}", error=result.getErrorMessage())
            self.snapshot = Snapshot(up=False, taken_at=self._reactor.seconds())
        waiters, self._reading = self._reading or [], None
        for d in waiters:
            d.callback(self.snapshot)

    async def _scan(self, pattern: str) -> list[bytes]:
        keys: list[bytes] = []
        cursor: Any = b"0"
        while True:
            cursor, page = await self._redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
            keys.extend(page)
            if _text(cursor) == "0":
                return keys

    async def _read(self) -> Snapshot:
        started = time.monotonic()
        now = self._reactor.seconds()
        snap = Snapshot(up=True, taken_at=now)
        instance_prefix = self._keys.instance("")
        instance_keys = await self._scan(glob_escape(instance_prefix) + "*")
        values = await defer.gatherResults(
            [self._redis.execute("GET", k) for k in instance_keys]
            + [self._redis.execute("PTTL", k) for k in instance_keys],
            consumeErrors=True,
        )
        n = len(instance_keys)
        for key, value, pttl in zip(instance_keys, values[:n], values[n:]):
            if value is None:
                continue  # expired between SCAN and GET
            try:
                info = jsonrpc.loads(value)
            except (jsonrpc.DecodeError, ValueError):
                info = {}
            info = info if isinstance(info, dict) else {}
            ttl_left = int(pttl) if pttl is not None else -1
            snap.instances.append(Instance(
                id=_text(key)[len(instance_prefix):],
                host=str(info.get("host", "")),
                pid=info.get("pid") if isinstance(info.get("pid"), int) else None,
                started=float(info["started"]) if isinstance(info.get("started"), (int, float)) else None,
                heartbeat_age=max(0.0, self._ttl - ttl_left / 1000.0) if ttl_left >= 0 else None,
            ))
        live = {i.id for i in snap.instances}
        session_keys = await self._scan(glob_escape(self._keys.session("")) + "*")
        records = await defer.gatherResults(
            [self._redis.execute("HMGET", k, "server", "transport", "instance") for k in session_keys],
            consumeErrors=True,
        )
        for fields in records:
            server, transport, instance = (_text(f) for f in fields)
            if not server:
                continue  # expired between SCAN and HMGET
            snap.sessions[(server, transport)] = snap.sessions.get((server, transport), 0) + 1
            owner = instance or NO_INSTANCE
            snap.by_instance[owner] = snap.by_instance.get(owner, 0) + 1
            if instance and instance not in live:
                snap.orphans += 1
        snap.read_seconds = time.monotonic() - started
        return snap


class ClusterCollector:
    """Prometheus families from the reader's latest Snapshot."""

    def __init__(self, reader: ClusterReader):
        self._reader = reader

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._reader.snapshot
        yield GaugeMetricFamily("mcp_gateway_cluster_up", "1 if the last scrape could read the cluster from Redis.",
                                value=1 if snap.up else 0)
        yield GaugeMetricFamily("mcp_gateway_cluster_read_seconds", "How long reading the cluster from Redis took.",
                                value=snap.read_seconds)
        yield GaugeMetricFamily("mcp_gateway_cluster_instances", "Live gateway instances (heartbeat keys in Redis).",
                                value=len(snap.instances))
        age = GaugeMetricFamily("mcp_gateway_cluster_instance_heartbeat_age_seconds",
                                "Seconds since each live instance's last heartbeat.", labels=["instance", "host"])
        uptime = GaugeMetricFamily("mcp_gateway_cluster_instance_uptime_seconds",
                                   "Seconds since each live instance started.", labels=["instance", "host"])
        for i in snap.instances:
            if i.heartbeat_age is not None:
                age.add_metric([i.id, i.host], i.heartbeat_age)
            if i.started is not None:
                uptime.add_metric([i.id, i.host], max(0.0, snap.taken_at - i.started))
        yield age
        yield uptime
        sessions = GaugeMetricFamily("mcp_gateway_cluster_sessions", "Sessions in the cluster by server and transport.",
                                     labels=["server", "transport"])
        for (server, transport), count in sorted(snap.sessions.items()):
            sessions.add_metric([server, transport], count)
        yield sessions
        owned = GaugeMetricFamily("mcp_gateway_cluster_instance_sessions", "Sessions in the cluster by owning instance.",
                                  labels=["instance"])
        for instance, count in sorted(snap.by_instance.items()):
            owned.add_metric([instance], count)
        yield owned
        yield GaugeMetricFamily("mcp_gateway_cluster_orphan_sessions",
                                "Session records whose owning instance has no live heartbeat.", value=snap.orphans)


class ExporterResource(Resource):
    """``GET /metrics``: read the cluster, then answer with the registry."""

    isLeaf = True
    log = Logger(observer=logs.observer)

    def __init__(self, reader: ClusterReader, registry: CollectorRegistry):
        super().__init__()
        self._reader = reader
        self._registry = registry

    def render_GET(self, request: Request) -> Any:
        accept = request.getHeader(b"accept")
        encoder, content_type = prometheus_client.exposition.choose_encoder(accept.decode("latin-1") if accept else "")

        def answer(_: Snapshot) -> None:
            if gone(request):
                return
            body = encoder(self._registry)
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        self._reader.refresh().addCallback(answer).addErrback(lambda f: self.log.failure("exporter: scrape failed", f))
        return NOT_DONE_YET


def exporter_site(reader: ClusterReader, registry: CollectorRegistry) -> MetricsSite:
    root = _Index()
    root.putChild(b"metrics", ExporterResource(reader, registry))
    return MetricsSite(root)


def metrics_endpoint_for(config: GatewayConfig) -> str:
    host = config.metrics.host.replace(":", "\\:")
    return f"tcp:{config.metrics.port}:interface={host}"


class ExporterService(GatewayService):
    """The exporter's service tree; ``reader`` is its view of the cluster."""

    reader: ClusterReader


def build_exporter(config: GatewayConfig, reactor: Any, listen: str | None = None) -> ExporterService:
    """The Redis connection and the ``/metrics`` endpoint (``metrics.port``, or ``listen``)."""
    if config.redis is None:
        raise ConfigError("redis", "the exporter reads the cluster from Redis: configure redis.url (or REDIS_URL)")
    logs.set_level(config.logLevel)
    top = ExporterService()
    redis = RedisConnection(parse_url(config.redis.url, config.redis.password), reactor, timeout=config.redis.timeout)
    redis.setServiceParent(top)
    reader = ClusterReader(redis, Keys(config.redis.keyPrefix), config.redis.heartbeat, reactor)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(reader))
    ProcessCollector(registry=registry)
    top.reader = reader
    strports.service(listen or metrics_endpoint_for(config), exporter_site(reader, registry)).setServiceParent(top)
    return top


class Options(usage.Options):
    optParameters = [
        ["config", "c", "conf/gateway.json", "The gateways' JSON config file (its redis section, host and metrics.port)."],
        ["listen", "l", None, "Endpoint for /metrics, overriding host/metrics.port (e.g. tcp:9091:interface=0.0.0.0)."],
        ["log-format", None, None, "Log lines as text or json (overrides logFormat / LOG_FORMAT)."],
    ]

    def postOptions(self) -> None:
        if self["log-format"] is not None and self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self['log-format']!r}")


def makeService(options: Options, reactor: Any = None) -> ExporterService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load(options["config"])
        top = build_exporter(config, reactor, options["listen"])
    except (ConfigError, ValueError) as e:
        sys.stderr.write(f"mcpgw-exporter: config error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from e
    prometheus_client.disable_created_metrics()
    top.log_observer = logs.observer_for(options.parent, options["log-format"] or config.logFormat)
    return top
