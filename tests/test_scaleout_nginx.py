"""Issue 4, "What it must show" 2-4: three gateway instances behind the real nginx, one private Redis.

The stack: a private redis-server (tests/redis_server.py, with a password), three
gateway processes with the same config (the Redis URL, REDIS_PASSWORD, a shared
session.secret), and nginx with the project's own config (``least_conn``, no
stickiness; rendered by tests/test_nginx.py's ``make_prefix`` with three upstream
servers). Clients are the official ``mcp`` SDK (``Client(..., mode="legacy")``
over ``streamable_http_client`` and ``sse_client``) and raw HTTP where the test
must see status codes.

Where requests went is read from nginx's access log (``upstream=...`` per line);
that replies reached the right session exactly once is checked on the SDK's own
read stream (every JSON-RPC response counted by id) and by the echoed text.
"""

from __future__ import annotations

import collections
import re
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import anyio
import httpx
import pytest
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.mcp_raw import ACCEPT_BOTH, initialize_request, notification, tool_call
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_nginx import NGINX, Nginx, free_port, make_prefix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)"),
    pytest.mark.skipif(NGINX is None, reason="no nginx binary (.ci/run installs it)"),
]

SECRET = "scaleout-test-secret-0123456789abcdef"
SESSIONS = 20
CALLS = 50


class Stack:
    def __init__(self, redis: RedisServer, gateways: list[Gateway], nginx: Nginx, port: int):
        self.redis = redis
        self.gateways = gateways
        self.nginx = nginx
        self.url = f"http://127.0.0.1:{port}"

    def instance_of(self, gw: Gateway) -> str:
        m = re.search(r"cluster: instance (\d+)", gw.log())
        assert m, gw.log()
        return m.group(1)

    def owner_of(self, session_id: str) -> Gateway:
        reply = self.redis.command("HGET", f"mcpgw:session:{session_id}", "instance")
        instance = reply.split(b"\r\n")[1].decode()
        [gw] = [g for g in self.gateways if self.instance_of(g) == instance]
        return gw

    def upstream_counts(self, pattern: str) -> collections.Counter[str]:
        """Requests per upstream (gateway port) in nginx's access log whose request line matches."""
        counts: collections.Counter[str] = collections.Counter()
        text = self.nginx.out.read_text(errors="replace") if self.nginx.out.exists() else ""
        for line in text.splitlines():
            m = re.search(r'"(\S+ \S+) HTTP/[\d.]+".*upstream=127\.0\.0\.1:(\d+)', line)
            if m and re.match(pattern, m.group(1)):
                counts[m.group(2)] += 1
        return counts

    def publishes(self) -> int:
        info = self.redis.command("INFO", "commandstats").decode()
        m = re.search(r"cmdstat_publish:calls=(\d+)", info)
        return int(m.group(1)) if m else 0


@pytest.fixture
def stack(make_gateway, tmp_path: Path) -> Iterator[Stack]:
    redis = RedisServer(password="scale out pw")
    nginx = None
    try:
        config = {
            "mcpServers": {"fx": fixture_server()},
            "session": {"secret": SECRET},
            "redis": {"url": redis.url_for(0), "heartbeat": 0.3, "timeout": 1.0},
            "sse": {"keepalive": 5},
        }
        gateways = [make_gateway(config, env={"REDIS_PASSWORD": redis.password}) for _ in range(3)]
        for gw in gateways:
            assert wait_until(lambda gw=gw: httpx.get(gw.url + "/ready").status_code == 200, 15), gw.log()
        http_port, https_port = free_port(), free_port()
        conf = make_prefix(tmp_path, [gw.port for gw in gateways], http_port, https_port)
        nginx = Nginx(tmp_path, conf)
        nginx.wait_listening(http_port, https_port)
        yield Stack(redis, gateways, nginx, http_port)
    finally:
        if nginx is not None:
            nginx.stop()
        redis.close()


class CountingReadStream:
    """The SDK's read stream, counting every JSON-RPC response (and error) by request id."""

    def __init__(self, inner: Any, counts: collections.Counter[Any]):
        self._inner = inner
        self._counts = counts

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        item = await self._inner.receive()
        message = getattr(item, "message", None)
        if type(message).__name__ in ("JSONRPCResponse", "JSONRPCError"):
            self._counts[message.id] += 1
        return item

    def __aiter__(self) -> CountingReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@asynccontextmanager
async def counting(transport: Any, counts: collections.Counter[Any]) -> AsyncIterator[Any]:
    async with transport as (read, write):
        yield CountingReadStream(read, counts), write


