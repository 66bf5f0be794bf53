"""Issue 20, items 1 and 9: the README's SDK snippet against a real gateway, and what the README says.

The snippet is run as written (only the port changed to the test gateway's) with this environment's
SDK (2.x) against the shipped config. Each of its sessions first probes ``server/discover``
(MCP 2026-07-28 basic/versioning: a client falls back when the server does not serve the version;
the gateway answers 400/-32022 for a server without a pool): a healthy client, so
``mcp_gateway_errors_total`` must not move, and the probe shows as
``mcp_gateway_version_negotiations_total{outcome="fallback"}``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_process import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme() -> str:
    return README.read_text()


def section(title: str) -> str:
    """The README text from ``## title`` to the next ``## ``."""
    text = readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def sdk_snippet() -> str:
    [code] = re.findall(r"```python\n(.*?)```", section("From the official Python SDK"), re.S)
    return code


def samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics scrape: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(scrape: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in scrape.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def run_snippet(code: str) -> str:
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    return ran.stdout


@pytest.mark.integration
def test_readme_sdk_snippet_is_not_counted_as_an_error(make_gateway):
    """Item 1: the README client over Streamable HTTP and (its comment's alternative) SSE, two
    sessions; errors_total stays where it was, the Streamable session's probe is one fallback."""
    config = json.loads((ROOT / "conf" / "gateway.json").read_text())
    token = "readme-admin-token-0123456789"
    gw = make_gateway({**config, "admin": {"token": token, "statsInterval": 0.2}})
    metrics = gw.metrics_url
    before = samples(metrics)
    code = sdk_snippet().replace("localhost:3000", f"localhost:{gw.port}")
    assert f"http://localhost:{gw.port}/mcp" in code
    out = run_snippet(code)
    assert "get_current_time" in out and "UTC" in out, out
    sse = re.sub(r"streamable_http_client\((\"[^\"]*)/mcp\"\)", r'sse_client(\1/sse")', code)
    assert sse != code
    out = run_snippet(sse)
    assert "get_current_time" in out, out
    after = samples(metrics)
    errors = {k: v for k, v in after.items() if k[0] == "mcp_gateway_errors_total" and v != before.get(k, 0.0)}
    assert errors == {}, errors
    assert total(after, "mcp_gateway_sessions_total") - total(before, "mcp_gateway_sessions_total") == 2
    assert total(after, "mcp_gateway_version_negotiations_total", transport="streamable", outcome="fallback") == 1
    assert total(after, "mcp_gateway_requests_total", method="tools/call") == 2
    # The console's red errors/s line: the stats ring sampled after both runs shows no error.
    stats_url, auth = gw.url + "/admin/stats", {"authorization": f"Bearer {token}"}
    assert wait_until(lambda: sum(s["requests"] for s in httpx.get(stats_url, headers=auth).json()["samples"]) >= 2, 10)
    assert sum(s["errors"] for s in httpx.get(stats_url, headers=auth).json()["samples"]) == 0


@pytest.mark.integration
def test_readme_lists_every_metric_the_gateway_serves(make_gateway):
    """Item 9: each ``mcp_gateway_*`` family of a live gateway (after a fallback and a 2026-07-28
    outcome, so those families exist) is in the README, and the exporter's cluster read time."""
    from tests.gateway_process import fixture_server

    gw = make_gateway({"mcpServers": {"fx": fixture_server(), "pooled": fixture_server(sessions="pooled", poolSize=1)}})
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": "2026-07-28", "mcp-method": "server/discover"}
    discover = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}}
    assert httpx.post(gw.url + "/servers/fx/mcp", headers=headers, json=discover, timeout=10).status_code == 400
    mismatch = {**headers, "mcp-method": "tools/list"}
    assert httpx.post(gw.url + "/servers/pooled/mcp", headers=mismatch, json=discover, timeout=10).status_code == 400
    families = {f.name for f in text_string_to_metric_families(httpx.get(gw.metrics_url, timeout=10).text)}
    text = readme()
    for name in sorted(families):
        if name.startswith("mcp_gateway_"):
            counted = f"{name}_total" if f"{name}_total" in text else name
            assert counted in text, f"{name} is not in README.md"
    assert "mcp_gateway_version_negotiations" in families and "mcp_gateway_modern_outcomes" in families
    assert "`mcp_gateway_cluster_read_seconds`" in text
    exporter = (ROOT / "mcpgw" / "exporter.py").read_text()
    for name in re.findall(r'"(mcp_gateway_cluster_[a-z_]+)"', exporter):
        assert name in text, f"the exporter's {name} is not in README.md"


def test_readme_says_which_sdk_each_snippet_needs():
    """Item 9: mcp>=2 for the Streamable HTTP / SSE snippet, mcp[ws]<2 for the WebSocket one, apart."""
    sdk = section("From the official Python SDK")
    assert 'mcp>=2' in sdk and "environment of its own" in sdk
    ws = section("WebSocket")
    assert 'pip install "mcp[ws]<2"' in ws and "mcp>=2" in ws and "environment" in ws
    assert "from mcp.client.websocket import websocket_client" in ws


def test_test_extra_brings_requests_for_sseclient():
    """Item 9: sseclient-py follows a stream given by requests; the test extra installs both."""
    setup = (ROOT / "setup.py").read_text()
    extra = setup[setup.index('"test": ['):]
    extra = extra[:extra.index("]")]
    assert '"sseclient-py"' in extra and '"requests"' in extra


def test_readme_mentions_pidfile_for_a_second_gateway():
    """Item 6: twistd.pid stops a second gateway in the same folder; the README says how not to."""
    two = section("Two commands")
    assert "--pidfile=" in two and "twistd.pid" in two


def test_a_marked_refusal_counts_as_fallback_not_error():
    """The counting itself, in memory: ``mark_fallback`` turns a 400 into a negotiation, not an error."""
    from twisted.web.resource import Resource
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    from mcpgw.metrics import Metrics, mark_fallback

    class Refuses(Resource):
        isLeaf = True

        def __init__(self, fallback: bool) -> None:
            super().__init__()
            self.fallback = fallback

        def render(self, request):
            if self.fallback:
                mark_fallback(request)
            request.setResponseCode(400)
            return b"{}"

    metrics = Metrics(["s"], process=False)
    for fallback in (True, True, False):
        metrics.wrap(Refuses(fallback), "streamable", "s").render(Request(DummyChannel()))
    value = metrics.registry.get_sample_value
    assert value("mcp_gateway_version_negotiations_total",
                 {"transport": "streamable", "server": "s", "outcome": "fallback"}) == 2
    assert value("mcp_gateway_errors_total", {"transport": "streamable", "server": "s", "kind": "bad_request"}) == 1
