"""Sessions do not see each other's traffic, and nothing in a session (a slow call, a big
reply, a client that stops reading) holds up its other calls.

Every session has its own child; the gateway routes each child's output to
its own client only. The SDK dispatches by id, so it would hide a message
delivered to the wrong stream as long as ids do not collide; the raw-HTTP
tests look at each stream's bytes instead.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time

import anyio
import httpx
import pytest
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.mcp_raw import TIMEOUT, LegacySession, StreamableSession, request, result_text, tool_call

pytestmark = pytest.mark.integration

SESSIONS = 20
CALLS = 5
KINDS = ["streamable", "sse"]


@pytest.fixture(scope="module")
def gw():
    gateway = Gateway({"mcpServers": {"fixture": fixture_server(default=True)}})
    yield gateway
    gateway.stop()


@pytest.fixture
def idle_gw(gw):
    """The shared gateway; each test must leave no child behind."""
    wait_until(lambda: not gw.child_pids(), timeout=5)  # an earlier failure's leak is reported there, not here
    yield gw
    assert wait_until(lambda: not gw.child_pids(), timeout=5), f"children left over: {gw.child_pids()}"


def sdk_transport(gw: Gateway, kind: str):
    return streamable_http_client(f"{gw.url}/mcp") if kind == "streamable" else sse_client(f"{gw.url}/sse")


def health_sessions(gw: Gateway) -> int:
    return httpx.get(f"{gw.url}/health", timeout=5).json()["sessions"]


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_sdk_sessions_get_only_their_own_replies(idle_gw, kind):
    """20 SDK clients at once, each firing concurrent echo calls with texts no one else uses."""
    gw = idle_gw
    tag = secrets.token_hex(4)
    results: dict[int, dict[str, str]] = {}
    problems: list[object] = []
    connected = 0
    all_connected = anyio.Event()
    sessions_seen: list[int] = []

    async def one_session(i: int) -> None:
        nonlocal connected

        async def on_message(message) -> None:
            if isinstance(message, Exception):
                problems.append((i, message))

        async with Client(sdk_transport(gw, kind), mode="legacy", message_handler=on_message) as client:
            connected += 1
            if connected == SESSIONS:
                # Every session is open at the same time: the gateway holds all of them.
                sessions_seen.append(await anyio.to_thread.run_sync(health_sessions, gw))
                all_connected.set()
            await all_connected.wait()
            mine: dict[str, str] = {}

            async def call(text: str) -> None:
                result = await client.call_tool("echo", {"text": text})
                assert not result.is_error, result
                mine[text] = result.content[0].text

            async with anyio.create_task_group() as tg:
                for j in range(CALLS):
                    tg.start_soon(call, f"{kind}-{tag}-session{i}-call{j}")
            results[i] = mine

    async def main() -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(SESSIONS):
                    tg.start_soon(one_session, i)

    anyio.run(main)
    assert problems == []
    assert sessions_seen and sessions_seen[0] >= SESSIONS
    assert sorted(results) == list(range(SESSIONS))
    for i, mine in results.items():
        assert len(mine) == CALLS
        for sent, got in mine.items():
            assert got == sent, f"session {i} sent {sent!r} and got {got!r}"


MARK = re.compile(r"iso-[0-9a-f]{8}-(\d+)-")
RAW_SESSIONS = 5


def owners(messages: list[dict]) -> set[int]:
    """The session numbers whose markers appear in ``messages``."""
    return {int(n) for n in MARK.findall(json.dumps(messages))}


async def raw_barrier_sessions(body) -> None:
    """Run ``body(i, barrier)`` for RAW_SESSIONS sessions at once; ``barrier()`` waits for all of them."""
    arrived = 0
    everyone = anyio.Event()

    async def barrier() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == RAW_SESSIONS:
            everyone.set()
        await everyone.wait()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(RAW_SESSIONS):
                tg.start_soon(body, i, barrier)


def test_raw_streamable_streams_carry_only_their_own_session(idle_gw):
    """Each session's POST replies and GET stream hold its own messages and nothing of the others'."""
    gw = idle_gw
    tag = secrets.token_hex(4)
    seen: dict[int, dict[str, list[dict]]] = {}

    async def body(i: int, barrier) -> None:
        marker = f"iso-{tag}-{i}-"
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            # 2025-11-25: the GET stream is primed at once (see test_get_stream_headers_arrive_at_once).
            session = StreamableSession(client, f"{gw.url}/mcp", version="2025-11-25")
            with anyio.CancelScope(shield=True):  # so that the finally clause knows the session to end
                await session.initialize()
            try:
                async with session.get_stream() as get:
                    posts: list[dict] = []
                    for j in range(3):
                        echo = await session.post(tool_call(j + 1, "echo", {"text": f"{marker}echo{j}"}))
                        assert [result_text(m) for m in echo if "result" in m] == [f"{marker}echo{j}"]
                        posts += echo
                        notify = await session.post(tool_call(10 + j, "notify", {"message": f"{marker}notify{j}"}))
                        logs = [m["params"]["data"] for m in notify if m.get("method") == "notifications/message"]
                        assert logs == [f"{marker}notify{j}"], notify
                        posts += notify
                    await barrier()  # every session has done all its calls
                    r = await session.delete()
                    assert r.status_code == 200
                    # DELETE ends the session, which ends its GET stream: read all of it.
                    seen[i] = {"post": posts, "get": await get.messages_until_end()}
            finally:
                with anyio.CancelScope(shield=True):  # a failing sibling cancels this task
                    await session.delete()  # 404 when already gone; ends the child if the test failed

    anyio.run(raw_barrier_sessions, body)
    assert sorted(seen) == list(range(RAW_SESSIONS))
    for i, streams in seen.items():
        assert owners(streams["post"]) == {i}, streams["post"]
        assert owners(streams["get"]) <= {i}, streams["get"]


def test_raw_legacy_streams_carry_only_their_own_session(idle_gw):
    """Each legacy SSE stream holds its own session's replies and notifications, nothing else."""
    gw = idle_gw
    tag = secrets.token_hex(4)
    seen: dict[int, list[dict]] = {}

    async def body(i: int, barrier) -> None:
        marker = f"iso-{tag}-{i}-"
        async with httpx.AsyncClient(timeout=TIMEOUT) as client, LegacySession(client, gw.url) as session:
            await session.initialize()
            messages: list[dict] = []
            for j in range(3):
                echo = await session.call(tool_call(j + 1, "echo", {"text": f"{marker}echo{j}"}))
                assert result_text(echo[-1]) == f"{marker}echo{j}"
                messages += echo
                notify = await session.call(tool_call(10 + j, "notify", {"message": f"{marker}notify{j}"}))
                assert {"method": "notifications/tools/list_changed", "jsonrpc": "2.0"} in notify
                messages += notify
            await barrier()
            # Everything any other session caused has been written by now; anything
            # misrouted to this stream would come before this ping's answer.
            messages += await session.call(request("last", "ping"))
            seen[i] = messages

    anyio.run(raw_barrier_sessions, body)
    assert sorted(seen) == list(range(RAW_SESSIONS))
    for i, messages in seen.items():
        assert owners(messages) == {i}, messages
        logs = [m["params"]["data"] for m in messages if m.get("method") == "notifications/message"]
        assert logs == [f"iso-{tag}-{i}-notify{j}" for j in range(3)]


