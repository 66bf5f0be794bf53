"""Raw-HTTP helpers for the wire tests: httpx (sync), sseclient-py and plain sockets.

Nothing here knows the gateway's internals; it speaks HTTP as any client would.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import sseclient

from tests.gateway_process import fixture_server

ACCEPT_BOTH = "application/json, text/event-stream"
POST_HEADERS = {"accept": ACCEPT_BOTH, "content-type": "application/json"}
LATEST = "2025-11-25"
#: Session ids: visible ASCII only (2025-11-25 basic/transports §Session Management).
VISIBLE_ASCII = r"^[\x21-\x7e]+$"
SESSION_NOT_FOUND = -32001


def config(**extra: Any) -> dict[str, Any]:
    """One fixture server ``fx`` (the default one too) and a fast keepalive."""
    return {"mcpServers": {"fx": fixture_server()}, "sse": {"keepalive": 0.2}, **extra}


def http_client(base_url: str, timeout: float = 10.0) -> httpx.Client:
    """An httpx client that sends only the headers a test gives (no default ``Accept: */*``)."""
    client = httpx.Client(base_url=base_url, timeout=timeout)
    del client.headers["accept"]
    return client


def initialize(id: Any = 1, version: str = LATEST, capabilities: dict | None = None) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": capabilities or {},
                   "clientInfo": {"name": "wire-tests", "version": "1"}},
    }


def request(id: Any, method: str, params: dict | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: dict | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def tool_call(id: Any, name: str, arguments: dict | None = None, progress: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if progress is not None:
        params["_meta"] = {"progressToken": progress}
    return request(id, "tools/call", params)


def session_headers(sid: str, version: str | None = LATEST) -> dict[str, str]:
    headers = {**POST_HEADERS, "mcp-session-id": sid}
    if version is not None:
        headers["mcp-protocol-version"] = version
    return headers


def events_of(body: bytes) -> list[sseclient.Event]:
    """The SSE events of a complete ``text/event-stream`` body."""
    return list(sseclient.SSEClient(iter([body])).events())


def messages_of(response: httpx.Response) -> list[Any]:
    """The JSON-RPC messages of a complete POST answer, JSON or SSE (priming events skipped)."""
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        return [response.json()]
    assert ctype.startswith("text/event-stream"), f"unexpected content-type {ctype!r}"
    return [json.loads(e.data) for e in events_of(response.content) if e.data]


def sse_events(response: httpx.Response) -> Iterator[sseclient.Event]:
    """The events of a live streaming response, as they arrive."""
    return sseclient.SSEClient(response.iter_bytes()).events()


def open_session(client: httpx.Client, version: str = LATEST, path: str = "/mcp",
                 capabilities: dict | None = None) -> str:
    """initialize + notifications/initialized; the Mcp-Session-Id."""
    r = client.post(path, headers=POST_HEADERS, json=initialize(version=version, capabilities=capabilities))
    assert r.status_code == 200, r.text
    [reply] = messages_of(r)
    assert reply["result"]["protocolVersion"] == version
    sid = r.headers["mcp-session-id"]
    r = client.post(path, headers=session_headers(sid, version), json=notification("notifications/initialized"))
    assert r.status_code == 202, r.text
    return sid


def delete_session(client: httpx.Client, sid: str, path: str = "/mcp") -> int:
    return client.delete(path, headers={"mcp-session-id": sid}).status_code


def assert_jsonrpc_error(response: httpx.Response, status: int, code: int | None = None) -> dict[str, Any]:
    """``status`` with a JSON-RPC error body (and ``code`` if given); the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0" and "error" in body and "result" not in body, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def raw_http(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the gateway; everything it answers until it closes (or ``timeout``)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and closed before reading all of it
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def raw_status(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 if there was none)."""
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


class RawSseStream:
    """A ``GET /sse`` held open on a plain socket, drained by a thread so the gateway never
    blocks on it; ``endpoint`` is the announced message URI. ``close()`` hangs up."""

    def __init__(self, port: int, path: str = "/sse", timeout: float = 10.0):
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._sock.sendall(b"GET %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\naccept: text/event-stream\r\n\r\n"
                           % (path.encode(), port))
        self.received = bytearray()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"no endpoint event on {path}: {bytes(self.received)!r}")
        m = re.search(rb"event: endpoint\r?\ndata: ([^\r\n]+)", self.received)
        assert m, bytes(self.received)
        self.endpoint = m.group(1).decode()

    def _drain(self) -> None:
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                self.received += chunk
                if b"event: endpoint" in self.received and b"\n\n" in self.received.split(b"event: endpoint", 1)[1]:
                    self._ready.set()
        except OSError:
            pass
        finally:
            self._ready.set()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()
