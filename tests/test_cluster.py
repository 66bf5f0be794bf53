"""Issue 4, steps 2, 3 and 5: several real gateway processes sharing one private redis-server.

Each test starts its gateways (tests/gateway_process.py) with the same config:
the Redis URL, a shared ``session.secret`` and a short heartbeat. A session is
created on one instance (its owner) and used through the others with raw HTTP
(tests/mcp_raw.py), so every test sees which instance answered what.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import anyio
import httpx
import pytest

from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.mcp_raw import (
    ACCEPT_BOTH,
    TIMEOUT,
    LegacySession,
    SseStream,
    StreamableSession,
    initialize_request,
    notification,
    request,
    result_text,
    tool_call,
)
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)"),
]

SECRET = "cluster-test-secret-0123456789abcdef"
HEARTBEAT = 0.3


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer(password="cluster pw")
    yield server
    server.close()


@pytest.fixture
def redis(redis_server):
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server
    if not redis_server.running:
        redis_server.start()


def cluster_config(redis: RedisServer, **extra: Any) -> dict[str, Any]:
    return {
        "mcpServers": {"fx": fixture_server()},
        "session": {"secret": SECRET},
        "redis": {"url": redis.url_for(0), "heartbeat": HEARTBEAT, "timeout": 1.0},
        "logLevel": "debug",
        **extra,
    }


@pytest.fixture
def cluster(make_gateway, redis):
    """``cluster(n)``: n gateways on one Redis (the password from REDIS_PASSWORD, as in the compose stack)."""

    def start(n: int = 2, **extra: Any) -> list[Gateway]:
        gws = [make_gateway(cluster_config(redis, **extra), env={"REDIS_PASSWORD": redis.password}) for _ in range(n)]
        for gw in gws:
            assert wait_until(ready(gw), 15), gw.log()
        return gws

    return start


def ready(gw: Gateway, status: int = 200) -> Any:
    """A predicate for wait_until: ``/ready`` answers ``status``."""
    return lambda: httpx.get(gw.url + "/ready").status_code == status


def mcp(gw: Gateway) -> str:
    return gw.url + "/mcp"


def run(fn: Any, *args: Any) -> Any:
    async def main() -> Any:
        with anyio.fail_after(60):
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                return await fn(client, *args)

    return anyio.run(main)


def echo_call(id: Any, text: str) -> dict[str, Any]:
    return tool_call(id, "echo", {"text": text})


# -- Streamable HTTP across instances ---------------------------------------------------


def test_post_to_another_instance(cluster):
    """A session initialized on A takes requests, notifications and batches through B: every
    reply comes back to the POST that asked, on B."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        for i in range(1, 6):
            [reply] = await s.post(echo_call(i, f"via B {i}"))
            assert reply["id"] == i and result_text(reply) == f"via B {i}"
        assert await s.post(notification("notifications/progress", {"progressToken": "x", "progress": 1})) == []
        r = await s.post_raw(request(9, "ping"))
        assert r.status_code == 200 and r.json() == {"jsonrpc": "2.0", "id": 9, "result": {}}

    run(main)
    assert "session" in a.log()


def test_progress_and_long_call_stream_across_instances(cluster):
    """A call with a progress token made through B becomes an SSE stream on B: progress, then
    the result, on that POST."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        messages = await s.post(tool_call(7, "sleep", {"seconds": 0.2}, progress_token="tok"))
        assert [m.get("method") for m in messages] == ["notifications/progress", "notifications/progress", None]
        assert messages[-1]["id"] == 7 and result_text(messages[-1]) == "slept 0.2"

    run(main)


def test_delete_through_another_instance(cluster):
    """DELETE through B ends the session on A: the child stops, and both answer 404 after."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        assert (await s.post(echo_call(1, "x")))[0]["id"] == 1
        r = await s.delete()
        assert r.status_code == 200, r.text
        for gw in (a, b):
            s.url = mcp(gw)
            for _ in range(50):
                r = await s.post_raw(echo_call(2, "after"))
                if r.status_code == 404:
                    break
                await anyio.sleep(0.05)
            assert r.status_code == 404, (gw.url, r.status_code, r.text)

    run(main)
    assert wait_until(lambda: "client ended the session (DELETE)" in a.log(), 5), a.log()


