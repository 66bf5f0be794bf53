"""Issue 20, item 8: the console's "try it" panel in headless Chromium (driven as in
tests/test_console_browser.py).

Before Connect is pressed nothing reads as an empty placeholder (the endpoint it will talk to is
named, the session line and the result say what state they are in); a session opened from "try it"
is in the Sessions panel at once, with the page's periodic poll stopped so only the panel's own
refresh can put it there; Disconnect takes it out the same way; the page logs no error.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import websockets

from tests.gateway_process import fixture_server
from tests.test_console_browser import CHROMIUM, TOKEN, Browser, Page

pytestmark = pytest.mark.integration


async def drive(ws_url: str, console_url: str) -> tuple[dict, list]:
    seen: dict = {}
    async with websockets.connect(ws_url, max_size=None) as ws:
        page = Page(ws)
        try:
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await page.send(domain)
            await page.send("Page.navigate", url=console_url)
            await page.until("document.readyState === 'complete' && !!document.getElementById('login')")
            await page.js(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                          "document.getElementById('login-button').click(); true")
            await page.until("!!document.querySelector('#servers tr[data-server=\"fx\"]')")
            # Only the panel's own refreshes from here on: no periodic poll.
            await page.js("clearInterval(timer); timer = -1; true")
            seen["url"] = await page.js("document.getElementById('tryit-url').textContent")
            seen["intro"] = await page.js("document.querySelector('#tryit p').textContent")
            seen["session_line"] = await page.js("document.getElementById('tryit-session').textContent")
            seen["result"] = await page.js("document.getElementById('result').textContent")
            seen["rows_before"] = await page.js("document.querySelectorAll('#sessions tbody tr').length")
            await page.js("document.getElementById('tryit-server').value = 'time'; "
                          "document.getElementById('tryit-server').dispatchEvent(new Event('change')); true")
            seen["url_time"] = await page.js("document.getElementById('tryit-url').textContent")
            await page.js("document.getElementById('tryit-server').value = 'fx'; "
                          "document.getElementById('connect').click(); true")
            await page.until("document.getElementById('result').textContent.includes('tools listed')")
            sid = await page.js("tryit.session")
            seen["sid"] = sid
            # The row is rendered by connect() itself, right after tools/list.
            seen["row"] = await page.until(
                f"(() => {{ const r = document.querySelector('#sessions tr[data-session={json.dumps(sid)}]'); "
                "return r && [...r.cells].slice(1, 3).map(c => c.textContent); })()", timeout=5)
            seen["by_transport"] = await page.js("document.getElementById('by-transport').textContent")
            await page.js("document.getElementById('disconnect').click(); true")
            await page.until(f"!document.querySelector('#sessions tr[data-session={json.dumps(sid)}]')", timeout=5)
            seen["session_line_after"] = await page.js("document.getElementById('tryit-session').textContent")
            return seen, page.errors()
        finally:
            page.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_tryit_has_no_empty_placeholder_and_its_session_shows_at_once(make_gateway):
    servers = {"fx": fixture_server(), "time": {"command": sys.executable, "args": ["-m", "mcp_server_time"]}}
    gw = make_gateway({"mcpServers": servers, "admin": {"token": TOKEN}})
    browser = Browser()
    try:
        seen, errors = asyncio.run(drive(browser.ws_url, gw.url + "/console/"))
    finally:
        browser.close()
    assert seen["url"] == "/servers/fx/mcp", seen
    assert "()" not in seen["intro"] and seen["url"] in seen["intro"], seen
    assert seen["url_time"] == "/servers/time/mcp", seen
    assert seen["session_line"].startswith("Not connected"), seen
    assert seen["result"].strip(), seen
    assert seen["rows_before"] == 0, seen
    assert seen["row"] == ["fx", "streamable"], seen
    assert "streamable: 1" in seen["by_transport"], seen
    assert seen["session_line_after"].startswith("Not connected"), seen
    assert errors == [], json.dumps(errors, indent=1)[:3000]
