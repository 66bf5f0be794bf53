"""Start tests/fixtures/remote_server.py (an official-SDK MCP server over HTTP) and MCP clients for the
gateway's three transports, for the remote-upstream and aggregate tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CreateMessageResult, TextContent
from websockets.sync.client import connect

REMOTE_SERVER = Path(__file__).resolve().parent / "fixtures" / "remote_server.py"


class RemoteServer:
    """One remote MCP server process on a free loopback port; ``stop()`` ends it."""

    def __init__(self, transport: str = "streamable-http", token: str | None = None, name: str = "remote"):
        argv = [sys.executable, str(REMOTE_SERVER), "--transport", transport, "--name", name]
        if token:
            argv += ["--token", token]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                raise RuntimeError("remote server exited before listening:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                break
        else:
            self.stop()
            raise RuntimeError("remote server did not start:\n" + "".join(lines))
        path = "/sse" if transport == "sse" else "/mcp"
        self.url = f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def _sampling(context: Any, params: Any) -> CreateMessageResult:
    """The test client's sampling: echoes the question back, upper-cased."""
    question = params.messages[0].content.text
    return CreateMessageResult(role="assistant", content=TextContent(type="text", text=question.upper()), model="test")


def sdk_session(url: str, kind: str, script: Any, headers: dict[str, str] | None = None) -> Any:
    """Run ``await script(client)`` in an SDK client session over /mcp (``kind`` "mcp") or /sse,
    sending ``headers`` (the client's credentials) with every request."""

    async def run() -> Any:
        if kind == "mcp":
            transport = streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
        else:
            transport = sse_client(url, headers=headers)
        async with Client(transport, mode="legacy", sampling_callback=_sampling) as client:
            return await script(client)

    return anyio.run(run)


class WsClient:
    """A raw JSON-RPC client on the gateway's WebSocket (one message per text frame).

    ``sampling``: answer sampling/createMessage requests from the server with the question upper-cased.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.ws = connect(url, subprotocols=["mcp"], open_timeout=10, additional_headers=headers, legacy=True)
        self.seen: list[dict[str, Any]] = []
        self._next = 0

    def initialize(self) -> dict[str, Any]:
        result = self.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}},
                                          "clientInfo": {"name": "ws-test", "version": "1"}})
        self.ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        return result

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 15) -> dict[str, Any]:
        """The response message (result or error) of one request; other messages go to ``seen``."""
        self._next += 1
        id = self._next
        self.ws.send(json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == id and "method" not in msg:
                return msg
            if msg.get("method") == "sampling/createMessage":
                question = msg["params"]["messages"][0]["content"]["text"]
                self.ws.send(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
                    "role": "assistant", "model": "test", "content": {"type": "text", "text": question.upper()}}}))
                continue
            self.seen.append(msg)

    def tool(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.call("tools/call", {"name": name, "arguments": arguments or {}, **kw})

    def close(self) -> None:
        self.ws.close()
