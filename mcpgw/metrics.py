"""Prometheus metrics: one ``Metrics`` per gateway, on its own registry and its own port.

The hot path touches metrics at a few hook points only, through objects whose
label values were resolved once:

- ``SessionManager.create`` / the session's end: sessions started, sessions active;
- ``Session.request`` (count, bytes in) and the response in ``Session.upstreamMessage``
  (latency from the start time kept with the pending request, bytes out, errors);
- ``SseResponse`` open/close and its writes: active connections, SSE events;
- WebSocket open/close: active connections;
- ``StdioUpstream`` spawn/stop/exit: child process gauges, crashes;
- ``Metrics.wrap`` around each MCP endpoint: HTTP error replies by kind;
- ``Metrics.redis_op`` and ``Metrics.rate_limited``: hooks for the Redis store and the rate limiter;
- ``Metrics.exemplar`` (mcpgw.dispatch, tracing on): a traced request's trace id, the exemplar of its
  latency bucket in the OpenMetrics exposition;
- ``mark_fallback`` where a protocol-version probe is refused as designed (``server/discover`` to a
  server without 2026-07-28): ``_CountErrors`` counts it in ``mcp_gateway_version_negotiations``, not
  as an error (an official SDK 2.x client probes once per session, then falls back to ``initialize``);
- the 2026-07-28 endpoint (mcpgw.transports.modern, transport ``modern``): its requests, bytes out, and
  ``modern_outcome`` (InputRequiredResults, resumed retries, unknown requestStates, header mismatches,
  missing capabilities) as plain numbers.

The per-message figures (requests, bytes, SSE events, the latency histogram)
are plain numbers on those objects, turned into families by ``_HotCollector``
at scrape time: a dict update per request and response rather than a lock taken
per prometheus-client counter. Everything, scrapes included, runs on the reactor
thread, so the plain numbers need no lock. The rest (errors, gauges, child processes, Redis) are ordinary
prometheus-client metrics.

Labels stay bounded: transports and error kinds are fixed sets, servers come
from the config, JSON-RPC methods from ``MCP_METHODS`` with ``other`` for the
rest. ``NoMetrics`` has the same surface and does nothing (``metrics.enabled: false``).
"""

from __future__ import annotations

import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mcpgw import __version__
from mcpgw.tracing.api import Span

#: JSON-RPC methods a client sends to an MCP server (2024-11-05 .. 2025-11-25); anything else is ``other``.
MCP_METHODS = frozenset({
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
    # 2026-07-28
    "server/discover",
    "subscriptions/listen",
})
OTHER = "other"
TRANSPORTS = ("streamable", "sse", "ws", "modern")
#: What became of 2026-07-28 requests (``mcp_gateway_modern_outcomes{server,outcome}``):
#:   input_required      an InputRequiredResult was sent (a pooled child asked sampling / elicitation / roots)
#:   resumed             a retry's requestState found its parked call
#:   state_unknown       a retry's requestState was refused (tampered, another identity's, expired, used, or its call ended): -32602
#:   header_mismatch     400/-32020 (routing or Mcp-Param-* headers disagree with the body)
#:   missing_capability  400/-32021 (the child asked for what the caller did not declare)
MODERN_OUTCOMES = ("input_required", "resumed", "state_unknown", "header_mismatch", "missing_capability")

#: Version negotiations that are not errors (``mcp_gateway_version_negotiations_total{outcome}``):
#:   fallback  a 2026-07-28 probe (server/discover, or a request in that version) was refused with
#:             400/-32022 or 404 because the server serves handshake versions only; the client goes on
#:             with initialize (2026-07-28 basic/versioning: the client falls back)
NEGOTIATION_OUTCOMES = ("fallback",)
#: The requests whose error reply is a version fallback (``mark_fallback``), read by ``_CountErrors``;
#: weak, so a request answered and dropped leaves nothing behind.
_fallbacks: weakref.WeakSet[Any] = weakref.WeakSet()

