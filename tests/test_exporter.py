"""Issue 5: ``twistd mcpgw-exporter``: cluster-wide figures read from Redis.

Against a private redis-server (tests/redis_server.py: a free port, never the
machine's 6379). The schema is written by the Redis store's own classes
(``RedisSessionStore``, ``InstanceRegistry``), then by two real gateway
instances, and read back through a real ``twistd -n mcpgw-exporter``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import exporter
from mcpgw.store import SessionRecord
from mcpgw.store.redis import InstanceRegistry, Keys, RedisConnection, RedisSessionStore, parse_url
from tests.gateway_process import TWISTD, fixture_server, wait_until
from tests.redis_server import REDIS_SERVER
from tests.test_metrics import Scrape
from tests.wire import RawSseStream, http_client, open_session

pytestmark = pytest.mark.integration
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)")

#: Every family the exporter exports, with its label names.
FAMILIES = {
    "mcp_gateway_cluster_up": set(),
    "mcp_gateway_cluster_read_seconds": set(),
    "mcp_gateway_cluster_instances": set(),
    "mcp_gateway_cluster_instance_heartbeat_age_seconds": {"instance", "host"},
    "mcp_gateway_cluster_instance_uptime_seconds": {"instance", "host"},
    "mcp_gateway_cluster_sessions": {"server", "transport"},
    "mcp_gateway_cluster_instance_sessions": {"instance"},
    "mcp_gateway_cluster_orphan_sessions": set(),
}


class HelperTests(SynchronousTestCase):
    def test_globEscape(self) -> None:
        self.assertEqual(exporter.glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\")
        self.assertEqual(exporter.glob_escape("mcpgw:"), "mcpgw:")

    def test_heartbeatTtlIsTheRegistrys(self) -> None:
        """The exporter's TTL rule is the one InstanceRegistry writes with."""
        for interval in (0.2, 1.0, 5.0):
            registry = InstanceRegistry(None, RedisSessionStore(None, Keys(), "1", 1.0, task.Clock()),  # type: ignore[arg-type]
                                        task.Clock(), interval=interval)
            self.assertEqual(exporter.heartbeat_ttl(interval), registry.ttl)


def config_file(directory: Path, redis_url: str, prefix: str = "mcpgw:", heartbeat: float = 1.0) -> str:
    path = directory / "gateway.json"
    path.write_text(json.dumps({
        "host": "127.0.0.1",
        "redis": {"url": redis_url, "keyPrefix": prefix, "heartbeat": heartbeat},
        "mcpServers": {"fx": fixture_server()},
    }))
    return str(path)


