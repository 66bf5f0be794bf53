"""Issue 5: Prometheus metrics (mcpgw.metrics) and the /metrics endpoint on its own port.

Unit tests drive the hook points on fake time and fake children; the
integration tests send real traffic over /mcp, /sse and /ws to a real
gateway and parse its scrape with ``prometheus_client.parser``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest
from websockets.sync.client import connect as ws_connect

from mcpgw import jsonrpc, tap
from mcpgw.config import GatewayConfig, MetricsConfig, StdioServer
from mcpgw.metrics import (
    DURATION_BUCKETS,
    MAX_REDIS_OPS,
    NULL_BOUND,
    Metrics,
    MetricsResource,
    NoMetrics,
    error_kind,
    method_label,
)
from mcpgw.session import SessionManager
from mcpgw.transports.sse import Heartbeat, SseResponse, frame
from mcpgw.upstream import stdio
from mcpgw.upstream.stdio import StdioUpstream
from tests.fake_process import FakeProcessReactor
from tests.fakes import FakeChildSession, RecordingRoute, SilentDelegate
from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.wire import POST_HEADERS, RawSseStream, http_client, messages_of, open_session, session_headers

SERVER = StdioServer(name="fx", command="fx", executable="/opt/bin/fx")

#: Every family the gateway exports: (name as the parser reports it, type, label names of its samples).
FAMILIES = {
    "mcp_gateway_requests": ("counter", {"transport", "server", "method"}),
    "mcp_gateway_errors": ("counter", {"transport", "server", "kind"}),
    "mcp_gateway_active_connections": ("gauge", {"transport", "server"}),
    "mcp_gateway_sessions_active": ("gauge", set()),
    "mcp_gateway_sessions": ("counter", {"transport", "server"}),
    "mcp_gateway_request_duration_seconds": ("histogram", {"method"}),
    "mcp_gateway_child_processes": ("gauge", {"server", "state"}),
    "mcp_gateway_child_starts": ("counter", {"server"}),
    "mcp_gateway_child_crashes": ("counter", {"server"}),
    "mcp_gateway_child_restarts": ("counter", {"server"}),  # deprecated: the same value as child_crashes
    "mcp_gateway_redis_operations": ("counter", {"op", "outcome"}),
    "mcp_gateway_received_bytes": ("counter", {"transport", "server"}),
    "mcp_gateway_sent_bytes": ("counter", {"transport", "server"}),
    "mcp_gateway_sse_events": ("counter", {"transport", "server"}),
    "mcp_gateway_rate_limited_requests": ("counter", {"transport", "server"}),
    "mcp_gateway_build_info": ("gauge", {"version"}),
}


class Scrape:
    """One parsed scrape: families by name, and sample values by (sample name, labels)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value (0 if it is not there yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def registry_scrape(metrics: Metrics) -> Scrape:
    request = DummyRequest([b"metrics"])
    body = MetricsResource(metrics.registry).render_GET(request)
    return Scrape(body.decode())


# -- unit: labels, hooks, no-op ---------------------------------------------------


class LabelTests(SynchronousTestCase):
    def test_knownMethodsKeepTheirName(self) -> None:
        """MCP methods are their own label value."""
        for method in ("initialize", "tools/call", "tools/list", "resources/read", "prompts/get", "ping"):
            self.assertEqual(method_label(method), method)

    def test_anythingElseIsOther(self) -> None:
        """Unknown, made-up or non-string methods are ``other`` (a bounded label)."""
        for method in ("x/evil-" + "a" * 100, "tools/call2", "", None, 42):
            self.assertEqual(method_label(method), "other")

    def test_statusKinds(self) -> None:
        """HTTP statuses map to a fixed set of error kinds."""
        self.assertEqual(
            [error_kind(s) for s in (400, 401, 403, 404, 405, 406, 409, 413, 415, 429, 500, 503)],
            ["bad_request", "unauthorized", "forbidden", "session_not_found", "bad_request", "bad_request",
             "bad_request", "bad_request", "bad_request", "rate_limited", "internal", "unavailable"],
        )

    def test_bucketsFromOneMillisecondToOneMinute(self) -> None:
        self.assertEqual((DURATION_BUCKETS[0], DURATION_BUCKETS[-1]), (0.001, 60.0))
        self.assertEqual(list(DURATION_BUCKETS), sorted(DURATION_BUCKETS))


class RegistryTests(SynchronousTestCase):
    def test_privateRegistries(self) -> None:
        """Two gateways in one process keep separate registries (no duplicate-name error, no shared counts)."""
        a, b = Metrics(["fx"]), Metrics(["fx"])
        a.bound("streamable", "fx").request("tools/call", 10)
        self.assertEqual(registry_scrape(a).value("mcp_gateway_requests_total", transport="streamable", server="fx",
                                                  method="tools/call"), 1)
        self.assertEqual(registry_scrape(b).value("mcp_gateway_requests_total", transport="streamable", server="fx",
                                                  method="tools/call"), 0)

    def test_everyFamilyWithItsLabels(self) -> None:
        """Every family exists on a fresh registry; once used, its samples carry the expected labels."""
        m = Metrics(["fx"], registry=CollectorRegistry(), process=False)
        bound = m.bound("ws", "fx")
        label = bound.request("tools/call", 5)
        bound.answered(label, 0.01)
        bound.error("upstream_error")
        bound.connection_opened()
        bound.child_started()
        bound.sse_events()
        bound.sent(3)
        bound.session_started()
        m.redis_op("get", "ok")
        m.rate_limited("ws", "fx")
        m.watch_sessions(lambda: 7)
        scrape = registry_scrape(m)
        for name, (kind, labels) in FAMILIES.items():
            self.assertIn(name, scrape.families)
            family = scrape.families[name]
            self.assertEqual(family.type, kind, name)
            self.assertTrue(family.samples, name)
            for s in family.samples:
                self.assertEqual(set(s.labels) - {"le"}, labels, (name, s))
        self.assertEqual(scrape.value("mcp_gateway_sessions_active"), 7)

    def test_redisOpsBounded(self) -> None:
        """Past MAX_REDIS_OPS distinct ops the rest count as ``other``; outcomes are ok|error|timeout."""
        m = Metrics(process=False)
        for i in range(MAX_REDIS_OPS + 10):
            m.redis_op(f"op{i}", "ok")
        m.redis_op("get", "weird")
        ops = {s.labels["op"] for s in registry_scrape(m).families["mcp_gateway_redis_operations"].samples}
        self.assertEqual(len(ops), MAX_REDIS_OPS + 1)
        self.assertIn("other", ops)
        self.assertEqual(registry_scrape(m).value("mcp_gateway_redis_operations_total", op="other", outcome="ok"), 10)

    def test_rateLimitedLabelsBounded(self) -> None:
        """Unknown transports and servers count as ``other``."""
        m = Metrics(["fx"], process=False)
        m.rate_limited("streamable", "fx")
        m.rate_limited("carrier-pigeon", "nope")
        scrape = registry_scrape(m)
        self.assertEqual(scrape.value("mcp_gateway_rate_limited_requests_total", transport="streamable", server="fx"), 1)
        self.assertEqual(scrape.value("mcp_gateway_rate_limited_requests_total", transport="other", server="other"), 1)

    def test_noMetricsDoesNothing(self) -> None:
        """The disabled variant has the same surface; nothing is recorded and nothing wrapped."""
        m = NoMetrics()
        self.assertFalse(m.enabled)
        self.assertIs(m.bound("ws", "fx"), NULL_BOUND)
        self.assertEqual(NULL_BOUND.request("tools/call", 1), "tools/call")
        m.redis_op("get", "ok")
        m.rate_limited("ws", "fx")
        m.watch_sessions(lambda: 1)
        resource = object()
        self.assertIs(m.wrap(resource, "ws", "fx"), resource)  # type: ignore[arg-type]


class SessionHookTests(SynchronousTestCase):
    """Session.request / Session.upstreamMessage: counts, bytes, latency from the pending request's start."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(["fx"], process=False)
        self.session = FakeChildSession("sid", SERVER, "streamable", self.clock, lambda s: None,
                                        metrics=self.metrics.bound("streamable", "fx"))
        self.route = RecordingRoute()

    def request(self, id: Any, method: str = "tools/call") -> bytes:
        msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": {}}
        raw = jsonrpc.dumps(msg)
        self.session.request(msg, raw, self.route)
        return raw

    def respond(self, id: Any, error: bool = False) -> bytes:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id}
        msg.update({"error": {"code": -32602, "message": "no"}} if error else {"result": {}})
        raw = jsonrpc.dumps(msg)
        self.session.upstreamMessage(raw, msg)
        return raw

    def value(self, name: str, **labels: str) -> float:
        return registry_scrape(self.metrics).value(name, **labels)

    def test_latencyFromTheRequestsStart(self) -> None:
        """The histogram observes the time from request to response on the session's clock."""
        self.request(1)
        self.clock.advance(0.25)
        self.respond(1)
        self.assertEqual(self.value("mcp_gateway_request_duration_seconds_count", method="tools/call"), 1)
        self.assertAlmostEqual(self.value("mcp_gateway_request_duration_seconds_sum", method="tools/call"), 0.25)
        self.assertEqual(self.value("mcp_gateway_request_duration_seconds_bucket", method="tools/call", le="0.1"), 0)
        self.assertEqual(self.value("mcp_gateway_request_duration_seconds_bucket", method="tools/call", le="0.25"), 1)

    def test_countsAndBytes(self) -> None:
        """Requests by method label, bytes both ways."""
        sent = [self.request(i) for i in range(3)] + [self.request(9, "made/up")]
        replies = [self.respond(i) for i in (0, 1, 2, 9)]
        labels = {"transport": "streamable", "server": "fx"}
        self.assertEqual(self.value("mcp_gateway_requests_total", method="tools/call", **labels), 3)
        self.assertEqual(self.value("mcp_gateway_requests_total", method="other", **labels), 1)
        self.assertEqual(self.value("mcp_gateway_received_bytes_total", **labels), sum(map(len, sent)))
        self.assertEqual(self.value("mcp_gateway_sent_bytes_total", **labels), sum(map(len, replies)))

    def test_upstreamErrorCounted(self) -> None:
        """A JSON-RPC error from the child counts as upstream_error."""
        self.request(1)
        self.respond(1, error=True)
        self.assertEqual(self.value("mcp_gateway_errors_total", transport="streamable", server="fx",
                                    kind="upstream_error"), 1)

    def test_inFlightRequestsOfAnEndedSession(self) -> None:
        """Requests failed because the child went away count as upstream_exit, one each."""
        self.request(1)
        self.request(2)
        self.session.upstreamEnded("exited with status 3")
        self.assertEqual(len(self.route.answers), 2)
        self.assertEqual(self.value("mcp_gateway_errors_total", transport="streamable", server="fx",
                                    kind="upstream_exit"), 2)

    def test_duplicateIdRejected(self) -> None:
        self.request(1)
        self.request(1)
        self.assertEqual(self.value("mcp_gateway_errors_total", transport="streamable", server="fx", kind="rejected"), 1)

    def test_pendingEntryKeepsRouting(self) -> None:
        """The pending entry carries the route: the response still reaches it, and cancel forgets it."""
        self.request(1)
        self.assertEqual(self.session.pending_routes(), [self.route])
        reply = self.respond(1)
        self.assertEqual(self.route.answers, [(1, reply)])
        self.assertFalse(self.session.has_pending())


class ManagerTests(SynchronousTestCase):
    def test_sessionsActiveAndStarted(self) -> None:
        """sessions_active reads the live count at scrape time; sessions_total counts starts."""
        self.patch(stdio, "_SETSID", None)
        reactor = FakeProcessReactor()
        metrics = Metrics(["fx"], process=False)
        manager = SessionManager(GatewayConfig(servers={"fx": SERVER}), reactor, metrics=metrics)
        a = manager.create(SERVER, "sse")
        manager.create(SERVER, "sse")
        scrape = registry_scrape(metrics)
        self.assertEqual(scrape.value("mcp_gateway_sessions_active"), 2)
        self.assertEqual(scrape.value("mcp_gateway_sessions_total", transport="sse", server="fx"), 2)
        self.assertEqual(scrape.value("mcp_gateway_child_processes", server="fx", state="running"), 2)
        a.close("test")
        scrape = registry_scrape(metrics)
        self.assertEqual(scrape.value("mcp_gateway_sessions_active"), 1)
        self.assertEqual(scrape.value("mcp_gateway_child_processes", server="fx", state="running"), 1)
        self.assertEqual(scrape.value("mcp_gateway_child_processes", server="fx", state="stopping"), 1)


class ChildGaugeTests(SynchronousTestCase):
    """StdioUpstream spawn / stop / exit move the child gauges; an exit nobody asked for is a crash
    (counted under the deprecated restarts name too)."""

    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()
        self.metrics = Metrics(["fx"], process=False)
        self.upstream = StdioUpstream(SERVER, SilentDelegate(), self.reactor)
        self.upstream.metrics = self.metrics.bound("ws", "fx")
        self.upstream.spawn()

    def gauges(self) -> tuple[float, float, float, float]:
        s = registry_scrape(self.metrics)
        crashes = s.value("mcp_gateway_child_crashes_total", server="fx")
        self.assertEqual(s.value("mcp_gateway_child_restarts_total", server="fx"), crashes)
        return (s.value("mcp_gateway_child_processes", server="fx", state="running"),
                s.value("mcp_gateway_child_processes", server="fx", state="stopping"),
                s.value("mcp_gateway_child_starts_total", server="fx"),
                crashes)

    def test_stopThenExit(self) -> None:
        self.assertEqual(self.gauges(), (1, 0, 1, 0))
        d = self.upstream.stop()
        self.upstream.stop()  # a second stop moves nothing
        self.assertEqual(self.gauges(), (0, 1, 1, 0))
        self.reactor.spawned[-1].exit(0)
        self.successResultOf(d)
        self.assertEqual(self.gauges(), (0, 0, 1, 0))

    def test_unaskedExitIsACrash(self) -> None:
        self.reactor.spawned[-1].exit(3)
        self.assertEqual(self.gauges(), (0, 0, 1, 1))


class SseHookTests(SynchronousTestCase):
    """SseResponse: one active connection while open; events counted, keepalive comments not."""

    def test_connectionAndEvents(self) -> None:
        metrics = Metrics(["fx"], process=False)
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        response = SseResponse(request, Heartbeat(15, Clock()), metrics=metrics.bound("sse", "fx"))

        def value(name: str) -> float:
            return registry_scrape(metrics).value(name, transport="sse", server="fx")

        self.assertEqual(value("mcp_gateway_active_connections"), 1)
        response.write(frame(b"{}", b"message"))
        response.keepalive()
        response.write_many([frame(b"1"), frame(b"2")])
        self.assertEqual(value("mcp_gateway_sse_events_total"), 3)
        response.finish()
        response.finish()
        self.assertEqual(value("mcp_gateway_active_connections"), 0)


class TapTests(SynchronousTestCase):
    """The metrics endpoint is a service of its own in the MultiService, unless disabled."""

    def config(self, **kw: Any) -> GatewayConfig:
        return GatewayConfig(servers={"fx": SERVER}, host="127.0.0.1", **kw)

    def endpoints(self, top: Any) -> list[tuple[str, int, str]]:
        """(site class, port, interface) of each listening service."""
        return [(type(s.factory).__name__, s.endpoint._port, s.endpoint._interface) for s in top if hasattr(s, "endpoint")]

    def test_metricsPortFromConfig(self) -> None:
        top = tap.build_service(self.config(metrics=MetricsConfig(port=9555)), Clock(), listen="tcp:0")
        self.assertEqual(self.endpoints(top), [("GatewaySite", 0, ""), ("MetricsSite", 9555, "127.0.0.1")])
        self.assertTrue(top.metrics.enabled)
        self.assertIs(top.context.metrics, top.metrics)

    def test_metricsListenOverrides(self) -> None:
        top = tap.build_service(self.config(), Clock(), listen="tcp:0", metrics_listen="tcp:0:interface=0.0.0.0")
        self.assertEqual(self.endpoints(top), [("GatewaySite", 0, ""), ("MetricsSite", 0, "0.0.0.0")])

    def test_disabled(self) -> None:
        """metrics.enabled false: no endpoint (even with --metrics-listen), the no-op Metrics everywhere."""
        top = tap.build_service(self.config(metrics=MetricsConfig(enabled=False)), Clock(), listen="tcp:0",
                                metrics_listen="tcp:0")
        self.assertEqual(self.endpoints(top), [("GatewaySite", 0, "")])
        self.assertIsInstance(top.metrics, NoMetrics)
        self.assertIs(top.context.metrics, top.metrics)

    def test_options(self) -> None:
        options = tap.Options()
        options.parseOptions(["--metrics-listen", "tcp:9999", "--log-format", "json"])
        self.assertEqual((options["metrics-listen"], options["log-format"]), ("tcp:9999", "json"))
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--log-format", "xml"])


# -- integration: real traffic, real scrapes ----------------------------------------

TOOL_CALLS = 30


def scrape(gw: Gateway) -> Scrape:
    r = httpx.get(gw.metrics_url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def echo(id: Any, text: str = "hi") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}}


