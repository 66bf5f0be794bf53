"""Issue 6, CORS in a real browser: headless Chromium loads a page from another loopback origin
that talks to the gateway with ``fetch`` (Streamable HTTP) and ``EventSource`` + ``fetch``
(HTTP+SSE, the original README's JavaScript client).

The gateway (127.0.0.1) lists one page origin (http://localhost:A) in ``cors.origins``; the
same page from http://localhost:B must be blocked by the browser, and must start nothing in the
gateway. The page posts what it saw to its own server, which the test reads.

``CorsRuleTests`` check the rules behind it on mcpgw.web.Guard directly (no browser): the Fetch
spec's ``*``, echoed origins with credentials, loopback binds, preflights, CORS on a 401.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from mcpgw.auth import Authenticator
from mcpgw.config import (
    AuthConfig,
    CorsConfig,
    GatewayConfig,
    StaticToken,
    StdioServer,
)
from mcpgw.transports.common import GatewayContext
from mcpgw.web import ALLOW_HEADERS, Guard
from tests import wire
from tests.gateway_process import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mcpgw CORS</title></head>
<body><pre id="out">running</pre>
<script>
const GW = %(gateway)s;
const VERSION = "2025-06-18";
const results = {};
const init = (id, version) => ({jsonrpc: "2.0", id, method: "initialize",
  params: {protocolVersion: version, capabilities: {}, clientInfo: {name: "browser", version: "1"}}});
const echo = (id) => ({jsonrpc: "2.0", id, method: "tools/call", params: {name: "echo", arguments: {text: "from the browser"}}});
const initialized = {jsonrpc: "2.0", method: "notifications/initialized"};

// A POST's answer is JSON, or an SSE stream that ends after the response (Streamable HTTP).
async function reply(r) {
  const text = await r.text();
  if (!(r.headers.get("content-type") || "").startsWith("text/event-stream")) return JSON.parse(text);
  const data = text.split("\\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).filter((d) => d);
  return JSON.parse(data[data.length - 1]);
}

async function streamable() {
  try {
    const accept = {"content-type": "application/json", "accept": "application/json, text/event-stream"};
    const r = await fetch(GW + "/mcp", {method: "POST", headers: {...accept, "mcp-protocol-version": VERSION},
                                        body: JSON.stringify(init(1, VERSION))});
    const sid = r.headers.get("mcp-session-id");
    const body = await reply(r);
    results.fetch = {status: r.status, session: sid !== null, version: body.result.protocolVersion};
    const h = {...accept, "mcp-session-id": sid, "mcp-protocol-version": VERSION};
    await fetch(GW + "/mcp", {method: "POST", headers: h, body: JSON.stringify(initialized)});
    const r2 = await fetch(GW + "/mcp", {method: "POST", headers: h, body: JSON.stringify(echo(2))});
    results.echo = (await reply(r2)).result.content[0].text;
    results.deleted = (await fetch(GW + "/mcp", {method: "DELETE", headers: {"mcp-session-id": sid}})).status;
  } catch (e) {
    results.fetch = "blocked: " + e.name;
    results.error = String(e);
  }
}

function legacy() {
  return new Promise((resolve) => {
    const es = new EventSource(GW + "/sse");
    let finished = false;
    const done = (value) => { if (!finished) { finished = true; results.sse = value; es.close(); resolve(); } };
    setTimeout(() => done("timeout"), 10000);
    es.addEventListener("message", (m) => {
      const msg = JSON.parse(m.data);
      if (msg.id === 7) done({endpoint: true, echo: msg.result.content[0].text});
    });
    es.addEventListener("endpoint", async (e) => {
      const url = new URL(e.data, GW).href;
      const post = (msg) => fetch(url, {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(msg)});
      try {
        await post(init(0, "2024-11-05"));
        await post(initialized);
        await post(echo(7));
      } catch (err) {
        done("post blocked: " + err.name);
      }
    });
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) done("blocked"); };
  });
}

(async () => {
  await streamable();
  await legacy();
  document.getElementById("out").textContent = JSON.stringify(results);
  await fetch("/results", {method: "POST", body: JSON.stringify(results)});
})();
</script></body></html>
"""