def transport_for(kind: str, url: str) -> Any:
    return streamable_http_client(f"{url}/mcp") if kind == "streamable" else sse_client(f"{url}/sse")


async def session_calls(kind: str, url: str, n: int, calls: int) -> tuple[list[str], collections.Counter[Any]]:
    """One SDK session making ``calls`` echo calls in a row; the texts it got and the responses counted."""
    counts: collections.Counter[Any] = collections.Counter()
    got = []
    async with Client(counting(transport_for(kind, url), counts), mode="legacy") as client:
        for i in range(calls):
            result = await client.call_tool("echo", {"text": f"session {n} call {i}"})
            got.append(result.content[0].text)
    return got, counts


@pytest.mark.parametrize("kind", ["streamable", "sse"])
def test_twenty_sessions_fifty_calls_through_nginx(stack: Stack, kind: str):
    """20 concurrent SDK sessions x 50 echo calls through nginx: every reply arrives once, to the
    session and call that asked; requests went to all three instances (so most were routed
    between instances over Redis)."""
    results: dict[int, tuple[list[str], collections.Counter[Any]]] = {}

    async def one(n: int) -> None:
        results[n] = await session_calls(kind, stack.url, n, CALLS)

    async def main() -> None:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for n in range(SESSIONS):
                    tg.start_soon(one, n)

    publishes_before = stack.publishes()
    anyio.run(main)
    for n in range(SESSIONS):
        got, counts = results[n]
        assert got == [f"session {n} call {i}" for i in range(CALLS)]
        assert counts and set(counts.values()) == {1}, f"a response arrived more than once: {counts}"
        assert len(counts) >= CALLS + 1  # initialize, the calls (and the SDK's own tools/list)
    path = r"POST /mcp" if kind == "streamable" else r"POST /messages"
    spread = stack.upstream_counts(path)
    total = sum(spread.values())
    assert total >= SESSIONS * CALLS, spread
    # least_conn over keepalive connections is not round robin: each instance gets a share, not a third.
    assert len(spread) == 3 and min(spread.values()) >= total // 50, f"requests not spread over the instances: {spread}"
    # Most requests reached an instance that does not own their session: they went over Redis.
    assert stack.publishes() - publishes_before >= SESSIONS * CALLS // 2
    for gw in stack.gateways:
        assert gw.proc.poll() is None
        assert "Traceback" not in gw.log(), gw.log()


def test_failover_owner_killed(stack: Stack):
    """Kill the instance that owns a session: its client's next request is a 404 through nginx
    (the SDK surfaces "Session not found"), a new initialize through nginx works, and the
    sessions owned by the other instances go on untouched."""

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            headers = {"accept": ACCEPT_BOTH, "content-type": "application/json", "mcp-protocol-version": "2025-06-18"}
            sids = []
            for _ in range(9):
                r = await client.post(stack.url + "/mcp", json=initialize_request(), headers=headers)
                assert r.status_code == 200, r.text
                sid = r.headers["mcp-session-id"]
                r = await client.post(stack.url + "/mcp", json=notification("notifications/initialized"),
                                      headers={**headers, "mcp-session-id": sid})
                assert r.status_code == 202, r.text
                sids.append(sid)
            owners = {sid: stack.owner_of(sid) for sid in sids}
            victim = owners[sids[0]]
            survivors = [sid for sid in sids if owners[sid] is not victim]
            assert survivors, "every session landed on one instance"
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)

            # The victim's session: 404 on the very next request (issue 4, must-show 3), long
            # before its heartbeat key expires.
            r = await client.post(stack.url + "/mcp", json=tool_call(1, "echo", {"text": "x"}),
                                  headers={**headers, "mcp-session-id": sids[0]})
            assert r.status_code == 404 and r.json()["error"]["code"] == -32001, (r.status_code, r.text)

            # Re-initialize through nginx and go on.
            r = await client.post(stack.url + "/mcp", json=initialize_request(), headers=headers)
            assert r.status_code == 200, r.text
            fresh = r.headers["mcp-session-id"]
            for sid in [fresh, *survivors]:
                for i in range(10):
                    r = await client.post(stack.url + "/mcp", json=tool_call(i, "echo", {"text": f"{sid} {i}"}),
                                          headers={**headers, "mcp-session-id": sid})
                    assert r.status_code == 200, (sid, r.status_code, r.text)
                    assert r.json()["result"]["content"][0]["text"] == f"{sid} {i}"

        # The SDK: the killed owner's session fails its call with "Session not found"; a new Client works.
        async with Client(streamable_http_client(stack.url + "/mcp"), mode="legacy") as c:
            assert (await c.call_tool("echo", {"text": "again"})).content[0].text == "again"

    anyio.run(main)