def test_unknown_and_forged_sessions(cluster):
    """A well-formed but unknown session id is 404 on every instance (after a Redis lookup); a
    forged one is 404 without one."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(b))
        await s.initialize()
        await s.delete()
        for sid in (s.session_id, "x" * 22 + "." + "y" * 22):
            s.session_id = sid
            for gw in (a, b):
                s.url = mcp(gw)
                r = await s.post_raw(echo_call(1, "x"))
                assert r.status_code == 404, r.text

    run(main)


# -- HTTP+SSE across instances ---------------------------------------------------------


def test_legacy_messages_to_another_instance(cluster):
    """GET /sse on A, POST /messages through B: 202 from B, the replies on A's stream."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        async with LegacySession(client, a.url) as s:
            s.post_url = s.post_url.replace(a.url, b.url)
            await s.initialize()
            for i in range(1, 6):
                [reply] = await s.call(echo_call(i, f"legacy via B {i}"))
                assert result_text(reply) == f"legacy via B {i}"
            [reply] = await s.call(request(50, "server/discover"))
            assert reply["error"]["code"] == -32601

    run(main)


# -- GET streams and resumption across instances ---------------------------------------


def test_get_stream_on_another_instance(cluster):
    """The GET stream opened on B carries the server's session notifications from A; a second
    GET (on A) is 409 while it is open."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        async with s.get_stream() as stream:
            s.url = mcp(a)
            headers = {k: v for k, v in s.headers.items() if k != "content-type"}
            r = await client.get(mcp(a), headers={**headers, "accept": "text/event-stream"})
            assert r.status_code == 409, r.text
            replies = await s.post(tool_call(3, "notify", {"message": "hi"}))
            assert [m.get("method") for m in replies] == ["notifications/message", None]  # the log: on the POST
            assert result_text(replies[-1]) == "notified"
            with anyio.fail_after(10):
                msg = await stream.next_message()
            assert msg == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}

    run(main)


def test_resume_on_another_instance(cluster):
    """A call through B becomes a stream; the client drops it mid-call and resumes with
    Last-Event-ID on C: the reply arrives exactly once, after the events it missed."""
    a, b, c = cluster(3)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a), version="2025-11-25")
        await s.initialize()
        s.url = mcp(b)
        call = tool_call(5, "sleep", {"seconds": 1.0}, progress_token="p")
        last_id = None
        async with client.stream("POST", s.url, json=call, headers=s.headers) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            stream = SseStream(r)
            while True:
                event = await stream.next()
                assert event is not None
                last_id = event.get("id", last_id)
                if event.get("data") and json.loads(event["data"]).get("method") == "notifications/progress":
                    break
        # dropped mid-call; resume elsewhere
        assert last_id is not None and "_" in last_id
        headers = {k: v for k, v in s.headers.items() if k != "content-type"}
        headers.update({"accept": "text/event-stream", "last-event-id": last_id})
        async with client.stream("GET", mcp(c), headers=headers) as r:
            assert r.status_code == 200, (await r.aread())
            messages = await SseStream(r).messages_until_end()
        finals = [m for m in messages if m.get("id") == 5]
        assert len(finals) == 1 and result_text(finals[0]) == "slept 1.0", messages
        assert messages[-1]["id"] == 5

    run(main)


def test_get_stream_resumed_on_third_instance(cluster):
    """The GET stream held on B is dropped with two events unread; resumed with Last-Event-ID on
    C, they arrive (from the Redis log) exactly once, and later ones follow live from B."""
    a, b, c = cluster(3)

    async def notify(s: StreamableSession, text: str) -> None:
        replies = await s.post(tool_call(text, "notify", {"message": text}))
        assert result_text(replies[-1]) == "notified"

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        async with s.get_stream() as stream:
            s.url = mcp(a)
            await notify(s, "one")
            with anyio.fail_after(10):
                event = await stream.next()
            assert event is not None and json.loads(event["data"])["method"] == "notifications/tools/list_changed"
            last_id = event["id"]
            await notify(s, "two")  # on the GET stream, but the client does not read them
            await notify(s, "three")
        # B's stream is gone.
        headers = {k: v for k, v in s.headers.items() if k != "content-type"}
        headers.update({"accept": "text/event-stream", "last-event-id": last_id})
        async with client.stream("GET", mcp(c), headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            resumed = SseStream(r)
            got = []
            with anyio.fail_after(10):
                while len(got) < 2:
                    event = await resumed.next()
                    assert event is not None
                    if event.get("data"):
                        got.append(event)
            await notify(s, "four")
            with anyio.fail_after(10):
                while len(got) < 3:
                    event = await resumed.next()
                    assert event is not None
                    if event.get("data"):
                        got.append(event)
        assert [json.loads(e["data"])["method"] for e in got] == ["notifications/tools/list_changed"] * 3
        ids = [e["id"] for e in got]
        assert len(set(ids)) == 3 and last_id not in ids, ids

    run(main)


def test_get_stream_ends_when_owner_dies(cluster):
    """A GET stream held on B for a session owned by A ends when A is killed (B notices A's
    heartbeat is gone); the session is then 404 on B."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        async with s.get_stream() as stream:
            a.proc.send_signal(signal.SIGKILL)
            with anyio.fail_after(10):
                assert await stream.next() is None  # the stream ends
        r = await s.post_raw(echo_call(1, "x"))
        assert r.status_code == 404, r.text

    run(main)


