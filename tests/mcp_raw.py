"""Raw MCP over HTTP (httpx) for tests that must see the wire: which stream carried which message.

The official SDK routes every message by id or progress token whatever stream
it came on, so it cannot tell a misrouted event from a correct one; these
helpers keep each stream's messages apart.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

PROTOCOL = "2025-06-18"
ACCEPT_BOTH = "application/json, text/event-stream"
#: Generous per-read limit: a hung gateway fails the test instead of hanging it.
TIMEOUT = httpx.Timeout(10.0)


def request(id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def tool_call(id: Any, name: str, arguments: dict[str, Any] | None = None, progress_token: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if progress_token is not None:
        params["_meta"] = {"progressToken": progress_token}
    return request(id, "tools/call", params)


def initialize_request(id: Any = 0, capabilities: dict[str, Any] | None = None, version: str = PROTOCOL) -> dict[str, Any]:
    return request(id, "initialize", {
        "protocolVersion": version,
        "capabilities": capabilities or {},
        "clientInfo": {"name": "mcpgw-raw-test", "version": "1"},
    })


def result_text(msg: dict[str, Any]) -> str:
    """The first text block of a tools/call result message."""
    return msg["result"]["content"][0]["text"]


class SseStream:
    """SSE events from one streaming httpx response; ``next()`` is None at the end of the stream."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self._lines = response.aiter_lines()
        self.events: list[dict[str, str]] = []

    async def next(self) -> dict[str, str] | None:
        event: dict[str, str] = {}
        data: list[str] = []
        async for line in self._lines:
            if line == "":
                if data or event:
                    if data:
                        event["data"] = "\n".join(data)
                    self.events.append(event)
                    return event
                continue
            if line.startswith(":"):
                continue  # comment (keepalive ping)
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                event[name] = value
        return None

    async def next_message(self) -> dict[str, Any] | None:
        """The next event that carries a JSON-RPC message (skips priming events)."""
        while True:
            event = await self.next()
            if event is None:
                return None
            if event.get("data"):
                return json.loads(event["data"])

    async def messages_until_end(self) -> list[dict[str, Any]]:
        out = []
        while (msg := await self.next_message()) is not None:
            out.append(msg)
        return out


class LegacySession:
    """A 2024-11-05 HTTP+SSE session: one GET /sse stream, POST /messages?sessionId=."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, path: str = "/sse"):
        self.client = client
        self.base_url = base_url
        self.path = path
        self.stream: SseStream
        self.post_url = ""
        self.session_id = ""
        self._cm: Any = None

    async def __aenter__(self) -> LegacySession:
        self._cm = self.client.stream("GET", self.base_url + self.path, headers={"accept": "text/event-stream"})
        response = await self._cm.__aenter__()
        assert response.status_code == 200, response.status_code
        self.stream = SseStream(response)
        event = await self.stream.next()
        assert event is not None and event.get("event") == "endpoint", event
        self.post_url = self.base_url + event["data"]
        self.session_id = parse_qs(urlsplit(event["data"]).query)["sessionId"][0]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._cm.__aexit__(*exc)

    async def close(self) -> None:
        """Drop the SSE connection (the client going away)."""
        await self.stream.response.aclose()

    async def send(self, msg: Any) -> httpx.Response:
        r = await self.client.post(self.post_url, json=msg)
        assert r.status_code == 202, (r.status_code, r.text)
        return r

    async def until_response(self, id: Any) -> list[dict[str, Any]]:
        """Every message on the stream up to and including the response to ``id``."""
        seen: list[dict[str, Any]] = []
        while True:
            msg = await self.stream.next_message()
            assert msg is not None, f"stream ended before the response to {id!r}; saw {seen}"
            seen.append(msg)
            if msg.get("id") == id and "method" not in msg:
                return seen

    async def initialize(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        await self.send(initialize_request(0, capabilities, "2024-11-05"))
        reply = (await self.until_response(0))[-1]
        assert "result" in reply, reply
        await self.send(notification("notifications/initialized"))
        return reply["result"]

    async def call(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        await self.send(msg)
        return await self.until_response(msg["id"])


class StreamableSession:
    """A Streamable HTTP session on ``url`` (``.../mcp``)."""

    def __init__(self, client: httpx.AsyncClient, url: str, version: str = PROTOCOL):
        self.client = client
        self.url = url
        self.session_id = ""
        self.version = version

    @property
    def headers(self) -> dict[str, str]:
        h = {"accept": ACCEPT_BOTH, "content-type": "application/json", "mcp-protocol-version": self.version}
        if self.session_id:
            h["mcp-session-id"] = self.session_id
        return h

    async def initialize(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        r = await self.client.post(self.url, json=initialize_request(0, capabilities, self.version), headers=self.headers)
        assert r.status_code == 200, (r.status_code, r.text)
        self.session_id = r.headers["mcp-session-id"]
        reply = _body_messages(r)[-1]
        self.version = reply["result"]["protocolVersion"]
        r = await self.client.post(self.url, json=notification("notifications/initialized"), headers=self.headers)
        assert r.status_code == 202, (r.status_code, r.text)
        return reply["result"]

    async def post(self, msg: Any) -> list[dict[str, Any]]:
        """POST one message; every message of the reply (JSON body or the whole SSE stream)."""
        async with self.client.stream("POST", self.url, json=msg, headers=self.headers) as r:
            assert r.status_code in (200, 202), (r.status_code, (await r.aread()).decode())
            if r.status_code == 202:
                return []
            if r.headers["content-type"].startswith("text/event-stream"):
                return await SseStream(r).messages_until_end()
            await r.aread()
            return _body_messages(r)

    async def post_raw(self, msg: Any) -> httpx.Response:
        return await self.client.post(self.url, json=msg, headers=self.headers)

    @asynccontextmanager
    async def get_stream(self) -> AsyncIterator[SseStream]:
        headers = {k: v for k, v in self.headers.items() if k != "content-type"}
        headers["accept"] = "text/event-stream"
        async with self.client.stream("GET", self.url, headers=headers) as r:
            assert r.status_code == 200, (r.status_code, (await r.aread()).decode())
            yield SseStream(r)

    async def delete(self) -> httpx.Response:
        return await self.client.delete(self.url, headers=self.headers)


def _body_messages(r: httpx.Response) -> list[dict[str, Any]]:
    if r.headers["content-type"].startswith("text/event-stream"):
        out = []
        for block in r.text.split("\n\n"):
            data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            if data and any(data):
                out.append(json.loads("\n".join(data)))
        return out
    doc = r.json()
    return doc if isinstance(doc, list) else [doc]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_leftovers(pids: set[int]) -> None:
    """Last-resort cleanup so a failing test leaves no process behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
