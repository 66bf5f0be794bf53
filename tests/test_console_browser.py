"""Issue 11, point 3: the web console in headless Chromium (Debian ``chromium``), driven over the
Chrome DevTools protocol from Python (``websockets``).

A real gateway (admin token, a fast stats interval, some traffic first) serves ``/console/``;
the browser signs in with the token, sees the servers, the chart and the sessions, opens
"try it", connects to the fixture server through the gateway's own Streamable HTTP endpoint,
fills the form generated from ``echo``'s input schema, calls it and sees the result. A
screenshot goes to ``tests/artifacts/console.png`` (``MCPGW_DOCS_SCREENSHOT=1`` also copies it
to ``docs/console.png``), and the page must log no error at all.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests import wire
from tests.gateway_process import fixture_server, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "console-admin-token-0123456789"
pytestmark = pytest.mark.integration


class Browser:
    """Headless Chromium in its own process group, with a DevTools port on loopback."""

    def __init__(self) -> None:
        assert CHROMIUM is not None
        self._profile = tempfile.TemporaryDirectory(prefix="mcpgw-console-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={self._profile.name}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1400,1300",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        active = Path(self._profile.name) / "DevToolsActivePort"
        assert wait_until(lambda: active.exists() and len(active.read_text().split()) >= 2, 30, 0.1), "no DevTools port"
        port = int(active.read_text().split()[0])
        deadline = time.monotonic() + 10
        pages: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not pages:
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        assert pages, "no page target"
        self.ws_url = pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        self._profile.cleanup()


class Page:
    """One DevTools session on a page: commands, and every event kept for the checks."""

    def __init__(self, ws: Any):
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self._waiting:
                self._waiting.pop(msg["id"]).set_result(msg)
            elif "method" in msg:
                self.events.append(msg)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[id] = future
        await self._ws.send(json.dumps({"id": id, "method": method, "params": params}))
        msg = await asyncio.wait_for(future, 30)
        assert "error" not in msg, (method, msg["error"])
        return msg["result"]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll the page (another process) until ``expression`` is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            await asyncio.sleep(0.1)

    def errors(self) -> list[dict[str, Any]]:
        """Uncaught exceptions, console.error/assert, and error log entries (failed loads, CSP)."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown" or m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert") or m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(e)
        return out

    def close(self) -> None:
        self._reader.cancel()


def traffic(gw: Any, stop: threading.Event) -> None:
    """Sessions and calls for the console to show (stderr lines, a session left open, some errors),
    paced so the chart gets a few samples, until ``stop``."""
    with wire.http_client(gw.url) as client:
        sid = wire.open_session(client)
        client.post("/mcp", headers=wire.session_headers(sid),
                    json=wire.tool_call(1, "stderr", {"text": "fixture: hello on stderr"}))
        for i in itertools.count(10):
            client.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(i, "echo", {"text": "x"}))
            if i % 7 == 0:
                client.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(f"e{i}", "nope"))
            if i % 3 == 0:
                client.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(f"s{i}", "sleep", {"seconds": 0.05 * (i % 5)}))
            if stop.wait(0.05):
                return


async def drive(ws_url: str, console_url: str, gw: Any) -> tuple[Page, str, bytes]:
    async with websockets.connect(ws_url, max_size=None) as ws:
        page = Page(ws)
        try:
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await page.send(domain)
            await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=1300, deviceScaleFactor=1, mobile=False)
            await page.send("Page.navigate", url=console_url)
            await page.until("document.readyState === 'complete' && !!document.getElementById('login')")
            # sign in with the admin token
            await page.js(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                          "document.getElementById('login-button').click(); true")
            await page.until("!!document.querySelector('#servers tr[data-server=\"fx\"]')")
            names = await page.js("[...document.querySelectorAll('#servers tbody tr')].map(r => r.dataset.server)")
            assert names == ["fx", "time"], names
            assert await page.until("document.querySelector('#servers tr[data-server=\"fx\"] td.ok') !== null")
            assert "fixture: hello on stderr" in await page.until(
                "document.getElementById('stderr').textContent.includes('hello on stderr') && "
                "document.getElementById('stderr').textContent")
            # try it: connect, list tools, a form from echo's inputSchema, call, see the result
            await page.js("document.getElementById('tryit-server').value = 'fx'; document.getElementById('connect').click(); true")
            await page.until("document.getElementById('tool').options.length > 0")
            await page.js("const t = document.getElementById('tool'); t.value = 'echo'; "
                          "t.dispatchEvent(new Event('change')); true")
            await page.until("!!document.getElementById('arg-text')")
            await page.js("document.getElementById('arg-text').value = 'hello from the console'; "
                          "document.getElementById('call').click(); true")
            await page.until("document.getElementById('result').dataset.done === '1'")
            result = await page.js("document.getElementById('result').textContent")
            # the console's own session shows up in the sessions table, and the chart has samples
            await page.until("document.querySelectorAll('#sessions tbody tr').length >= 2")
            await page.until("document.getElementById('by-transport').textContent.includes('streamable')")
            # the recent failed calls: none here (no tracing, no audit log), and the table says why
            await page.until("document.querySelector('#failures tbody td.muted') !== null")
            assert "tracing" in await page.js("document.querySelector('#failures tbody').textContent")
            assert "crashes" in await page.js("document.querySelector('#servers thead').textContent")
            await page.js("const w = document.getElementById('chart-window'); w.value = '60'; "
                          "w.dispatchEvent(new Event('change')); window.scrollTo(0, 0); true")
            shot = await page.send("Page.captureScreenshot", format="png")
            return page, result, base64.b64decode(shot["data"])
        finally:
            page.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_console_in_chromium(make_gateway):
    """Sign in, see the servers (health, stderr), try it (initialize, tools/list, a form from the
    schema, tools/call) and see the result; a screenshot; no error in the page."""
    servers = {"fx": fixture_server(), "time": {"command": sys.executable, "args": ["-m", "mcp_server_time"]}}
    gw = make_gateway({"mcpServers": servers, "admin": {"token": TOKEN, "statsInterval": 1}, "sse": {"keepalive": 1}})
    stop = threading.Event()
    load = threading.Thread(target=traffic, args=(gw, stop), daemon=True)
    load.start()
    browser = None
    try:
        assert wait_until(lambda: len(httpx.get(gw.url + "/admin/stats",
                                                headers={"authorization": f"Bearer {TOKEN}"}).json()["samples"]) >= 8, 20)
        browser = Browser()
        page, result, png = asyncio.run(drive(browser.ws_url, gw.url + "/console/", gw))
    finally:
        stop.set()
        load.join(10)
        if browser is not None:
            browser.close()
    assert "hello from the console" in result, result
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "console.png").write_bytes(png)
    if os.environ.get("MCPGW_DOCS_SCREENSHOT"):
        (ROOT / "docs" / "console.png").write_bytes(png)
    assert page.errors() == [], json.dumps(page.errors(), indent=1)[:3000]