def test_sdk_sees_session_not_found_after_owner_dies(stack: Stack):
    """With the SDK: a session whose owner is killed gets "Session not found" on its next call
    (at once, not when the owner's heartbeat expires); the application opens a new Client through nginx."""
    from mcp.shared.exceptions import MCPError

    async def main() -> None:
        async with Client(streamable_http_client(stack.url + "/mcp", terminate_on_close=False), mode="legacy") as client:
            await client.call_tool("echo", {"text": "first"})
            [key] = [k for k in stack.redis.command("KEYS", "mcpgw:session:*").split(b"\r\n") if k.startswith(b"mcpgw:")]
            owner = stack.owner_of(key.decode().split(":", 2)[2])
            heartbeat = f"mcpgw:instance:{stack.instance_of(owner)}"
            owner.proc.send_signal(signal.SIGKILL)
            owner.proc.wait(10)
            # Its heartbeat key has not expired yet; the next call is "Session not found" all the same.
            assert stack.redis.command("EXISTS", heartbeat).startswith(b":1")
            with pytest.raises(MCPError, match="Session not found"):
                await client.call_tool("echo", {"text": "second"})
        async with Client(streamable_http_client(stack.url + "/mcp"), mode="legacy") as client:
            assert (await client.call_tool("echo", {"text": "new"})).content[0].text == "new"

    anyio.run(main)


def test_redis_restart_during_traffic(stack: Stack):
    """Redis killed and restarted (empty) while every instance serves its own sessions: no crash,
    no lost reply on a session owned by the instance that received the request; /ready goes
    503 then 200; afterwards sessions are reachable from every instance again."""
    errors: list[str] = []
    answered = collections.Counter()
    ready_seen: dict[int, list[int]] = {gw.port: [] for gw in stack.gateways}
    stop = anyio.Event()

    async def worker(client: httpx.AsyncClient, gw: Gateway, n: int, sids: list[str]) -> None:
        headers = {"accept": ACCEPT_BOTH, "content-type": "application/json", "mcp-protocol-version": "2025-06-18"}
        r = await client.post(gw.url + "/mcp", json=initialize_request(), headers=headers)
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        sids.append(sid)
        headers["mcp-session-id"] = sid
        i = 0
        while not stop.is_set():
            i += 1
            r = await client.post(gw.url + "/mcp", json=tool_call(i, "echo", {"text": f"{n}/{i}"}), headers=headers)
            if r.status_code != 200 or r.json()["result"]["content"][0]["text"] != f"{n}/{i}":
                errors.append(f"{gw.port} {n}/{i}: {r.status_code} {r.text}")
            answered[gw.port] += 1
            await anyio.sleep(0.01)

    async def watch_ready(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            for gw in stack.gateways:
                status = (await client.get(gw.url + "/ready")).status_code
                if not ready_seen[gw.port] or ready_seen[gw.port][-1] != status:
                    ready_seen[gw.port].append(status)
            await anyio.sleep(0.05)

    sids: list[str] = []

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            async with anyio.create_task_group() as tg:
                for gw in stack.gateways:
                    for n in range(3):
                        tg.start_soon(worker, client, gw, n, sids)
                tg.start_soon(watch_ready, client)
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(stack.redis.kill)
                await anyio.sleep(1.5)
                await anyio.to_thread.run_sync(stack.redis.start)
                with anyio.fail_after(30):
                    while not all(seen[-1] == 200 and 503 in seen for seen in ready_seen.values()):
                        await anyio.sleep(0.05)
                await anyio.sleep(0.5)
                stop.set()
            # After: every session is reachable through nginx (any instance) again.
            headers = {"accept": ACCEPT_BOTH, "content-type": "application/json", "mcp-protocol-version": "2025-06-18"}
            for sid in sids:
                for i in range(3):
                    r = await client.post(stack.url + "/mcp", json=tool_call(1000 + i, "echo", {"text": "after"}),
                                          headers={**headers, "mcp-session-id": sid})
                    assert r.status_code == 200, (sid, r.status_code, r.text)

    anyio.run(main)
    assert not errors, errors[:10]
    assert all(answered[gw.port] > 20 for gw in stack.gateways), answered
    for port, seen in ready_seen.items():
        assert seen[0] == 200 and 503 in seen and seen[-1] == 200, (port, seen)
    for gw in stack.gateways:
        assert gw.proc.poll() is None, gw.log()
        assert "Traceback" not in gw.log(), gw.log()