class PageServer:
    """Serves the page on one loopback port (reached as ``localhost``) and records what the page
    posts to /results. ``gateway_url`` is read when the page is served."""

    def __init__(self) -> None:
        self.gateway_url = ""
        self.results: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = (PAGE % {"gateway": json.dumps(server.gateway_url)}).encode()
                status, body = (200, page) if self.path in ("/", "/index.html") else (404, b"")
                self.send_response(status)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                server.results.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://localhost:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_page(page: PageServer, timeout: float = 30) -> dict[str, Any]:
    """Headless Chromium on the page until it reports; the browser's process group ends after."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="mcpgw-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", page.origin + "/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            reported = wait_until(lambda: bool(page.results), timeout, interval=0.1)
        finally:
            _end_group(proc)
    assert reported, f"the page at {page.origin} reported nothing within {timeout} s"
    return page.results[-1]


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the browser's process group (it was started in its own session), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def setup(make_module_gateway):
    """Two page origins; the gateway lists the first only."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    allowed, other = PageServer(), PageServer()
    try:
        gw = make_module_gateway(wire.config(cors={"enabled": True, "origins": [allowed.origin]}))
        allowed.gateway_url = other.gateway_url = gw.url
        yield gw, allowed, other
    finally:
        allowed.close()
        other.close()


def sessions_started(gw: Any) -> int:
    return gw.log().count(" started (fx/")


@pytest.mark.integration
def test_allowed_origin_works(setup):
    """From the listed origin: fetch (Streamable HTTP: preflights, Mcp-Session-Id exposed, DELETE)
    and EventSource + fetch (HTTP+SSE) work end to end."""
    gw, allowed, _ = setup
    results = run_page(allowed)
    assert results["fetch"] == {"status": 200, "session": True, "version": "2025-06-18"}, results
    assert results["echo"] == "from the browser" and results["deleted"] == 200, results
    assert results["sse"] == {"endpoint": True, "echo": "from the browser"}, results
    assert wait_until(lambda: httpx.get(gw.url + "/health").json()["sessions"] == 0 and gw.child_pids() == [], 10)


@pytest.mark.integration
def test_other_origin_is_blocked(setup):
    """From another loopback origin the browser gets nothing (403 preflight and stream, no CORS
    headers), and the gateway starts no session for it."""
    gw, _, other = setup
    before = sessions_started(gw)
    results = run_page(other)
    assert results["fetch"] == "blocked: TypeError", results  # what fetch says of a CORS failure
    assert results["sse"] == "blocked", results
    assert sessions_started(gw) == before
    assert gw.child_pids() == []


# -- the CORS rules themselves (mcpgw.web.Guard, no browser) ----------------------------------