@pytest.fixture(scope="module")
def gw(make_module_gateway) -> Gateway:
    return make_module_gateway({
        "mcpServers": {"fx": fixture_server(default=True), "beta": fixture_server()},
        "sse": {"keepalive": 0.2},
    })


@pytest.mark.integration
class TestScrape:
    def test_every_metric_exported(self, gw: Gateway) -> None:
        """A fresh gateway's scrape has every family; per-server series exist before any traffic."""
        s = scrape(gw)
        for name, (kind, _) in FAMILIES.items():
            assert name in s.families, name
            assert s.families[name].type == kind, name
        for server in ("fx", "beta"):
            for state in ("running", "stopping"):
                assert (("mcp_gateway_child_processes", frozenset({("server", server), ("state", state)}))
                        in s.samples)
            for transport in ("streamable", "sse", "ws"):
                assert s.value("mcp_gateway_active_connections", transport=transport, server=server) == 0
        assert "process_resident_memory_bytes" in s.families

    def test_not_on_the_public_port(self, gw: Gateway) -> None:
        assert httpx.get(f"{gw.url}/metrics").status_code == 404
        assert httpx.get(gw.metrics_url.replace("/metrics", "/")).status_code == 404

    def test_streamable_tool_calls(self, gw: Gateway) -> None:
        """30 tools/call over /mcp: the counter, the histogram and the byte counters rise by the traffic."""
        before = scrape(gw)
        labels = {"transport": "streamable", "server": "fx"}
        with http_client(gw.url) as client:
            sid = open_session(client, version="2025-06-18")
            sent = 0
            for i in range(TOOL_CALLS):
                body = json.dumps(echo(100 + i)).encode()
                sent += len(body)
                r = client.post("/mcp", headers={**POST_HEADERS, **session_headers(sid, "2025-06-18")}, content=body)
                assert messages_of(r)[0]["result"]["content"][0]["text"] == "hi"
            during = scrape(gw)
            assert client.delete("/mcp", headers={"mcp-session-id": sid}).status_code == 200
        after = scrape(gw)

        def delta(name: str, s: Scrape = after, **extra: str) -> float:
            return s.value(name, **extra) - before.value(name, **extra)

        assert delta("mcp_gateway_requests_total", method="tools/call", **labels) == TOOL_CALLS
        assert delta("mcp_gateway_requests_total", method="initialize", **labels) == 1
        assert delta("mcp_gateway_request_duration_seconds_count", method="tools/call") == TOOL_CALLS
        assert delta("mcp_gateway_request_duration_seconds_bucket", method="tools/call", le="60.0") == TOOL_CALLS
        assert 0 < delta("mcp_gateway_request_duration_seconds_sum", method="tools/call") < 60
        assert delta("mcp_gateway_received_bytes_total", **labels) > sent  # + initialize and the notification
        assert delta("mcp_gateway_sent_bytes_total", **labels) > 0
        assert delta("mcp_gateway_sessions_total", **labels) == 1
        assert delta("mcp_gateway_child_starts_total", server="fx") == 1
        assert during.value("mcp_gateway_sessions_active") == before.value("mcp_gateway_sessions_active") + 1
        assert delta("mcp_gateway_child_processes", during, server="fx", state="running") == 1
        assert wait_until(lambda: scrape(gw).value("mcp_gateway_child_processes", server="fx", state="running")
                          == before.value("mcp_gateway_child_processes", server="fx", state="running"))
        assert delta("mcp_gateway_errors_total", kind="upstream_exit", **labels) == 0

    def test_legacy_sse(self, gw: Gateway) -> None:
        """/sse + /messages: requests, one active connection while the stream is open, events written."""
        labels = {"transport": "sse", "server": "beta"}
        before = scrape(gw)
        stream = RawSseStream(gw.port, "/servers/beta/sse")
        try:
            with http_client(gw.url) as client:
                post = {"content-type": "application/json"}
                init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                        "params": {"protocolVersion": "2024-11-05", "capabilities": {},
                                   "clientInfo": {"name": "t", "version": "1"}}}
                assert client.post(stream.endpoint, headers=post, json=init).status_code == 202
                assert wait_until(lambda: stream.received.count(b"event: message") == 1)
                client.post(stream.endpoint, headers=post, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
                for i in range(5):
                    assert client.post(stream.endpoint, headers=post, json=echo(i + 1)).status_code == 202
                assert wait_until(lambda: stream.received.count(b"event: message") == 6)
            during = scrape(gw)
        finally:
            stream.close()
        assert during.value("mcp_gateway_active_connections", **labels) == 1
        assert during.value("mcp_gateway_requests_total", method="tools/call", **labels) - \
            before.value("mcp_gateway_requests_total", method="tools/call", **labels) == 5
        # The endpoint event and six messages.
        assert during.value("mcp_gateway_sse_events_total", **labels) - \
            before.value("mcp_gateway_sse_events_total", **labels) == 7
        assert wait_until(lambda: scrape(gw).value("mcp_gateway_active_connections", **labels) == 0)

    def test_websocket(self, gw: Gateway) -> None:
        """/ws: requests by method, one active connection while open, none after close."""
        labels = {"transport": "ws", "server": "fx"}
        before = scrape(gw)
        with ws_connect(f"ws://127.0.0.1:{gw.port}/ws", subprotocols=["mcp"]) as ws:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                           "clientInfo": {"name": "t", "version": "1"}}}))
            json.loads(ws.recv(10))
            ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            for i in range(7):
                ws.send(json.dumps(echo(i + 1)))
                assert json.loads(ws.recv(10))["id"] == i + 1
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 99, "method": "ping"}))
            json.loads(ws.recv(10))
            ws.send("this is not JSON")
            assert json.loads(ws.recv(10))["error"]["code"] == jsonrpc.PARSE_ERROR
            during = scrape(gw)
        assert during.value("mcp_gateway_active_connections", **labels) == 1
        assert during.value("mcp_gateway_errors_total", kind="bad_request", **labels) - \
            before.value("mcp_gateway_errors_total", kind="bad_request", **labels) == 1
        for method, count in (("tools/call", 7), ("ping", 1), ("initialize", 1)):
            assert during.value("mcp_gateway_requests_total", method=method, **labels) - \
                before.value("mcp_gateway_requests_total", method=method, **labels) == count
        assert wait_until(lambda: scrape(gw).value("mcp_gateway_active_connections", **labels) == 0)

    def test_unknown_session_is_an_error(self, gw: Gateway) -> None:
        """A POST with an unknown session id: errors_total{kind="session_not_found"} +1."""
        labels = {"transport": "streamable", "server": "fx", "kind": "session_not_found"}
        before = scrape(gw).value("mcp_gateway_errors_total", **labels)
        r = httpx.post(f"{gw.url}/mcp", headers={**POST_HEADERS, "mcp-session-id": "nope"}, json=echo(1))
        assert r.status_code == 404
        assert scrape(gw).value("mcp_gateway_errors_total", **labels) == before + 1

    def test_crash_is_an_error_and_a_child_crash(self, gw: Gateway) -> None:
        """The fixture's ``crash`` tool: the in-flight call fails (upstream_exit), the child counts as
        a crash (and under the deprecated restarts name)."""
        before = scrape(gw)
        with http_client(gw.url) as client:
            sid = open_session(client, version="2025-06-18")
            r = client.post("/mcp", headers={**POST_HEADERS, **session_headers(sid, "2025-06-18")},
                            json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "crash"}})
            assert messages_of(r)[0]["error"]["code"] == jsonrpc.CONNECTION_CLOSED
            r = client.post("/mcp", headers={**POST_HEADERS, **session_headers(sid, "2025-06-18")}, json=echo(8))
            assert r.status_code == 404
        after = scrape(gw)
        labels = {"transport": "streamable", "server": "fx"}
        assert after.value("mcp_gateway_errors_total", kind="upstream_exit", **labels) - \
            before.value("mcp_gateway_errors_total", kind="upstream_exit", **labels) == 1
        assert after.value("mcp_gateway_errors_total", kind="session_not_found", **labels) - \
            before.value("mcp_gateway_errors_total", kind="session_not_found", **labels) == 1
        for name in ("mcp_gateway_child_crashes_total", "mcp_gateway_child_restarts_total"):
            assert after.value(name, server="fx") - before.value(name, server="fx") == 1, name

    def test_child_error_and_other_method(self, gw: Gateway) -> None:
        """A JSON-RPC error from the child is upstream_error; an unknown method is counted as ``other``."""
        labels = {"transport": "streamable", "server": "fx"}
        before = scrape(gw)
        with http_client(gw.url) as client:
            sid = open_session(client, version="2025-06-18")
            headers = {**POST_HEADERS, **session_headers(sid, "2025-06-18")}
            r = client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "no/such-method"})
            assert messages_of(r)[0]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
            client.delete("/mcp", headers={"mcp-session-id": sid})
        after = scrape(gw)
        assert after.value("mcp_gateway_errors_total", kind="upstream_error", **labels) - \
            before.value("mcp_gateway_errors_total", kind="upstream_error", **labels) == 1
        assert after.value("mcp_gateway_requests_total", method="other", **labels) - \
            before.value("mcp_gateway_requests_total", method="other", **labels) == 1
        assert not [s for s in after.families["mcp_gateway_requests"].samples if s.labels["method"] == "no/such-method"]

    def test_bad_requests_counted(self, gw: Gateway) -> None:
        """A refused POST (406, no Accept) counts as bad_request for its transport and server."""
        labels = {"transport": "streamable", "server": "beta", "kind": "bad_request"}
        before = scrape(gw).value("mcp_gateway_errors_total", **labels)
        r = httpx.post(f"{gw.url}/servers/beta/mcp", headers={"content-type": "application/json", "accept": "text/html"},
                       json=echo(1))
        assert r.status_code == 406
        assert scrape(gw).value("mcp_gateway_errors_total", **labels) == before + 1


@pytest.mark.integration
def test_rate_limited_requests(make_gateway) -> None:
    """A 429 from the rate limiter counts in rate_limited_requests_total and errors_total{kind="rate_limited"}."""
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "rateLimit": {"enabled": True, "max": 2, "window": "1h"}})
    statuses = [httpx.post(f"{gw.url}/mcp", headers={**POST_HEADERS, "mcp-session-id": "x"}, json=echo(1)).status_code
                for _ in range(3)]
    assert statuses == [404, 404, 429]
    s = scrape(gw)
    assert s.value("mcp_gateway_rate_limited_requests_total", transport="streamable", server="fx") == 1
    assert s.value("mcp_gateway_errors_total", transport="streamable", server="fx", kind="rate_limited") == 1


@pytest.mark.integration
def test_disabled_means_no_endpoint(make_gateway) -> None:
    """metrics.enabled: false: no metrics listener even though the test harness passes --metrics-listen."""
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "metrics": {"enabled": False}})
    assert httpx.get(f"{gw.url}/health").status_code == 200
    assert "MetricsSite" not in gw.log()
