"""Children's lives: a crash mid-request, a client going away, DELETE, the gateway's SIGTERM, stderr.

Process state is polled from outside (``wait_until`` over /proc); nothing here
sleeps to wait for the gateway.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import httpx
import pytest
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.gateway_process import Gateway, fixture_server, pid_alive, wait_until
from tests.mcp_raw import (
    TIMEOUT,
    LegacySession,
    SseStream,
    StreamableSession,
    descendants,
    kill_leftovers,
    request,
    result_text,
    tool_call,
)

pytestmark = pytest.mark.integration

STUBBORN = Path(__file__).resolve().parent / "fixtures" / "stubborn_server.py"
KINDS = ["streamable", "sse"]
#: JSON-RPC code the gateway uses for "the MCP server went away".
CONNECTION_CLOSED = -32000


def stubborn_server() -> dict:
    """The stubborn server under ``sh -c`` (not exec'd: sh stays as the parent, a process tree)."""
    script = f"{shlex.quote(sys.executable)} {shlex.quote(str(STUBBORN))}; echo 'stubborn wrapper done' >&2"
    return {"command": "sh", "args": ["-c", script]}


def forking_server() -> dict:
    """The fixture, exec'd by an ``sh`` that first leaves a background process holding its stdout and stderr."""
    fixture = fixture_server()
    script = "sleep 300 & exec " + " ".join(shlex.quote(a) for a in [fixture["command"], *fixture["args"]])
    return {"command": "sh", "args": ["-c", script]}


CONFIG = {"mcpServers": {
    "fixture": fixture_server(default=True),
    "stubborn": stubborn_server(),
    "forking": forking_server(),
}}


@pytest.fixture(scope="module")
def gw():
    gateway = Gateway(CONFIG)
    yield gateway
    gateway.stop()


def sdk_transport(gw: Gateway, kind: str):
    return streamable_http_client(f"{gw.url}/mcp") if kind == "streamable" else sse_client(f"{gw.url}/sse")


def new_child(gw: Gateway, before: set[int]) -> int:
    """The one child the gateway started since ``before`` was taken."""
    new = lambda: set(gw.child_pids()) - before  # noqa: E731
    assert wait_until(lambda: bool(new()), timeout=5), "no new child"
    found = new()
    assert len(found) == 1, found
    return found.pop()


def health(gw: Gateway) -> dict:
    r = httpx.get(f"{gw.url}/health", timeout=5)
    assert r.status_code == 200
    return r.json()


# -- a child that crashes mid-request --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_child_crash_fails_the_request_and_gateway_stays_healthy(gw, kind):
    """SDK view: the call gets a JSON-RPC error within 1 s; /health is fine; a new session works."""
    took: list[float] = []

    async def main() -> None:
        async with Client(sdk_transport(gw, kind), mode="legacy") as client:
            start = time.monotonic()
            with anyio.fail_after(5), pytest.raises(MCPError) as caught:
                await client.call_tool("crash", {})
            took.append(time.monotonic() - start)
            assert caught.value.code == CONNECTION_CLOSED
            assert "exited with status 3" in caught.value.message
        assert health(gw)["status"] == "healthy"
        async with Client(sdk_transport(gw, kind), mode="legacy") as client:
            result = await client.call_tool("echo", {"text": "still here"})
            assert result.content[0].text == "still here"

    anyio.run(main)
    assert took[0] < 1.0


def test_crashed_streamable_session_answers_404(gw):
    """Raw view: a pending call and the crashing call both get errors; then the session id is unknown."""
    before = set(gw.child_pids())

    async def main() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            session = StreamableSession(client, f"{gw.url}/mcp")
            await session.initialize()
            pid = new_child(gw, before)
            # A long call, in flight in the child (its first progress event proves it).
            async with client.stream("POST", session.url, headers=session.headers,
                                     json=tool_call(1, "sleep", {"seconds": 30}, progress_token="slow")) as slow:
                assert slow.headers["content-type"].startswith("text/event-stream")
                stream = SseStream(slow)
                first = await stream.next_message()
                assert first["method"] == "notifications/progress"
                start = time.monotonic()
                crash = await session.post(tool_call(2, "crash"))
                assert time.monotonic() - start < 1.0
                assert [m.get("error", {}).get("code") for m in crash] == [CONNECTION_CLOSED], crash
                assert "exited with status 3" in crash[0]["error"]["message"]
                rest = await stream.messages_until_end()
                assert [(m["id"], m["error"]["code"]) for m in rest] == [(1, CONNECTION_CLOSED)], rest
            assert wait_until(lambda: not pid_alive(pid), timeout=2)
            r = await session.post_raw(request(3, "ping"))
            assert r.status_code == 404, r.text
            assert (await session.delete()).status_code == 404
            r = await client.get(session.url, headers={**session.headers, "accept": "text/event-stream"})
            assert r.status_code == 404
            assert health(gw)["status"] == "healthy"

    anyio.run(main)


def test_crashed_legacy_session_stream_ends(gw):
    """Raw view: the SSE stream carries the errors for every pending request, then ends."""
    before = set(gw.child_pids())

    async def main() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client, LegacySession(client, gw.url) as session:
            await session.initialize()
            pid = new_child(gw, before)
            await session.send(tool_call(1, "sleep", {"seconds": 30}, progress_token="slow"))
            first = await session.stream.next_message()
            assert first["method"] == "notifications/progress"
            start = time.monotonic()
            await session.send(tool_call(2, "crash"))
            rest = await session.stream.messages_until_end()  # returns only when the stream ends
            assert time.monotonic() - start < 1.0
            assert sorted((m["id"], m["error"]["code"]) for m in rest) == [(1, CONNECTION_CLOSED), (2, CONNECTION_CLOSED)]
            assert wait_until(lambda: not pid_alive(pid), timeout=2)
            r = await client.post(session.post_url, json=request(3, "ping"))
            assert r.status_code == 404
            assert health(gw)["status"] == "healthy"

    anyio.run(main)


def test_crash_with_a_background_grandchild_still_fails_the_request(gw):
    """The crashed server leaves a process of its group holding its stdout and stderr: the call
    still gets its error within 1 s, the session ends and the leftover process is stopped."""
    before = set(gw.child_pids())

    async def main() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            session = StreamableSession(client, f"{gw.url}/servers/forking/mcp")
            await session.initialize()
            pid = new_child(gw, before)
            leftovers = descendants(pid)
            assert len(leftovers) == 1, leftovers  # the background sleep
            try:
                start = time.monotonic()
                with anyio.fail_after(5):
                    crash = await session.post(tool_call(1, "crash"))
                assert time.monotonic() - start < 1.0
                assert [m["error"]["code"] for m in crash] == [CONNECTION_CLOSED], crash
                assert wait_until(lambda: not any(pid_alive(p) for p in leftovers), timeout=2), leftovers
                assert (await session.post_raw(request(2, "ping"))).status_code == 404
            finally:
                kill_leftovers({p for p in leftovers if pid_alive(p)})

    anyio.run(main)


# -- a client that goes away, or ends the session ---------------------------------


@pytest.mark.parametrize("server", ["fixture", "stubborn"])
def test_closing_legacy_stream_stops_child(gw, server):
    """The SSE stream is the session: dropping it stops the child (and its tree) within 2 s."""
    before = set(gw.child_pids())

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client, \
                LegacySession(client, gw.url, f"/servers/{server}/sse") as session:
            await session.initialize()
            pid = new_child(gw, before)
            tree = [pid, *descendants(pid)]
            await session.close()
            start = time.monotonic()
            assert wait_until(lambda: not any(pid_alive(p) for p in tree), timeout=2), tree
            assert time.monotonic() - start < 2.0
            r = await client.post(session.post_url, json=request(1, "ping"))
            assert r.status_code == 404
            return tree

    tree = anyio.run(main)
    if server == "stubborn":
        assert len(tree) == 2  # sh and the python server below it


@pytest.mark.parametrize("server", ["fixture", "stubborn"])
def test_delete_stops_streamable_child(gw, server):
    """DELETE /mcp ends the session and stops its child within 2 s, even one that ignores EOF and SIGTERM."""
    before = set(gw.child_pids())

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            session = StreamableSession(client, f"{gw.url}/servers/{server}/mcp")
            await session.initialize()
            pid = new_child(gw, before)
            tree = [pid, *descendants(pid)]
            r = await session.delete()
            assert r.status_code == 200
            start = time.monotonic()
            assert wait_until(lambda: not any(pid_alive(p) for p in tree), timeout=2), tree
            assert time.monotonic() - start < 2.0
            assert (await session.post_raw(request(1, "ping"))).status_code == 404
            return tree

    tree = anyio.run(main)
    if server == "stubborn":
        assert len(tree) == 2


def test_sdk_client_exit_stops_streamable_child(gw):
    """The SDK's Streamable client sends DELETE when it exits: its child is gone within 2 s."""
    before = set(gw.child_pids())
    pids: list[int] = []

    async def main() -> None:
        async with Client(streamable_http_client(f"{gw.url}/mcp"), mode="legacy") as client:
            await client.list_tools()
            pids.append(new_child(gw, before))

    anyio.run(main)
    assert wait_until(lambda: not pid_alive(pids[0]), timeout=2)


# -- stderr -------------------------------------------------------------------------


def test_child_stderr_is_logged_with_server_name_and_pid(gw):
    text = f"stderr-line-{secrets.token_hex(6)}"
    before = set(gw.child_pids())

    async def main() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            session = StreamableSession(client, f"{gw.url}/mcp")
            await session.initialize()
            pid = new_child(gw, before)
            reply = await session.post(tool_call(1, "stderr", {"text": text}))
            assert result_text(reply[-1]) == "wrote to stderr"
            await session.delete()

            stubborn = StreamableSession(client, f"{gw.url}/servers/stubborn/mcp")
            await stubborn.initialize()
            tree = descendants(gw.proc.pid)
            reply = await stubborn.post(tool_call(1, "pid"))
            ids = json.loads(result_text(reply[-1]))
            assert ids["ppid"] in tree and ids["pid"] in tree
            await stubborn.delete()
            return pid, ids["ppid"]

    pid, sh_pid = anyio.run(main)
    assert wait_until(lambda: f"[fixture pid={pid}] {text}" in gw.log(), timeout=5), gw.log()[-3000:]
    # The tag's pid is the child's own: the fixture reports it in its first stderr line.
    assert f"[fixture pid={pid}] [conformance-fixture] started (pid {pid})" in gw.log()
    # A second server is tagged with its own name, and with the pid the gateway spawned (sh).
    assert wait_until(lambda: re.search(rf"\[stubborn pid={sh_pid}\] \[stubborn\] started \(pid \d+\)", gw.log()),
                      timeout=5), gw.log()[-3000:]


# -- SIGTERM to the gateway ---------------------------------------------------------


def test_sigterm_stops_gateway_and_every_child(make_gateway):
    """SIGTERM with sessions open on both transports, one call in flight, and children that
    ignore EOF and SIGTERM under an ``sh -c`` parent: twistd exits within 10 s and no process
    it started is left."""
    gw = make_gateway(CONFIG)
    tree: set[int] = set()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=TIMEOUT))
            sessions = []
            for server in ("fixture", "stubborn"):
                streamable = StreamableSession(client, f"{gw.url}/servers/{server}/mcp")
                await streamable.initialize()
                legacy = await stack.enter_async_context(LegacySession(client, gw.url, f"/servers/{server}/sse"))
                await legacy.initialize()
                sessions.append((streamable, legacy))
            stubborn_ids = json.loads(result_text((await sessions[1][0].post(tool_call(1, "pid")))[-1]))
            # A call in flight on the fixture's legacy session.
            fixture_legacy = sessions[0][1]
            await fixture_legacy.send(tool_call(7, "sleep", {"seconds": 30}, progress_token="slow"))
            assert (await fixture_legacy.stream.next_message())["method"] == "notifications/progress"

            tree.update(descendants(gw.proc.pid))
            children = set(gw.child_pids())
            assert len(children) == 4, children
            assert stubborn_ids["ppid"] in children  # sh, spawned by the gateway...
            assert stubborn_ids["pid"] in tree - children  # ...and the stubborn server, its child
            assert len(tree) == 6, tree  # 4 children + 2 grandchildren

            start = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            try:
                gw.proc.wait(10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"twistd still running 10 s after SIGTERM:\n{gw.log()[-3000:]}") from None
            took = time.monotonic() - start
            assert took < 10.0

            # The in-flight call was answered with an error, and the legacy streams ended.
            rest = await fixture_legacy.stream.messages_until_end()
            assert [(m["id"], m["error"]["code"]) for m in rest] == [(7, CONNECTION_CLOSED)], rest
            assert await sessions[1][1].stream.messages_until_end() == []

    try:
        anyio.run(main)
        alive = lambda: [p for p in tree if pid_alive(p)]  # noqa: E731
        assert wait_until(lambda: not alive(), timeout=2), f"left behind: {alive()}"
        # twistd ends a clean shutdown by re-raising the signal that asked for it.
        assert gw.proc.returncode in (0, -signal.SIGTERM), gw.log()[-3000:]
        assert wait_until(lambda: "Server Shut Down." in gw.log(), timeout=2), gw.log()[-3000:]
    finally:
        kill_leftovers({p for p in tree if pid_alive(p)})