class Inner(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"inner"


class CorsRuleTests(SynchronousTestCase):
    def guard(self, origins: tuple[str, ...], host: str = "0.0.0.0", auth: AuthConfig | None = None) -> Guard:
        config = GatewayConfig(servers={"fx": StdioServer(name="fx", command="fx")}, host=host,
                               cors=CorsConfig(enabled=True, origins=origins))
        ctx = GatewayContext(config=config, sessions=None, heartbeat=None, reactor=Clock(),  # type: ignore[arg-type]
                             auth=Authenticator(auth or AuthConfig(), Clock()))
        return Guard(Inner(), ctx)

    def render(self, guard: Guard, origin: str, method: bytes = b"GET", **headers: str) -> tuple[DummyRequest, Any]:
        request = DummyRequest([b"mcp"])
        request.method = method
        request.client = IPv4Address("TCP", "127.0.0.1", 40000)
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:3000"])
        request.requestHeaders.setRawHeaders(b"origin", [origin.encode()])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
        return request, guard.render(request)

    def header(self, request: DummyRequest, name: str) -> str | None:
        values = request.responseHeaders.getRawHeaders(name.encode())
        return None if values is None else values[0].decode()

    def test_wildcard_is_sent_literally_without_credentials(self) -> None:
        """Fetch spec: ``*`` never goes with Access-Control-Allow-Credentials."""
        request, body = self.render(self.guard(("*",)), "https://any.example")
        self.assertEqual(body, b"inner")
        self.assertEqual(self.header(request, "access-control-allow-origin"), "*")
        self.assertIsNone(self.header(request, "access-control-allow-credentials"))
        self.assertEqual(self.header(request, "access-control-expose-headers"), "Mcp-Session-Id")

    def test_listed_origin_is_echoed_with_credentials(self) -> None:
        request, _ = self.render(self.guard(("https://app.example", "*")), "https://app.example")
        self.assertEqual(self.header(request, "access-control-allow-origin"), "https://app.example")
        self.assertEqual(self.header(request, "vary"), "Origin")
        self.assertEqual(self.header(request, "access-control-allow-credentials"), "true")

    def test_unlisted_origin_is_403_without_cors_headers(self) -> None:
        request, body = self.render(self.guard(("https://app.example",)), "https://evil.example")
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"Origin not allowed", body)
        self.assertIsNone(self.header(request, "access-control-allow-origin"))

    def test_loopback_bind_wildcard_means_loopback_origins(self) -> None:
        guard = self.guard(("*",), host="127.0.0.1")
        request, _ = self.render(guard, "http://localhost:5173")
        self.assertEqual(self.header(request, "access-control-allow-origin"), "http://localhost:5173")
        self.assertIsNone(self.header(request, "access-control-allow-credentials"))
        request, _ = self.render(guard, "https://evil.example")
        self.assertEqual(request.responseCode, 403)

    def test_loopback_bind_list_means_exactly_those(self) -> None:
        guard = self.guard(("http://localhost:5173",), host="127.0.0.1")
        self.assertEqual(self.render(guard, "http://localhost:5173")[1], b"inner")
        request, _ = self.render(guard, "http://localhost:8080")
        self.assertEqual(request.responseCode, 403)

    def test_preflight(self) -> None:
        """Allowed origins only; the MCP headers; before authentication (preflights carry no credentials)."""
        guard = self.guard(("https://app.example",), auth=AuthConfig(enabled=True, bearerTokens=(StaticToken("a", "a" * 20),)))
        request, body = self.render(guard, "https://app.example", b"OPTIONS", access_control_request_method="POST",
                                    access_control_request_headers="authorization, content-type, mcp-session-id")
        self.assertEqual((request.responseCode, body), (204, b""))
        self.assertEqual(self.header(request, "access-control-allow-methods"), "GET, POST, DELETE, OPTIONS")
        self.assertEqual(self.header(request, "access-control-allow-headers"), ALLOW_HEADERS.decode())
        self.assertEqual(ALLOW_HEADERS, b"Content-Type, Authorization, Mcp-Session-Id, MCP-Protocol-Version, "
                                        b"Last-Event-ID, Mcp-Method, Mcp-Name")
        request, _ = self.render(guard, "https://evil.example", b"OPTIONS", access_control_request_method="POST")
        self.assertEqual(request.responseCode, 403)
        self.assertIsNone(self.header(request, "access-control-allow-methods"))

    def test_401_carries_cors_headers(self) -> None:
        """A browser page can read the 401 (and its status) from an allowed origin."""
        guard = self.guard(("https://app.example",), auth=AuthConfig(enabled=True, bearerTokens=(StaticToken("a", "a" * 20),)))
        request, _ = self.render(guard, "https://app.example", b"POST")
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(self.header(request, "access-control-allow-origin"), "https://app.example")
        self.assertTrue(self.header(request, "www-authenticate").startswith("Bearer"))
