"""Issue 5: conf/grafana/mcp-gateway.json and conf/prometheus.yml.

The dashboard is checked as a Grafana document (ids, grid, targets, data
source variable) and every metric name in its queries is looked up in live
scrapes: a gateway with a Redis section and the exporter, on a private
redis-server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.gateway_process import fixture_server, wait_until
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_metrics import Scrape

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "conf" / "grafana" / "mcp-gateway.json"
PROMETHEUS = ROOT / "conf" / "prometheus.yml"
METRIC = re.compile(r"\b(mcp_gateway_[a-z0-9_]+|process_[a-z0-9_]+)\b")
#: The panels the issue asks for, by a word of their title.
REQUIRED = ("request rate", "error rate", "active connections", "p50", "p99", "redis")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, the template variables' too."""
    out = [(p["title"], t["expr"]) for p in panels(doc) if p["type"] != "row" for t in p["targets"]]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append((f"${var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def exported_names(scrape: Scrape) -> set[str]:
    """Every series name a query may use: samples, and the names each family's type defines."""
    names = {name for name, _ in scrape.samples}
    for family in scrape.families.values():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


class TestDocument:
    def test_grafana_shape(self) -> None:
        doc = dashboard()
        assert doc["title"] and doc["uid"] and isinstance(doc["schemaVersion"], int)
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        names = {v["name"]: v for v in doc["templating"]["list"]}
        assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
        for p in panels(doc):
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
            if p["type"] == "row":
                continue
            assert p["type"] in ("timeseries", "stat"), p["title"]
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]

    def test_required_panels(self) -> None:
        titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
        for word in REQUIRED:
            assert word in titles, word

    def test_queries_are_balanced_and_name_metrics(self) -> None:
        for title, expr in queries(dashboard()):
            for a, b in ("()", "{}", "[]"):
                assert expr.count(a) == expr.count(b), (title, expr)
            assert expr.count('"') % 2 == 0, (title, expr)
            assert METRIC.search(expr), (title, expr)

    def test_latency_quantiles_use_the_histogram(self) -> None:
        exprs = [e for _, e in queries(dashboard()) if "histogram_quantile" in e]
        assert any("histogram_quantile(0.50" in e for e in exprs) and any("histogram_quantile(0.99" in e for e in exprs)
        assert all("mcp_gateway_request_duration_seconds_bucket" in e and "le" in e for e in exprs)

    def test_latency_queries_ask_for_exemplars(self) -> None:
        """Issue 19: with tracing on, the duration histogram carries trace ids as exemplars; the latency
        panel asks Grafana to show them (a click leads to the trace, docs/observability.md)."""
        targets = [t for panel in dashboard()["panels"] for t in panel.get("targets", [])
                   if "mcp_gateway_request_duration_seconds_bucket" in t.get("expr", "")]
        assert targets and all(t.get("exemplar") is True for t in targets)

    def test_prometheus_scrape_config(self) -> None:
        doc = yaml.safe_load(PROMETHEUS.read_text())
        jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
        assert jobs["mcp-gateway"]["metrics_path"] == "/metrics"
        assert jobs["mcp-gateway"]["dns_sd_configs"][0]["port"] == 9091
        assert jobs["mcp-gateway-exporter"]["static_configs"][0]["targets"] == ["gateway-exporter:9091"]


@pytest.mark.integration
@pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)")
def test_every_query_names_a_live_metric(make_gateway, tmp_path) -> None:
    """Each metric name in the dashboard is in a live scrape of a gateway (with Redis) or of the exporter."""
    from tests.test_exporter import Exporter, config_file

    redis = RedisServer()
    exporter = None
    try:
        gw = make_gateway({"redis": {"url": redis.url, "heartbeat": 0.2}, "mcpServers": {"fx": fixture_server()}})
        exporter = Exporter(config_file(tmp_path, redis.url, heartbeat=0.2))
        gateway_scrape: list[Scrape] = []

        def redis_counted() -> bool:
            gateway_scrape[:] = [Scrape(httpx.get(gw.metrics_url, timeout=10).text)]
            return any(n == "mcp_gateway_redis_operations_total" for n, _ in gateway_scrape[0].samples)

        wait_until(redis_counted, timeout=10)
        names = exported_names(gateway_scrape[0]) | exported_names(exporter.scrape())
        missing = sorted({(title, name) for title, expr in queries(dashboard()) for name in METRIC.findall(expr)
                          if name not in names})
        assert not missing, missing
    finally:
        if exporter is not None:
            exporter.stop()
        redis.close()