#: Error kinds (``mcp_gateway_errors_total{kind}``).
#:   upstream_error     the MCP server answered a request with a JSON-RPC error
#:   upstream_exit      a request failed because its server exited or was stopped (gateway's -32000)
#:   upstream_protocol  the server broke the framing (a line over maxMessageBytes) or wrote a line that is not
#:                      a JSON object (not UTF-8, nested too deep, cut short; the request it answers gets -32603)
#:   timeout            a request outlived limits.requestTimeout
#:   rejected           a request refused by the session (id already in flight, too many in flight, session over)
#:   spawn              a session could not start its server
#:   session_not_found  an unknown, expired or forged session id (404)
#:   bad_request        any other 4xx the gateway answered (400, 405, 406, 409, 413, 415); not a version
#:                      fallback (mark_fallback: mcp_gateway_version_negotiations instead)
#:   unauthorized       401
#:   forbidden          403 (Host / Origin checks)
#:   rate_limited       429
#:   unavailable        503 (shutting down, draining, a session cap, Redis down)
#:   internal           any other 5xx
ERROR_KINDS = frozenset({
    "upstream_error", "upstream_exit", "upstream_protocol", "timeout", "rejected", "spawn", "session_not_found", "bad_request",
    "unauthorized", "forbidden", "rate_limited", "unavailable", "internal",
})
_STATUS_KINDS = {401: "unauthorized", 403: "forbidden", 404: "session_not_found", 429: "rate_limited", 503: "unavailable"}

#: 1 ms .. 60 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Distinct Redis ``op`` labels kept before the rest become ``other`` (callers pass a fixed set).
MAX_REDIS_OPS = 32
REDIS_OUTCOMES = frozenset({"ok", "error", "timeout"})


def method_label(method: Any) -> str:
    """The bounded label for a JSON-RPC method."""
    return method if method in MCP_METHODS else OTHER


def mark_fallback(request: Any) -> None:
    """The error reply being written to ``request`` is a version fallback, not an error (see NEGOTIATION_OUTCOMES)."""
    _fallbacks.add(request)


def error_kind(status: int) -> str:
    """The error kind of an HTTP status the gateway answered with (>= 400)."""
    kind = _STATUS_KINDS.get(status)
    if kind is not None:
        return kind
    return "internal" if status >= 500 else "bad_request"


class BoundMetrics:
    """The instruments of one (transport, server) pair, label values resolved once.

    Each Session holds one; so do its streams and its child process.
    """

    def __init__(self, metrics: Metrics, transport: str, server: str):
        self._metrics = metrics
        self.transport = transport
        self.server = server
        # Per-message figures are plain numbers, read by _HotCollector at scrape time
        # (no lock, no prometheus call per message; everything runs on the reactor thread).
        self.requests: dict[str, int] = {}
        self.received_bytes = 0
        self.sent_bytes = 0
        self.events = 0
        #: 2026-07-28 outcomes (MODERN_OUTCOMES) -> count; only the modern transport's instruments have any.
        self.modern: dict[str, int] = {}
        #: NEGOTIATION_OUTCOMES -> count.
        self.negotiations: dict[str, int] = {}
        self._errors: dict[str, Any] = {}
        m = metrics
        self._sessions = m.sessions_total.labels(transport, server)
        self._connections = m.active_connections.labels(transport, server)
        self._running = m.child_processes.labels(server, "running")
        self._stopping = m.child_processes.labels(server, "stopping")
        self._child_starts = m.child_starts.labels(server)
        self._crashes = m.child_crashes.labels(server)
        self._restarts = m.child_restarts.labels(server)
        self._durations = m.durations

    # -- sessions and messages ---------------------------------------------

    def session_started(self) -> None:
        self._sessions.inc()

    def request(self, method: Any, size: int) -> str:
        """A client request of ``size`` bytes; returns its method label."""
        label = method if method in MCP_METHODS else OTHER
        requests = self.requests
        requests[label] = requests.get(label, 0) + 1
        self.received_bytes += size
        return label

    def received(self, size: int) -> None:
        """A client notification or response of ``size`` bytes."""
        self.received_bytes += size

    def sent(self, size: int) -> None:
        """A message of ``size`` bytes from the server to the client."""
        self.sent_bytes += size

    def answered(self, label: str, seconds: float) -> None:
        """The response to a request with method label ``label``, ``seconds`` after it came."""
        self._durations[label].observe(seconds)

    def error(self, kind: str) -> None:
        counter = self._errors.get(kind)
        if counter is None:
            counter = self._errors[kind] = self._metrics.errors.labels(self.transport, self.server, kind)
        counter.inc()

    # -- connections and streams -------------------------------------------

    def connection_opened(self) -> None:
        self._connections.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def sse_events(self, count: int = 1) -> None:
        self.events += count

    def modern_outcome(self, outcome: str) -> None:
        """One of MODERN_OUTCOMES happened to a 2026-07-28 request."""
        modern = self.modern
        modern[outcome] = modern.get(outcome, 0) + 1

    def negotiated(self, outcome: str) -> None:
        """One of NEGOTIATION_OUTCOMES (a client's protocol-version probe and what came of it)."""
        self.negotiations[outcome] = self.negotiations.get(outcome, 0) + 1

    # -- child processes -----------------------------------------------------

    def child_started(self) -> None:
        self._child_starts.inc()
        self._running.inc()

    def child_stopping(self) -> None:
        """The gateway asked a running child to stop."""
        self._running.dec()
        self._stopping.inc()

    def child_exited(self, stopping: bool) -> None:
        """A child exited; ``stopping`` if the gateway had asked it to. An unasked exit is a crash
        (counted under the deprecated restarts name too)."""
        if stopping:
            self._stopping.dec()
        else:
            self._running.dec()
            self._crashes.inc()
            self._restarts.inc()


