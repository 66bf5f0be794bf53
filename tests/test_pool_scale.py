"""Issue 9, must-show 3 and 4: a pooled server with 4 children under 1,000 concurrent clients, and a child's death.

Integration: a real gateway and real fixture children; the clients are raw httpx (async), each a
2026-07-28 sessionless client of its own connection.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest

from tests import wire
from tests.gateway_process import fixture_server, wait_until

pytestmark = pytest.mark.integration
MODERN = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
CLIENTS = 1000


def call(id: Any, name: str, arguments: dict) -> tuple[dict, dict]:
    body = {"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": ENVELOPE}}
    headers = {**wire.POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name}
    return body, headers


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway({"mcpServers": {"fx": fixture_server(sessions="pooled", poolSize=4)}, "sse": {"keepalive": 5}})


def the_id(n: int) -> Any:
    """Ids that collide across clients: 1 and "1" (distinct in JSON-RPC), and 0..9 numeric."""
    return [1, "1", n % 10, str(n % 10)][n % 4]


async def _many(url: str) -> list[tuple[int, Any, dict]]:
    out: list[tuple[int, Any, dict]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(n: int) -> None:
            body, headers = call(the_id(n), "echo", {"text": f"client-{n}"})
            r = await client.post("/mcp", headers=headers, json=body)
            out.append((n, the_id(n), r.json()))

        async with anyio.create_task_group() as tg:
            for n in range(CLIENTS):
                tg.start_soon(one, n)
    return out


def test_thousand_concurrent_clients_each_get_their_own_reply(gw):
    """1,000 concurrent clients on 4 children, with colliding string and numeric ids: every reply has
    its client's own id (same JSON type) and its client's own text; still 4 children after."""
    assert wait_until(lambda: len(gw.child_pids()) == 4, timeout=10)
    pids = set(gw.child_pids())
    replies = anyio.run(_many, gw.url)
    assert len(replies) == CLIENTS
    for n, id, msg in replies:
        assert msg["id"] == id and type(msg["id"]) is type(id), (n, msg)
        assert msg["result"]["content"][0]["text"] == f"client-{n}", (n, msg)
    assert set(gw.child_pids()) == pids


async def _crash_among_sleepers(url: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def post(key: str, name: str, arguments: dict) -> None:
            body, headers = call(key, name, arguments)
            t0 = time.monotonic()
            r = await client.post("/mcp", headers=headers, json=body)
            results[key] = (r.json(), time.monotonic() - t0)

        async with anyio.create_task_group() as tg:
            for i in range(8):  # two on each child (least-loaded dispatch)
                tg.start_soon(post, f"s{i}", "sleep", {"seconds": 2})
            await anyio.sleep(0.5)  # this client's own pacing, not gateway timing: let the sleeps land first
            tg.start_soon(post, "crash", "crash", {})
    return results


def test_child_death_fails_its_requests_at_once_and_the_pool_refills(gw):
    """A child dies mid-call: its in-flight requests get a JSON-RPC error at once (well before their
    2 s sleep ends), the other children's requests finish normally, and a new child replaces it."""
    before = set(gw.child_pids())
    results = _crash_among_sleepers_sync(gw.url)
    failed = {k: v for k, v in results.items() if "error" in v[0]}
    ok = {k: v for k, v in results.items() if "result" in v[0]}
    assert "crash" in failed and failed["crash"][0]["error"]["code"] == -32000
    assert len(failed) == 3, failed  # the crash and the two sleeps that shared its child
    for key, (msg, elapsed) in failed.items():
        assert msg["id"] == key and elapsed < 1.5, (key, elapsed)
    assert len(ok) == 6
    assert all(msg["result"]["content"][0]["text"] == "slept 2" for msg, _ in ok.values())
    assert wait_until(lambda: "pool fx child 5 ready" in gw.log(), timeout=15), gw.log()[-4000:]
    assert wait_until(lambda: len(gw.child_pids()) == 4 and len(before - set(gw.child_pids())) == 1, timeout=15), \
        (before, gw.child_pids(), gw.log()[-4000:])
    assert "replacing it" in gw.log()


def _crash_among_sleepers_sync(url: str) -> dict[str, Any]:
    return anyio.run(_crash_among_sleepers, url)


async def _many_sessions(url: str) -> list[tuple[int, dict]]:
    out: list[tuple[int, dict]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(n: int) -> None:
            r = await client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize(version="2025-06-18"))
            headers = {**wire.POST_HEADERS, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
            await client.post("/mcp", headers=headers, json=wire.notification("notifications/initialized"))
            r = await client.post("/mcp", headers=headers, json=wire.request(the_id(n), "tools/call",
                                                                             {"name": "echo", "arguments": {"text": f"session-{n}"}}))
            out.append((n, r.json()))
            await client.delete("/mcp", headers=headers)

        async with anyio.create_task_group() as tg:
            for n in range(CLIENTS):
                tg.start_soon(one, n)
    return out


def test_thousand_handshake_sessions_share_four_children(gw):
    """1,000 concurrent handshake-era sessions (initialize, initialized, a call with a colliding id,
    DELETE) on the pooled server: each gets its own reply, and no child is started for any of them."""
    assert wait_until(lambda: len(gw.child_pids()) == 4, timeout=10)
    pids = set(gw.child_pids())
    replies = anyio.run(_many_sessions, gw.url)
    assert len(replies) == CLIENTS
    for n, msg in replies:
        assert msg["id"] == the_id(n) and type(msg["id"]) is type(the_id(n)), (n, msg)
        assert msg["result"]["content"][0]["text"] == f"session-{n}", (n, msg)
    assert set(gw.child_pids()) == pids