def test_get_stream_headers_arrive_at_once(idle_gw):
    """A 2025-06-18 session's GET stream answers 200 + text/event-stream at once, not at the first ping."""
    gw = idle_gw

    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=2.0)) as client:
            session = StreamableSession(client, f"{gw.url}/mcp", version="2025-06-18")
            await session.initialize()
            try:
                async with session.get_stream() as get:
                    assert get.response.headers["content-type"].startswith("text/event-stream")
            finally:
                await session.delete()

    anyio.run(main)


def test_big_sse_reply_does_not_stall_the_session(idle_gw):
    """A 200 kB result delivered on a POST's SSE stream; the next call in the session is still answered."""
    gw = idle_gw

    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=2.0)) as client:
            # 2025-03-26 allows batches, and a batch's replies always come as an SSE stream.
            session = StreamableSession(client, f"{gw.url}/mcp", version="2025-03-26")
            await session.initialize()
            try:
                big = await session.post([tool_call(1, "big", {"size": 200_000})])
                assert len(result_text(big[-1])) == 200_000
                echo = await session.post(tool_call(2, "echo", {"text": "next"}))
                assert result_text(echo[-1]) == "next"
            finally:
                await session.delete()

    anyio.run(main)


def test_client_leaving_a_paused_stream_does_not_stall_the_session(idle_gw):
    """A client that stops reading an 8 MB SSE reply (the gateway pauses the child's output for it)
    and then hangs up: the session's next call is still answered."""
    gw = idle_gw

    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=2.0)) as client:
            session = StreamableSession(client, f"{gw.url}/mcp", version="2025-03-26")
            await session.initialize()
            try:
                body = json.dumps([tool_call(1, "big", {"size": 8_000_000})]).encode()
                head = "".join(f"{k}: {v}\r\n" for k, v in session.headers.items())
                with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.sendall(f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n{head}"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    # The first bytes arrive after the gateway has buffered the whole reply and paused.
                    assert sock.recv(64).startswith(b"HTTP/1.1 200")
                echo = await session.post(tool_call(2, "echo", {"text": "next"}))
                assert result_text(echo[-1]) == "next"
            finally:
                await session.delete()

    anyio.run(main)


@pytest.mark.parametrize("kind", KINDS)
def test_slow_call_does_not_block_fast_call(idle_gw, kind):
    """sleep(2) is running in the child; echo sent after it, in the same session, comes back first."""
    gw = idle_gw
    finished: list[str] = []
    fast_took: list[float] = []

    async def main() -> None:
        slow_running = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            slow_running.set()  # the child has started sleeping

        async with Client(sdk_transport(gw, kind), mode="legacy") as client:

            async def slow() -> None:
                result = await client.call_tool("sleep", {"seconds": 2}, progress_callback=on_progress)
                assert result.content[0].text == "slept 2"
                finished.append("slow")

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slow)
                    await slow_running.wait()
                    start = time.monotonic()
                    result = await client.call_tool("echo", {"text": "fast"})
                    fast_took.append(time.monotonic() - start)
                    assert result.content[0].text == "fast"
                    finished.append("fast")

    anyio.run(main)
    assert finished == ["fast", "slow"]
    assert fast_took[0] < 1.0
