"""Server-to-client traffic through the gateway: sampling, elicitation, roots, progress, logging.

The child sends requests and notifications in the middle of a tools/call; the
gateway must carry them to the right client stream and carry the client's
answers back to the child, on both transports.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from mcp import types
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.gateway_process import Gateway, fixture_server
from tests.mcp_raw import TIMEOUT, SseStream, StreamableSession, result_text, tool_call

pytestmark = pytest.mark.integration

KINDS = ["streamable", "sse"]


@pytest.fixture(scope="module")
def gw():
    gateway = Gateway({"mcpServers": {"fixture": fixture_server(default=True)}})
    yield gateway
    gateway.stop()


def sdk_transport(gw: Gateway, kind: str):
    return streamable_http_client(f"{gw.url}/mcp") if kind == "streamable" else sse_client(f"{gw.url}/sse")


def run(coro_fn, *args, timeout: float = 15):
    async def main():
        with anyio.fail_after(timeout):
            return await coro_fn(*args)

    return anyio.run(main)


# -- sampling, elicitation, roots ---------------------------------------------------


async def sampling_answer(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    prompt = params.messages[0].content.text
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text=f"model says hi to <{prompt}>"),
        model="test-model", stop_reason="endTurn",
    )


@pytest.mark.parametrize("kind", KINDS)
def test_sampling(gw, kind):
    seen: list[types.CreateMessageRequestParams] = []

    async def on_sampling(context, params):
        seen.append(params)
        return await sampling_answer(context, params)

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy", sampling_callback=on_sampling) as client:
            return await client.call_tool("test_sampling", {"prompt": "What is 2+2?"})

    result = run(main)
    assert not result.is_error, result
    assert result.content[0].text == "LLM response: model says hi to <What is 2+2?>"
    assert len(seen) == 1 and seen[0].max_tokens == 100


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_sampling_calls_each_get_their_own_answer(gw, kind):
    """Two calls in one session sample at once; each child request gets the answer to its own prompt."""
    prompts = [f"prompt-{i}" for i in range(4)]
    asked: set[str] = set()
    everyone_asked = anyio.Event()

    async def on_sampling(context, params):
        asked.add(params.messages[0].content.text)
        if asked == set(prompts):
            everyone_asked.set()
        await everyone_asked.wait()  # hold every answer until all four requests are out
        return await sampling_answer(context, params)

    async def main():
        results: dict[str, str] = {}
        async with Client(sdk_transport(gw, kind), mode="legacy", sampling_callback=on_sampling) as client:

            async def call(prompt: str) -> None:
                result = await client.call_tool("test_sampling", {"prompt": prompt})
                results[prompt] = result.content[0].text

            async with anyio.create_task_group() as tg:
                for prompt in prompts:
                    tg.start_soon(call, prompt)
        return results

    results = run(main)
    assert results == {p: f"LLM response: model says hi to <{p}>" for p in prompts}


@pytest.mark.parametrize("kind", KINDS)
def test_elicitation(gw, kind):
    seen: list[types.ElicitRequestFormParams] = []

    async def on_elicit(context, params):
        seen.append(params)
        return types.ElicitResult(action="accept", content={"username": "alice", "email": "alice@example.com"})

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy", elicitation_callback=on_elicit) as client:
            return await client.call_tool("test_elicitation", {"message": "Who are you?"})

    result = run(main)
    text = result.content[0].text
    prefix = "User response: action=accept, content="
    assert text.startswith(prefix), text
    assert json.loads(text[len(prefix):]) == {"username": "alice", "email": "alice@example.com"}
    assert len(seen) == 1 and seen[0].message == "Who are you?"
    assert set(seen[0].requested_schema["properties"]) == {"username", "email"}


@pytest.mark.parametrize("kind", KINDS)
def test_list_roots(gw, kind):
    calls: list[object] = []

    async def on_roots(context):
        calls.append(context)
        return types.ListRootsResult(roots=[
            types.Root(uri="file:///tmp/project-a", name="project-a"),
            types.Root(uri="file:///tmp/project-b"),
        ])

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy", list_roots_callback=on_roots) as client:
            return await client.call_tool("list_roots", {})

    result = run(main)
    assert not result.is_error, result
    assert json.loads(result.content[0].text) == {"roots": [
        {"uri": "file:///tmp/project-a", "name": "project-a"},
        {"uri": "file:///tmp/project-b"},
    ]}
    assert len(calls) == 1


# -- progress -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_progress_reaches_the_calls_callback(gw, kind):
    sleep_progress: list[tuple] = []
    tool_progress: list[tuple] = []

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy") as client:

            async def on_sleep(progress, total, message):
                sleep_progress.append((progress, total, message))

            async def on_tool(progress, total, message):
                tool_progress.append((progress, total, message))

            result = await client.call_tool("sleep", {"seconds": 0.2}, progress_callback=on_sleep)
            assert result.content[0].text == "slept 0.2"
            result = await client.call_tool("test_tool_with_progress", {}, progress_callback=on_tool)
            assert result.content[0].text.startswith("Progress tool completed")

    run(main)
    assert sleep_progress == [(0, 0.2, None), (0.2, 0.2, None)]
    assert tool_progress == [(s, 100, f"Completed step {s} of 100") for s in (0, 50, 100)]


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_calls_each_get_only_their_own_progress(gw, kind):
    """Two sleeps at once in one session, told apart by their totals."""
    seen: dict[float, list[tuple]] = {0.3: [], 0.6: []}

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy") as client:

            async def call(seconds: float) -> None:
                async def on_progress(progress, total, message):
                    seen[seconds].append((progress, total))

                result = await client.call_tool("sleep", {"seconds": seconds}, progress_callback=on_progress)
                assert result.content[0].text == f"slept {seconds}"

            async with anyio.create_task_group() as tg:
                for seconds in seen:
                    tg.start_soon(call, seconds)

    run(main)
    assert seen == {s: [(0, s), (s, s)] for s in seen}


def test_streamable_progress_goes_on_the_stream_of_its_call(gw):
    """Raw view: each POST's SSE stream carries its own call's progress and response, nothing else."""

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            session = StreamableSession(client, f"{gw.url}/mcp")
            await session.initialize()
            streams: dict[str, list[dict]] = {}
            long_started = anyio.Event()

            async def long_call() -> None:
                msg = tool_call(1, "sleep", {"seconds": 0.8}, progress_token="tok-long")
                async with client.stream("POST", session.url, json=msg, headers=session.headers) as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    stream = SseStream(r)
                    first = await stream.next_message()
                    long_started.set()
                    streams["long"] = [first, *await stream.messages_until_end()]

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)
                await long_started.wait()  # the long call is running in the child
                streams["short"] = await session.post(tool_call(2, "sleep", {"seconds": 0.1}, progress_token="tok-short"))
            await session.delete()
            return streams

    streams = run(main)
    for name, id, seconds in (("long", 1, 0.8), ("short", 2, 0.1)):
        token = f"tok-{name}"
        messages = streams[name]
        progress = [m["params"] for m in messages if m.get("method") == "notifications/progress"]
        assert progress == [
            {"progressToken": token, "progress": 0, "total": seconds},
            {"progressToken": token, "progress": seconds, "total": seconds},
        ], messages
        assert [m["id"] for m in messages if "method" not in m] == [id]
        assert result_text(messages[-1]) == f"slept {seconds}"
        assert len(messages) == 3, messages


# -- logging ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logging_notifications_reach_logging_callback(gw, kind):
    logs: list[types.LoggingMessageNotificationParams] = []
    notes: list[object] = []

    async def on_log(params):
        logs.append(params)

    async def on_message(message):
        notes.append(message)

    async def main():
        async with Client(sdk_transport(gw, kind), mode="legacy", logging_callback=on_log,
                          message_handler=on_message) as client:
            result = await client.call_tool("notify", {"message": "hello from the child"})
            assert result.content[0].text == "notified"
            result = await client.call_tool("test_tool_with_logging", {})
            assert result.content[0].text == "Tool with logging executed successfully"

    run(main)
    assert [(m.level, m.logger, m.data) for m in logs] == [
        ("info", "conformance-fixture", "hello from the child"),
        ("info", "conformance-fixture", "Tool execution started"),
        ("info", "conformance-fixture", "Tool processing data"),
        ("info", "conformance-fixture", "Tool execution completed"),
    ]
    assert not [n for n in notes if isinstance(n, Exception)], notes
    assert any(isinstance(n, types.ToolListChangedNotification) for n in notes), notes
