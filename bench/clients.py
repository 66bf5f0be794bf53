"""MCP sessions as the bench drives them: direct pipes, Streamable HTTP, legacy SSE, WebSocket.

Every client has the same shape: ``await connect()`` (the initialize round trip
and ``notifications/initialized``), ``await call(id, text, progress)`` (one
``tools/call`` of ``echo``; returns the text that came back), ``await close()``.
Each client counts what reached it that was not its own: ``foreign`` (a reply
whose id it is not waiting for, or whose text is not what it sent with that
id). A reply is only accepted when both id and text match.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

from bench.http import HttpConnection, SseParser

ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
PROTOCOL_VERSION = "2025-06-18"
ACCEPT_BOTH = b"application/json, text/event-stream"
CT_JSON = b"application/json"


def echo_command() -> list[str]:
    """The fixture server's argv: an absolute interpreter path, no shim."""
    return [sys.executable, str(ECHO_SERVER)]


def initialize_body(id: Any = 0, version: str = PROTOCOL_VERSION) -> bytes:
    return dumps({
        "jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "mcpgw-bench", "version": "1"}},
    })


INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def call_body(id: int, text: str, progress: bool = False) -> bytes:
    """A tools/call of echo; ``text`` must need no JSON escaping (the bench only sends [A-Za-z0-9_:-])."""
    if progress:
        return b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":{"text":"%s"},"_meta":{"progressToken":"p%d"}}}' % (
            id, text.encode(), id)
    return b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":{"text":"%s"}}}' % (id, text.encode())