class Exporter:
    """A real ``twistd -n mcpgw-exporter`` on a free port."""

    def __init__(self, config_path: str):
        self.proc = subprocess.Popen(
            [*TWISTD, "mcpgw-exporter", "--config", config_path, "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                raise RuntimeError("exporter exited:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"MetricsSite starting on (\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}/metrics"
                return
        raise RuntimeError("exporter did not start:\n" + "".join(self.lines))

    def scrape(self) -> Scrape:
        r = httpx.get(self.url, timeout=10)
        assert r.status_code == 200
        return Scrape(r.text)

    def scrape_until(self, predicate: Any, timeout: float = 10.0) -> Scrape:
        """Scrape until ``predicate(scrape)`` holds (the exporter reads Redis, an external process)."""
        last: list[Scrape] = []

        def check() -> bool:
            last[:] = [self.scrape()]
            return bool(predicate(last[0]))

        assert wait_until(check, timeout, interval=0.1), last[0].text if last else "no scrape"
        return last[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_exporter():
    started: list[Exporter] = []

    def start(config_path: str) -> Exporter:
        e = Exporter(config_path)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


# -- the schema, written by the store's own classes ---------------------------------


@needs_redis
@pytest_twisted.ensureDeferred
async def test_reader_counts_what_the_store_writes(redis):
    """Records and heartbeats written by RedisSessionStore / InstanceRegistry come back as cluster figures."""
    conn = RedisConnection(parse_url(redis.url), reactor, timeout=2)
    conn.startService()
    try:
        for _ in range(200):
            if conn.available:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        keys = Keys("tenant{a}:")
        clock = task.Clock()
        stores = {}
        for instance in ("111111111", "222222222"):
            store = RedisSessionStore(conn, keys, instance, 60.0, clock)
            stores[instance] = store
            registry = InstanceRegistry(conn, store, clock, interval=1.0)
            await conn.execute("SET", keys.instance(instance), registry.heartbeat(), "PX", int(registry.ttl * 1000))
        await stores["111111111"].add(SessionRecord("s1", "fx", "streamable", clock.seconds()))
        await stores["111111111"].add(SessionRecord("s2", "fx", "streamable", clock.seconds()))
        await stores["222222222"].add(SessionRecord("s3", "fx", "sse", clock.seconds()))
        await stores["222222222"].add(SessionRecord("s4", "beta", "ws", clock.seconds()))
        # A record whose owner has no heartbeat, and keys of another prefix (another cluster).
        await RedisSessionStore(conn, keys, "999999999", 60.0, clock).add(SessionRecord("s5", "fx", "ws", 0.0))
        await RedisSessionStore(conn, Keys("other:"), "333333333", 60.0, clock).add(
            SessionRecord("x1", "fx", "streamable", 0.0))
        await conn.execute("SET", "other:instance:333333333", b"{}", "PX", 5000)

        reader = exporter.ClusterReader(conn, keys, 1.0, reactor)
        snap = await reader.refresh()
        assert snap.up
        assert sorted(i.id for i in snap.instances) == ["111111111", "222222222"]
        assert all(0 <= i.heartbeat_age < 3.0 for i in snap.instances)
        assert snap.sessions == {("fx", "streamable"): 2, ("fx", "sse"): 1, ("beta", "ws"): 1, ("fx", "ws"): 1}
        assert snap.by_instance == {"111111111": 2, "222222222": 2, "999999999": 1}
        assert snap.orphans == 1

        await conn.stopService()
        snap = await reader.refresh()
        assert not snap.up and snap.instances == []
    finally:
        if conn.running:
            await conn.stopService()


# -- the real exporter and two real gateways --------------------------------------------


def gateway_config(redis_url: str) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url, "heartbeat": 0.2},
        "mcpServers": {"fx": fixture_server(default=True), "beta": fixture_server()},
    }


@needs_redis
def test_exporter_without_gateways(redis, start_exporter, tmp_path):
    """An empty cluster: every family, zero instances; Redis down: up 0."""
    e = start_exporter(config_file(tmp_path, redis.url))
    s = e.scrape_until(lambda s: s.value("mcp_gateway_cluster_up") == 1)
    for name in FAMILIES:
        assert name in s.families, name
    assert s.value("mcp_gateway_cluster_instances") == 0


@needs_redis
def test_exporter_config_needs_redis(tmp_path):
    """No redis section: one line naming the key, exit status 2."""
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"mcpServers": {"fx": fixture_server()}}))
    proc = subprocess.run([*TWISTD, "mcpgw-exporter", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "mcpgw-exporter: config error: redis:" in proc.stderr


@needs_redis
def test_two_gateways(redis, make_gateway, start_exporter, tmp_path):
    """Two gateway instances on one Redis: instances, sessions per server/transport and per instance, heartbeats."""
    a = make_gateway(gateway_config(redis.url))
    # Its first heartbeat comes with its start (0.2 s apart after): 30 s is a bound for a loaded machine, not a wait.
    assert redis.wait_for_key("mcpgw:instance:*", timeout=30), "the gateway wrote no heartbeat to Redis:\n" + a.log()
    b = make_gateway(gateway_config(redis.url))
    e = start_exporter(config_file(tmp_path, redis.url, heartbeat=0.2))
    s = e.scrape_until(lambda s: s.value("mcp_gateway_cluster_instances") == 2)
    ages = [x for x in s.families["mcp_gateway_cluster_instance_heartbeat_age_seconds"].samples]
    assert len(ages) == 2 and all(0 <= x.value <= 1.0 for x in ages), ages
    instances = sorted(x.labels["instance"] for x in ages)

    sse = None
    try:
        with http_client(a.url) as ca, http_client(b.url) as cb:
            sids_a = [open_session(ca, version="2025-06-18") for _ in range(2)]
            open_session(cb, version="2025-06-18", path="/servers/beta/mcp")
            sse = RawSseStream(b.port, "/sse")
            s = e.scrape_until(lambda s: sum(x.value for x in s.families["mcp_gateway_cluster_sessions"].samples) == 4)
            assert s.value("mcp_gateway_cluster_sessions", server="fx", transport="streamable") == 2
            assert s.value("mcp_gateway_cluster_sessions", server="beta", transport="streamable") == 1
            assert s.value("mcp_gateway_cluster_sessions", server="fx", transport="sse") == 1
            per_instance = {x.labels["instance"]: x.value for x in s.families["mcp_gateway_cluster_instance_sessions"].samples}
            assert sorted(per_instance.values()) == [2, 2] and sorted(per_instance) == instances
            assert s.value("mcp_gateway_cluster_orphan_sessions") == 0
            for sid in sids_a:
                assert ca.delete("/mcp", headers={"mcp-session-id": sid}).status_code == 200
        e.scrape_until(lambda s: s.value("mcp_gateway_cluster_sessions", server="fx", transport="streamable") == 0)
    finally:
        if sse is not None:
            sse.close()
    # The gateways count their own Redis operations (mcpgw.store.redis calls Metrics.redis_op): heartbeats are SETs.
    gateway = Scrape(httpx.get(a.metrics_url, timeout=10).text)
    assert gateway.value("mcp_gateway_redis_operations_total", op="set", outcome="ok") > 0
    # A gateway that stops takes its heartbeat with it.
    b.stop()
    e.scrape_until(lambda s: s.value("mcp_gateway_cluster_instances") == 1)