class _NullBound(BoundMetrics):
    """Does nothing (metrics disabled, or a component built without a gateway)."""

    def __init__(self) -> None:
        self.transport = self.server = ""

    def session_started(self) -> None:
        pass

    def request(self, method: Any, size: int) -> str:
        return method if method in MCP_METHODS else OTHER

    def received(self, size: int) -> None:
        pass

    def sent(self, size: int) -> None:
        pass

    def answered(self, label: str, seconds: float) -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def sse_events(self, count: int = 1) -> None:
        pass

    def modern_outcome(self, outcome: str) -> None:
        pass

    def negotiated(self, outcome: str) -> None:
        pass

    def child_started(self) -> None:
        pass

    def child_stopping(self) -> None:
        pass

    def child_exited(self, stopping: bool) -> None:
        pass


NULL_BOUND: BoundMetrics = _NullBound()


class Metrics:
    """Every metric of one gateway, on a private registry (``metrics.enabled: true``)."""

    enabled = True

    def __init__(self, servers: Iterable[str] = (), registry: CollectorRegistry | None = None, process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._servers = frozenset(servers)
        self._bound: dict[tuple[str, str], BoundMetrics] = {}
        self._redis: dict[tuple[str, str], Any] = {}
        self._redis_ops: set[str] = set()
        self._rate_limited: dict[tuple[str, str], Any] = {}
        r = self.registry
        self.errors = Counter(
            "mcp_gateway_errors", "Failed requests and refused HTTP calls, by kind.",
            ["transport", "server", "kind"], registry=r)
        self.active_connections = Gauge(
            "mcp_gateway_active_connections", "Open SSE responses and WebSocket connections.",
            ["transport", "server"], registry=r)
        self.sessions_active = Gauge(
            "mcp_gateway_sessions_active", "Live sessions in this gateway.", registry=r)
        self.sessions_total = Counter(
            "mcp_gateway_sessions", "Sessions started.", ["transport", "server"], registry=r)
        self.durations = {m: _Histogram() for m in (*sorted(MCP_METHODS), OTHER)}
        self.child_processes = Gauge(
            "mcp_gateway_child_processes", "MCP server child processes by state (running, stopping).",
            ["server", "state"], registry=r)
        self.child_starts = Counter(
            "mcp_gateway_child_starts", "MCP server child processes spawned.", ["server"], registry=r)
        self.child_crashes = Counter(
            "mcp_gateway_child_crashes",
            "MCP server children that exited without being asked to (the client has to re-initialize).",
            ["server"], registry=r)
        #: Deprecated: what child_crashes counts, under a name that says restarts (a per-session
        #: child is never restarted; its client re-initializes); kept for the dashboards and alerts
        #: that read it.
        self.child_restarts = Counter(
            "mcp_gateway_child_restarts",
            "Deprecated: mcp_gateway_child_crashes under its former name (same value).",
            ["server"], registry=r)
        self.redis_operations = Counter(
            "mcp_gateway_redis_operations", "Redis operations by outcome (ok, error, timeout).",
            ["op", "outcome"], registry=r)
        r.register(_HotCollector(self))
        self.rate_limited_requests = Counter(
            "mcp_gateway_rate_limited_requests", "Requests refused by the rate limiter.",
            ["transport", "server"], registry=r)
        build = Gauge("mcp_gateway_build_info", "The gateway's version (always 1).", ["version"], registry=r)
        build.labels(__version__).set(1)
        for server in sorted(self._servers):
            for state in ("running", "stopping"):
                self.child_processes.labels(server, state)
        if process:
            ProcessCollector(registry=r)

    def bound(self, transport: str, server: str) -> BoundMetrics:
        """The instruments of one transport and server (cached)."""
        key = (transport, server)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = BoundMetrics(self, transport, server)
        return bound

    def watch_sessions(self, count: Callable[[], int]) -> None:
        """``mcp_gateway_sessions_active`` is read from ``count()`` at each scrape."""
        self.sessions_active.set_function(count)

    # -- hooks for other components -------------------------------------------

    def redis_op(self, op: str, outcome: str = "ok") -> None:
        """One Redis operation (``op`` from a small fixed set: "get", "publish", ...); outcome ok|error|timeout."""
        counter = self._redis.get((op, outcome))
        if counter is None:
            if op not in self._redis_ops:
                if len(self._redis_ops) >= MAX_REDIS_OPS:
                    op = OTHER
                else:
                    self._redis_ops.add(op)
            if outcome not in REDIS_OUTCOMES:
                outcome = "error"
            counter = self.redis_operations.labels(op, outcome)
            if op != OTHER:
                self._redis[(op, outcome)] = counter
        counter.inc()

    def exemplar(self, method: Any, seconds: float, span: Span) -> None:
        """The request of ``span`` (a traced one) took ``seconds`` for a request of ``method`` (any: its label is
        ``method_label``'s): the latest one of each bucket of mcp_gateway_request_duration_seconds is its
        exemplar (OpenMetrics exposition), its trace id written out at scrape time."""
        # (_Histogram.exemplar and method_label, inlined: once per traced request; a label is a key, and
        # every other method is OTHER's)
        histogram = self.durations.get(method) if type(method) is str else None
        if histogram is None:
            histogram = self.durations[OTHER]
        if histogram.exemplars is None:
            histogram.exemplars = {}
        histogram.exemplars[bisect_left(DURATION_BUCKETS, seconds)] = (span, seconds, time.time())

    def rate_limited(self, transport: str = OTHER, server: str = OTHER) -> None:
        """A request the rate limiter refused (unknown transports and servers count as ``other``)."""
        key = (transport if transport in TRANSPORTS else OTHER, server if server in self._servers else OTHER)
        counter = self._rate_limited.get(key)
        if counter is None:
            counter = self._rate_limited[key] = self.rate_limited_requests.labels(*key)
        counter.inc()

    # -- web --------------------------------------------------------------------

    def wrap(self, resource: Resource, transport: str, server: str) -> Resource:
        """``resource`` (one MCP endpoint) with its HTTP error replies counted."""
        return _CountErrors(resource, self, transport, server)

    def site(self) -> Site:
        """The ``/metrics`` site for the metrics port."""
        return metrics_site(self.registry)


class _Histogram:
    """One method's latency histogram as plain numbers (counts per bucket, not cumulative)."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        #: Bucket index -> (span, seconds, when): the latest traced request of each bucket (tracing on).
        self.exemplars: dict[int, tuple[Span, float, float]] | None = None

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[Any]:
        """(le, cumulative count), with its exemplar where a bucket has one."""
        buckets: list[Any] = list(zip(_LE, accumulate(self.counts)))
        for i, (span, seconds, when) in (self.exemplars or {}).items():
            buckets[i] = (*buckets[i], Exemplar({"trace_id": span.trace_id or ""}, seconds, when))
        return buckets


_LE = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]


class _HotCollector:
    """The per-message figures of every BoundMetrics, as Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        return self._families()

    def _families(self) -> Iterator[Any]:
        bound = list(self._metrics._bound.values())
        requests = CounterMetricFamily("mcp_gateway_requests", "JSON-RPC requests from clients.",
                                       labels=["transport", "server", "method"])
        received = CounterMetricFamily("mcp_gateway_received_bytes", "Bytes of JSON-RPC messages from clients.",
                                       labels=["transport", "server"])
        sent = CounterMetricFamily("mcp_gateway_sent_bytes", "Bytes of JSON-RPC messages to clients.",
                                   labels=["transport", "server"])
        events = CounterMetricFamily("mcp_gateway_sse_events",
                                     "SSE events written to clients (keepalive comments not counted).",
                                     labels=["transport", "server"])
        modern = CounterMetricFamily("mcp_gateway_modern_outcomes",
                                     "What became of 2026-07-28 requests: InputRequiredResults, resumed retries, "
                                     "unknown requestStates, header mismatches, missing capabilities.",
                                     labels=["server", "outcome"])
        negotiations = CounterMetricFamily("mcp_gateway_version_negotiations",
                                           "Protocol-version probes and what came of them (fallback: the client "
                                           "went on with initialize); not errors.",
                                           labels=["transport", "server", "outcome"])
        for b in bound:
            labels = [b.transport, b.server]
            for method, count in sorted(b.requests.items()):
                requests.add_metric([*labels, method], count)
            received.add_metric(labels, b.received_bytes)
            sent.add_metric(labels, b.sent_bytes)
            events.add_metric(labels, b.events)
            for outcome, count in sorted(b.modern.items()):
                modern.add_metric([b.server, outcome], count)
            for outcome, count in sorted(b.negotiations.items()):
                negotiations.add_metric([*labels, outcome], count)
        durations = HistogramMetricFamily("mcp_gateway_request_duration_seconds",
                                          "Time from a client request to its response.", labels=["method"])
        for method, h in self._metrics.durations.items():
            if sum(h.counts):
                durations.add_metric([method], h.buckets(), h.sum)
        yield from (requests, received, sent, events, durations, modern, negotiations)


class NoMetrics(Metrics):
    """``metrics.enabled: false``: the same surface, nothing recorded, nothing served."""

    enabled = False

    def __init__(self, servers: Iterable[str] = ()) -> None:
        pass

    def bound(self, transport: str, server: str) -> BoundMetrics:
        return NULL_BOUND

    def watch_sessions(self, count: Callable[[], int]) -> None:
        pass

    def redis_op(self, op: str, outcome: str = "ok") -> None:
        pass

    def exemplar(self, method: Any, seconds: float, span: Span) -> None:
        pass

    def rate_limited(self, transport: str = OTHER, server: str = OTHER) -> None:
        pass

    def wrap(self, resource: Resource, transport: str, server: str) -> Resource:
        return resource

    def site(self) -> Site:
        raise RuntimeError("metrics are disabled")


class _CountErrors(Resource):
    """Counts the error statuses an endpoint (and its Guard) answered with at once."""

    isLeaf = True

    def __init__(self, inner: Resource, metrics: Metrics, transport: str, server: str):
        super().__init__()
        self._inner = inner
        self._bound = metrics.bound(transport, server)

    def render(self, request: Request) -> Any:
        result = self._inner.render(request)
        if request.code >= 400:
            if request in _fallbacks:
                self._bound.negotiated("fallback")
            else:
                self._bound.error(error_kind(request.code))
        return result


class MetricsResource(Resource):
    """``GET /metrics``: the registry in the Prometheus text format (or OpenMetrics if asked)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


class _Index(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return self

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"metrics are at /metrics\n"


class MetricsSite(Site):
    """The metrics port's Site: ``/metrics`` only, no access log line per scrape."""

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> MetricsSite:
    root = _Index()
    root.putChild(b"metrics", MetricsResource(registry))
    return MetricsSite(root)