def reply_text(msg: dict) -> str | None:
    try:
        return msg["result"]["content"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return None


class BenchClient:
    transport = "?"

    def __init__(self) -> None:
        self.foreign = 0
        self.notifications = 0
        self.modes: set[str] = set()  # how replies came: json / sse / pipe / ws
        #: ``time.perf_counter_ns()`` when ``connect`` had the initialize reply (the setup
        #: workload's end point: "session setup (initialize reply, child spawned)"; what follows,
        #: ``notifications/initialized``, is not part of it).
        self.initialized_at: int | None = None

    def _is_reply(self, msg: dict, id: Any, text: str | None) -> bool:
        """Whether ``msg`` is the reply to ``id`` (carrying ``text``); counts notifications and foreign replies."""
        if "method" in msg:
            self.notifications += 1
            return False
        if msg.get("id") == id and (text is None or reply_text(msg) == text):
            return True
        self.foreign += 1
        return False

    async def connect(self) -> None:
        raise NotImplementedError

    async def call(self, id: int, text: str, progress: bool = False) -> str | None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


# -- direct pipes (the floor) -------------------------------------------------


class DirectClient(BenchClient):
    """The bench itself speaks to the echo server over its stdin/stdout."""

    transport = "pipe"

    def __init__(self, argv: list[str] | None = None):
        super().__init__()
        self.argv = argv or echo_command()
        self.proc: asyncio.subprocess.Process | None = None

    async def connect(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024)
        self.proc.stdin.write(initialize_body(0) + b"\n")
        msg = await self._reply(0, None)
        if "result" not in msg:
            raise RuntimeError(f"initialize failed: {msg}")
        self.initialized_at = time.perf_counter_ns()
        self.proc.stdin.write(INITIALIZED + b"\n")

    async def _reply(self, id: Any, text: str | None) -> dict:
        readline = self.proc.stdout.readline
        while True:
            line = await readline()
            if not line:
                raise RuntimeError("echo server exited")
            msg = loads(line)
            if self._is_reply(msg, id, text):
                return msg

    async def call(self, id: int, text: str, progress: bool = False) -> str | None:
        body = call_body(id, text, progress)
        self.proc.stdin.write(body + b"\n")
        if len(body) > 65536:
            await self.proc.stdin.drain()
        self.modes.add("pipe")
        return reply_text(await self._reply(id, text))

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- Streamable HTTP ----------------------------------------------------------


class StreamableClient(BenchClient):
    """``POST /mcp`` on one keep-alive connection; a reply comes as JSON or as an SSE stream."""

    transport = "streamable"

    def __init__(self, host: str, port: int, path: str = "/mcp", delete: bool = True):
        super().__init__()
        self.host, self.port, self.path = host, port, path.encode()
        self.sid: bytes | None = None
        self.conn: HttpConnection | None = None
        self.delete = delete
        self._headers: list[tuple[bytes, bytes]] = []

    def _base_headers(self) -> list[tuple[bytes, bytes]]:
        h = [(b"Content-Type", CT_JSON), (b"Accept", ACCEPT_BOTH)]
        if self.sid is not None:
            h += [(b"Mcp-Session-Id", self.sid), (b"MCP-Protocol-Version", PROTOCOL_VERSION.encode())]
        return h

    async def _post(self, body: bytes) -> tuple[int, list[dict], Any]:
        """POST one message; (status, messages in the answer, response)."""
        conn = self.conn
        if conn is None or conn.closed:
            conn = self.conn = await HttpConnection.open(self.host, self.port)
        events: list[bytes] = []
        parser = SseParser(lambda event, data: events.append(data))
        resp = await conn.request(b"POST", self.path, self._headers, body, on_event_stream=parser.feed)
        if resp.streamed:
            self.modes.add("sse")
            return resp.status, [loads(e) for e in events if e.strip()], resp
        if resp.status == 200 and resp.body:
            ctype = resp.headers.get(b"content-type", b"")
            if ctype.startswith(b"text/event-stream"):  # buffered SSE (not streamed)
                self.modes.add("sse")
                SseParser(lambda event, data: events.append(data)).feed(resp.body)
                return resp.status, [loads(e) for e in events if e.strip()], resp
            self.modes.add("json")
            doc = loads(resp.body)
            return resp.status, doc if isinstance(doc, list) else [doc], resp
        return resp.status, [], resp

    def _pick(self, messages: list[dict], id: Any, text: str | None) -> dict | None:
        found = None
        for msg in messages:
            if found is None:
                if self._is_reply(msg, id, text):
                    found = msg
            elif "method" in msg:
                self.notifications += 1
            else:
                self.foreign += 1  # a second reply to one request
        return found

    async def connect(self) -> None:
        self._headers = self._base_headers()
        status, messages, resp = await self._post(initialize_body(0))
        if status != 200:
            raise RuntimeError(f"initialize: HTTP {status} {resp.body[:200]!r}")
        self.sid = resp.headers.get(b"mcp-session-id")
        msg = self._pick(messages, 0, None)
        if msg is None or "result" not in msg:
            raise RuntimeError(f"initialize: no result in {messages!r:.200}")
        self.initialized_at = time.perf_counter_ns()
        self._headers = self._base_headers()
        status, _, resp = await self._post(INITIALIZED)
        if status not in (200, 202, 204):
            raise RuntimeError(f"notifications/initialized: HTTP {status} {resp.body[:200]!r}")
        self.modes.clear()

    async def call(self, id: int, text: str, progress: bool = False) -> str | None:
        status, messages, resp = await self._post(call_body(id, text, progress))
        if status != 200:
            raise RuntimeError(f"tools/call: HTTP {status} {resp.body[:200]!r}")
        msg = self._pick(messages, id, text)
        return None if msg is None else reply_text(msg)

    async def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            if self.delete and self.sid is not None:
                try:
                    await asyncio.wait_for(self.conn.request(b"DELETE", self.path, self._headers), 5)
                except Exception:  # noqa: BLE001 - best effort: the connection closes below whatever happened
                    pass
            self.conn.close()


# -- legacy HTTP+SSE ----------------------------------------------------------


class LegacySseClient(BenchClient):
    """``GET /sse`` for replies, ``POST`` to the announced endpoint for requests."""

    transport = "sse"

    def __init__(self, host: str, port: int, path: str = "/sse"):
        super().__init__()
        self.host, self.port, self.path = host, port, path.encode()
        self.stream: HttpConnection | None = None
        self.post: HttpConnection | None = None
        self.endpoint: bytes | None = None
        self._endpoint_ready: asyncio.Future | None = None
        self._pending: dict[Any, tuple[asyncio.Future, str | None]] = {}
        self._headers = [(b"Content-Type", CT_JSON)]

    def _on_event(self, event: bytes, data: bytes) -> None:
        if event == b"endpoint":
            if self._endpoint_ready is not None and not self._endpoint_ready.done():
                self._endpoint_ready.set_result(data.strip())
            return
        if not data.strip():
            return
        try:
            msg = loads(data)
        except ValueError:
            self.foreign += 1
            return
        if not isinstance(msg, dict):
            self.foreign += 1
            return
        if "method" in msg:
            self.notifications += 1
            return
        id = msg.get("id")
        waiting = self._pending.get(id) if isinstance(id, (int, str)) else None
        if waiting is None:
            self.foreign += 1
            return
        fut, text = waiting
        if text is not None and reply_text(msg) != text:
            self.foreign += 1
            return
        del self._pending[id]
        if not fut.done():
            fut.set_result(msg)

    async def open_stream(self) -> None:
        """Only the stream: what an idle client holds."""
        loop = asyncio.get_running_loop()
        self._endpoint_ready = loop.create_future()
        self.stream = await HttpConnection.open(self.host, self.port)
        parser = SseParser(self._on_event)
        resp = await self.stream.open_stream(b"GET", self.path, [(b"Accept", b"text/event-stream")], parser.feed)
        if resp.status != 200:
            raise RuntimeError(f"GET {self.path.decode()}: HTTP {resp.status} {resp.body[:200]!r}")
        endpoint = await self._endpoint_ready
        if endpoint.startswith((b"http://", b"https://")):
            u = urlsplit(endpoint.decode())
            endpoint = (u.path + ("?" + u.query if u.query else "")).encode()
        elif not endpoint.startswith(b"/"):
            base = self.path.rsplit(b"/", 1)[0]
            endpoint = base + b"/" + endpoint
        self.endpoint = endpoint

    async def _send(self, body: bytes, id: Any = None, text: str | None = None) -> dict | None:
        fut = None
        if id is not None:
            fut = asyncio.get_running_loop().create_future()
            self._pending[id] = (fut, text)
        resp = await self.post.request(b"POST", self.endpoint, self._headers, body)
        if resp.status not in (200, 202, 204):
            self._pending.pop(id, None)
            raise RuntimeError(f"POST {self.endpoint.decode()}: HTTP {resp.status} {resp.body[:200]!r}")
        if fut is None:
            return None
        if self.stream.closed and not fut.done():
            raise RuntimeError("the SSE stream closed")
        return await fut

    async def connect(self) -> None:
        await self.open_stream()
        self.post = await HttpConnection.open(self.host, self.port)
        msg = await self._send(initialize_body(0), 0, None)
        if "result" not in msg:
            raise RuntimeError(f"initialize failed: {msg}")
        self.initialized_at = time.perf_counter_ns()
        await self._send(INITIALIZED)

    async def call(self, id: int, text: str, progress: bool = False) -> str | None:
        self.modes.add("sse")
        return reply_text(await self._send(call_body(id, text, progress), id, text))

    async def close(self) -> None:
        for conn in (self.post, self.stream):
            if conn is not None:
                conn.close()


# -- WebSocket ----------------------------------------------------------------


class WsClient(BenchClient):
    """One WebSocket, one JSON-RPC message per text frame (aiohttp)."""

    transport = "ws"

    def __init__(self, host: str, port: int, path: str = "/ws", subprotocol: str | None = "mcp"):
        super().__init__()
        self.url = f"http://{host}:{port}{path}"
        self.subprotocol = subprotocol
        self.http = None
        self.ws = None

    async def connect(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession()
        protocols = (self.subprotocol,) if self.subprotocol else ()
        self.ws = await self.http.ws_connect(self.url, protocols=protocols, max_msg_size=0, compress=0, autoping=True)
        msg = await self._exchange(initialize_body(0), 0, None)
        if "result" not in msg:
            raise RuntimeError(f"initialize failed: {msg}")
        self.initialized_at = time.perf_counter_ns()
        await self.ws.send_str(INITIALIZED.decode())

    async def _exchange(self, body: bytes, id: Any, text: str | None) -> dict:
        import aiohttp

        ws = self.ws
        await ws.send_str(body.decode())
        while True:
            frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"WebSocket ended: {frame.type} {frame.data!r} {frame.extra!r}")
            msg = loads(frame.data)
            if self._is_reply(msg, id, text):
                return msg

    async def call(self, id: int, text: str, progress: bool = False) -> str | None:
        self.modes.add("ws")
        return reply_text(await self._exchange(call_body(id, text, progress), id, text))

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except Exception:  # noqa: BLE001 - best effort: the HTTP session closes below whatever happened
                pass
        if self.http is not None:
            await self.http.close()