# -- an owner that goes away --------------------------------------------------------------


def test_owner_killed_gives_404_and_record_cleaned(cluster, redis):
    """SIGKILL the owner: the very next request through B is 404 (its heartbeat key is still
    there, but it holds no connection to Redis any more); the record is deleted; a new initialize
    through B works."""
    a, b = cluster(2)
    sid: list[str] = []

    async def setup(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        assert (await s.post(echo_call(1, "x")))[0]["id"] == 1
        sid.append(s.session_id)

    run(setup)
    instance = json.loads(httpx.get(a.url + "/health").text)["instance"]
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    assert redis.command("EXISTS", f"mcpgw:instance:{instance}").startswith(b":1")  # not expired yet

    async def after(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(b))
        s.session_id = sid[0]
        r = await s.post_raw(echo_call(2, "y"))
        assert r.status_code == 404 and r.json()["error"]["code"] == -32001, r.text
        s.session_id = ""
        await s.initialize()
        assert (await s.post(echo_call(3, "new")))[0]["id"] == 3

    run(after)
    assert b"0" in redis.command("EXISTS", f"mcpgw:session:{sid[0]}")


def test_owner_without_pubsub_is_not_taken_for_dead(cluster, redis):
    """Only the owner's pub/sub connection is lost (CLIENT KILL): it still holds its command
    connection, so a request through B meanwhile is 503 + Retry-After or served, never 404."""
    a, b = cluster(2)

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        s.url = mcp(b)
        instance = json.loads((await client.get(a.url + "/health")).text)["instance"]
        listing = redis.command("CLIENT", "LIST").decode()
        [pubsub] = [line.split(" ")[0].split("=")[1] for line in listing.splitlines()
                    if f"name=mcpgw:instance:{instance} " in line and "sub=1" in line]
        redis.command("CLIENT", "KILL", "ID", pubsub)
        for i in range(20):
            r = await s.post_raw(echo_call(i, "y"))
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["retry-after"], r.headers
        with anyio.fail_after(10):
            while (await s.post_raw(echo_call(99, "z"))).status_code != 200:
                await anyio.sleep(0.05)

    run(main)


def test_owner_stopped_cleanly_gives_404_at_once(cluster, redis):
    """SIGTERM the owner: it deletes its records and heartbeat on the way out, so through B the
    session is 404 at once (no 503 while a heartbeat runs out)."""
    a, b = cluster(2)
    sid: list[str] = []

    async def setup(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        sid.append(s.session_id)

    run(setup)
    instance = json.loads(httpx.get(a.url + "/health").text)["instance"]
    a.stop()  # SIGTERM, waits for the exit
    assert redis.command("EXISTS", f"mcpgw:session:{sid[0]}", f"mcpgw:instance:{instance}").startswith(b":0")

    async def after(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(b))
        s.session_id = sid[0]
        r = await s.post_raw(echo_call(2, "y"))
        assert r.status_code == 404, r.text

    run(after)


# -- Redis faults ------------------------------------------------------------------------


def test_redis_down_at_startup(make_gateway, redis):
    """Redis down at start: /ready 503 naming Redis, /health 200, new sessions 503; once Redis
    is up the gateway gets ready and serves."""
    redis.stop()
    gw = make_gateway(cluster_config(redis), env={"REDIS_PASSWORD": redis.password})
    assert wait_until(lambda: "connection refused" in httpx.get(gw.url + "/ready").text, 10)
    r = httpx.get(gw.url + "/ready")
    # The address is in the log only (issue 15: no internal address in what clients see).
    assert r.status_code == 503 and r.json()["problems"] == ["redis: connection refused"], r.text
    assert httpx.get(gw.url + "/health").status_code == 200
    r = httpx.post(mcp(gw), json=initialize_request(), headers={"accept": ACCEPT_BOTH})
    assert r.status_code == 503 and "Redis" in r.text and r.headers.get("retry-after"), r.text
    redis.start()
    assert wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 200, 20), httpx.get(gw.url + "/ready").text

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(gw))
        await s.initialize()

    run(main)


def test_redis_lost_while_running(cluster, redis):
    """Redis stops: A's own session keeps working on A; through B it is a clear 503; /ready is
    503 on both. Redis comes back (empty): both ready again, and B reaches A's session again
    (A wrote its records back)."""
    a, b = cluster(2)
    sid: list[str] = []

    async def before(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()
        sid.append(s.session_id)
        s.url = mcp(b)
        assert (await s.post(echo_call(1, "x")))[0]["id"] == 1

    run(before)
    redis.kill()
    for gw in (a, b):
        assert wait_until(ready(gw, 503), 10)

    async def during(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        s.session_id = sid[0]
        for i in range(5):
            [reply] = await s.post(echo_call(10 + i, "local"))
            assert result_text(reply) == "local"
        s.url = mcp(b)
        r = await s.post_raw(echo_call(20, "remote"))
        assert r.status_code == 503 and "Redis" in r.text and r.headers.get("retry-after"), r.text

    run(during)
    redis.start()
    for gw in (a, b):
        assert wait_until(ready(gw), 20)

    async def after(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(b))
        s.session_id = sid[0]
        for _ in range(50):
            r = await s.post_raw(echo_call(30, "back"))
            if r.status_code == 200:
                break
            await anyio.sleep(0.1)
        assert r.status_code == 200 and result_text(r.json()) == "back", r.text

    run(after)
    assert a.proc.poll() is None and b.proc.poll() is None


# -- shared rate limits ----------------------------------------------------------------------


def test_rate_limit_shared_by_instances(cluster):
    """rateLimit with Redis: one count per client for the whole cluster. Hits on A and B add up;
    the one over the limit is 429 on whichever instance it reaches."""
    a, b = cluster(2, rateLimit={"enabled": True, "max": 6, "window": "1m"})

    async def main(client: httpx.AsyncClient) -> None:
        s = StreamableSession(client, mcp(a))
        await s.initialize()  # 2 hits on A: initialize, initialized
        remaining = []
        for i, gw in enumerate([b, a, b, a]):
            s.url = mcp(gw)
            r = await s.post_raw(echo_call(i, "x"))
            assert r.status_code == 200, r.text
            remaining.append(int(r.headers["ratelimit-remaining"]))
        assert remaining == [3, 2, 1, 0]
        for gw in (a, b):
            s.url = mcp(gw)
            r = await s.post_raw(echo_call(9, "over"))
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] and int(r.headers["ratelimit-remaining"]) == 0

    run(main)


# -- units ---------------------------------------------------------------------------------


def test_stream_numbers_name_their_holder():
    """SSE stream numbers are instance * 10^8 + n: the holder is read back from an event id, and
    the id still matches the single-instance Last-Event-ID syntax (digits, at most 18)."""
    from mcpgw.cluster import STREAM_BASE, holder_of
    from mcpgw.store.redis import new_instance_id
    from mcpgw.transports.streamable import EVENT_ID

    instance = new_instance_id()
    number = int(instance) * STREAM_BASE + 12345
    assert holder_of(number) == instance
    assert holder_of(7) is None  # a single-instance stream number
    assert EVENT_ID.fullmatch(f"{number}_99")
    assert EVENT_ID.fullmatch(f"{999_999_999 * STREAM_BASE + STREAM_BASE - 1}_1")
