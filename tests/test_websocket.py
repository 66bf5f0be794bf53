"""Issue 3: the WebSocket transport (``/ws``) against a real gateway and real clients.

Clients: the ``websockets`` library, a raw socket (keepalive pings, dead peers),
the ``mcp`` 1.x SDK's ``websocket_client`` (in a cached venv) and ``wscat`` (npm).
Every test ends with the gateway's process table checked for leaked children.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.gateway_process import Gateway, fixture_server, pid_alive, wait_until

pytestmark = pytest.mark.integration

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
MCP1_VENV = CACHE / "mcpgw-mcp1-venv"
WSCAT_DIR = CACHE / "mcpgw-wscat"

INIT_PARAMS = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "ws-test", "version": "1"}}


def rpc(id: Any, method: str, params: Any = None) -> str:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg)


def notification(method: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method})


def echo(id: Any, text: str) -> str:
    return rpc(id, "tools/call", {"name": "echo", "arguments": {"text": text}})


def ws_url(gw: Gateway, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


def start(make_gateway, **config: Any) -> Gateway:
    return make_gateway({"mcpServers": {"fixture": fixture_server()}, **config})


def assert_no_children(gw: Gateway, timeout: float = 5.0) -> None:
    assert wait_until(lambda: gw.child_pids() == [], timeout), f"leaked children: {gw.child_pids()}"


async def initialize(ws: Any, id: Any = 1) -> dict[str, Any]:
    await ws.send(rpc(id, "initialize", INIT_PARAMS))
    reply = json.loads(await ws.recv())
    await ws.send(notification("notifications/initialized"))
    return reply


async def recv_json(ws: Any) -> dict[str, Any]:
    return json.loads(await ws.recv())


async def closed_with(ws: Any) -> tuple[int | None, str]:
    """Read until the gateway closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- the websockets library ----------------------------------------------------


def test_initialize_list_and_call(make_gateway):
    """websockets client on /ws: initialize, tools/list, tools/call echo; subprotocol mcp."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
            assert ws.subprotocol == "mcp"
            init = await initialize(ws)
            assert init["id"] == 1 and init["result"]["serverInfo"]["name"] == "mcpgw-conformance-fixture"
            await ws.send(rpc(2, "tools/list"))
            tools = await recv_json(ws)
            assert tools["id"] == 2 and "echo" in [t["name"] for t in tools["result"]["tools"]]
            await ws.send(echo(3, "hello over ws"))
            called = await recv_json(ws)
            assert called == {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": "hello over ws"}]}}

    run(client())
    assert_no_children(gw)


def test_named_server_path(make_gateway):
    """``/servers/NAME/ws`` reaches that server; the session counts for it in /servers."""
    import httpx

    gw = make_gateway({"mcpServers": {"alpha": fixture_server(default=True), "beta": fixture_server()}})

    async def client():
        async with connect(ws_url(gw, "/servers/beta/ws"), subprotocols=["mcp"]) as ws:
            await initialize(ws)
            listing = await asyncio.to_thread(httpx.get, f"{gw.url}/servers")
            servers = {s["name"]: s for s in listing.json()["servers"]}
            assert servers["beta"]["sessions"] == 1 and servers["alpha"]["sessions"] == 0
            await ws.send(echo(2, "beta"))
            assert (await recv_json(ws))["result"]["content"][0]["text"] == "beta"

    run(client())
    assert_no_children(gw)


def test_twenty_concurrent_connections_get_only_their_own_replies(make_gateway):
    """20 connections at once, same request ids, one child each; every reply lands on its own socket."""
    gw = start(make_gateway)
    n = 20
    barrier = asyncio.Barrier(n + 1)

    async def one(i: int) -> list[dict[str, Any]]:
        async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
            replies = [await initialize(ws)]
            await barrier.wait()
            await ws.send(rpc(2, "tools/list"))
            for k in range(3):
                await ws.send(echo(10 + k, f"client-{i}-call-{k}"))
            for _ in range(4):
                replies.append(await recv_json(ws))
            await barrier.wait()
            return replies

    async def main():
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await barrier.wait()
        children = await asyncio.to_thread(gw.child_pids)
        await barrier.wait()
        return children, await asyncio.gather(*tasks)

    children, results = run(main())
    assert len(children) == n
    for i, replies in enumerate(results):
        by_id = {r["id"]: r for r in replies}
        assert set(by_id) == {1, 2, 10, 11, 12}
        assert "echo" in [t["name"] for t in by_id[2]["result"]["tools"]]
        for k in range(3):
            assert by_id[10 + k]["result"]["content"][0]["text"] == f"client-{i}-call-{k}"
    assert_no_children(gw)


def test_application_ping_gets_pong(make_gateway):
    """A ``{"type": "ping"}`` text frame is answered ``{"type": "pong"}`` by the gateway."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw)) as ws:
            await ws.send('{"type": "ping"}')
            assert await recv_json(ws) == {"type": "pong"}
            await initialize(ws)
            await ws.send(json.dumps({"type": "ping"}))
            assert await recv_json(ws) == {"type": "pong"}

    run(client())
    assert_no_children(gw)


def test_jsonrpc_ping_and_server_discover(make_gateway):
    """A JSON-RPC ping reaches the child; ``server/discover`` gets -32601 from the gateway at once."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw)) as ws:
            await ws.send(rpc("d", "server/discover"))
            discover = await recv_json(ws)
            assert discover["id"] == "d" and discover["error"]["code"] == -32601
            await initialize(ws)
            await ws.send(rpc(7, "ping"))
            assert await recv_json(ws) == {"jsonrpc": "2.0", "id": 7, "result": {}}

    run(client())
    assert_no_children(gw)


def test_bad_json_gets_parse_error_and_the_connection_goes_on(make_gateway):
    """Invalid JSON: a -32700 error frame (id null), then the same connection still works."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
            await initialize(ws)
            await ws.send('{"jsonrpc": "2.0", "id": 2, "method": ')
            error = await recv_json(ws)
            assert error["id"] is None and error["error"]["code"] == -32700
            await ws.send(echo(3, "still here"))
            assert (await recv_json(ws))["result"]["content"][0]["text"] == "still here"

    run(client())
    assert_no_children(gw)


def test_json_that_is_not_one_jsonrpc_message_gets_invalid_request(make_gateway):
    """``{"type": "hello"}`` and a batch array: -32600 error frames, the connection goes on."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw)) as ws:
            await initialize(ws)
            await ws.send('{"type": "hello"}')
            assert (await recv_json(ws))["error"]["code"] == -32600
            await ws.send("[" + echo(2, "a") + "]")
            assert (await recv_json(ws))["error"]["code"] == -32600
            await ws.send(echo(3, "after"))
            assert (await recv_json(ws))["id"] == 3

    run(client())
    assert_no_children(gw)


def test_binary_frame_closes_1003(make_gateway):
    """A binary frame: close code 1003, the session's child stops."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
            await initialize(ws)
            await ws.send(echo(2, "x").encode())
            return await closed_with(ws)

    code, reason = run(client())
    assert code == 1003 and "text" in reason
    assert_no_children(gw)


def test_invalid_utf8_closes_1007(make_gateway):
    """A text frame that is not UTF-8: close code 1007, the session's child stops."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw)) as ws:
            await initialize(ws)
            await ws.send(b'{"jsonrpc": "2.0", "method": "x", "params": {"t": "\xff\xfe"}}', text=True)
            return await closed_with(ws)

    code, _ = run(client())
    assert code == 1007
    assert_no_children(gw)


def test_message_over_the_limit_closes_1009(make_gateway):
    """A message over ``websocket.maxMessageBytes``: close code 1009; one under it goes through."""
    limit = 64 * 1024
    gw = start(make_gateway, websocket={"maxMessageBytes": limit})

    async def client():
        async with connect(ws_url(gw), max_size=None) as ws:
            await initialize(ws)
            fits = echo(2, "y" * (limit - 200))
            assert len(fits) <= limit
            await ws.send(fits)
            assert (await recv_json(ws))["result"]["content"][0]["text"] == "y" * (limit - 200)
            await ws.send(echo(3, "z" * (limit + 1)))
            return await closed_with(ws)

    code, _ = run(client())
    assert code == 1009
    assert_no_children(gw)


def test_closing_the_socket_stops_the_child_within_2s(make_gateway):
    """Client close ends the session; even a child that ignores stdin EOF and SIGTERM is gone within 2 s."""
    stubborn = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(60)
    """)
    gw = make_gateway({"mcpServers": {"stubborn": {"command": sys.executable, "args": ["-c", stubborn]}}})

    async def client():
        async with connect(ws_url(gw)) as ws:
            assert await asyncio.to_thread(wait_until, lambda: len(gw.child_pids()) == 1)
            [pid] = gw.child_pids()
            await ws.close()
            return pid, time.monotonic()

    pid, closed_at = run(client())
    assert wait_until(lambda: not pid_alive(pid), timeout=2.0), "child still alive 2 s after close"
    assert time.monotonic() - closed_at < 2.0
    assert_no_children(gw)


def test_child_crash_errors_in_flight_requests_then_closes_1011(make_gateway):
    """The child exits mid-call: every in-flight request gets a JSON-RPC error, then close 1011."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), subprotocols=["mcp"]) as ws:
            await initialize(ws)
            await ws.send(rpc(2, "tools/call", {"name": "sleep", "arguments": {"seconds": 30}}))
            await ws.send(rpc(3, "tools/call", {"name": "crash", "arguments": {}}))
            errors = [await recv_json(ws), await recv_json(ws)]
            return errors, await closed_with(ws)

    errors, (code, reason) = run(client())
    assert sorted(e["id"] for e in errors) == [2, 3]
    assert all(e["error"]["code"] == -32000 for e in errors)
    assert code == 1011 and "status 3" in reason
    assert_no_children(gw)


def test_gateway_shutdown_closes_1001(make_gateway):
    """SIGTERM to the gateway: open sockets are closed with 1001 (going away)."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw)) as ws:
            await initialize(ws)
            gw.proc.send_signal(signal.SIGTERM)
            return await closed_with(ws)

    code, _ = run(client())
    assert code == 1001
    gw.proc.wait(15)


# -- handshake: subprotocol and Origin ----------------------------------------------


@pytest.mark.parametrize("asked, got", [(["mcp"], "mcp"), (None, None), (["other", "mcp"], "mcp")])
def test_subprotocol_negotiation(make_gateway, asked, got):
    """``mcp`` is chosen when offered; a client that asks for none is accepted without one."""
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), subprotocols=asked) as ws:
            await ws.send('{"type":"ping"}')
            await ws.recv()
            return ws.subprotocol

    assert run(client()) == got
    assert_no_children(gw)


def test_only_other_subprotocols_is_refused(make_gateway):
    """A client that asks only for subprotocols other than ``mcp`` is refused (406, with the reason)."""
    gw = start(make_gateway)

    async def client():
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(gw), subprotocols=["other"]):
                pass
        return info.value.response

    response = run(client())
    assert response.status_code == 406
    assert "mcp" in response.reason_phrase
    assert_no_children(gw, timeout=1)


@pytest.mark.parametrize("origin, allowed", [
    ("http://evil.example", False),
    ("http://localhost:5173", True),
    ("http://127.0.0.1", True),
])
def test_origin_checked_like_http_transports(make_gateway, origin, allowed):
    """The upgrade request passes the same Guard as /mcp: on a loopback bind `*` means loopback origins only."""
    gw = start(make_gateway, cors={"origins": ["*"]})

    async def client():
        try:
            async with connect(ws_url(gw), origin=origin) as ws:
                await ws.send('{"type":"ping"}')
                return json.loads(await ws.recv())
        except InvalidStatus as e:
            return e.response.status_code

    result = run(client())
    assert result == ({"type": "pong"} if allowed else 403)
    assert_no_children(gw)


def test_configured_cors_origin_is_allowed(make_gateway):
    """An origin listed in ``cors.origins`` may open a socket even on a loopback bind."""
    gw = start(make_gateway, cors={"origins": ["https://app.example"]})

    async def client():
        async with connect(ws_url(gw), origin="https://app.example") as ws:
            await ws.send('{"type":"ping"}')
            return json.loads(await ws.recv())

    assert run(client()) == {"type": "pong"}
    assert_no_children(gw)


# -- keepalive pings and dead peers (a raw socket: nothing answers pings for it) -------


class RawWebSocket:
    """A minimal RFC 6455 client over a blocking socket (masking, no fragmentation)."""

    def __init__(self, port: int, path: str = "/ws", timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed during the handshake"
            head += chunk
        head, _, self._buf = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def recv(self) -> tuple[int, bytes]:
        """The next frame (opcode, payload); EOFError when the gateway dropped the connection."""
        b0, b1 = self._read(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(length)

    def close(self) -> None:
        self.sock.close()


def test_keepalive_pings_at_the_configured_interval(make_gateway):
    """With ``websocket.pingInterval`` 1 s the gateway pings about every second; answered pings keep the session."""
    import httpx

    gw = start(make_gateway, websocket={"pingInterval": 1, "pingTimeout": 1})
    ws = RawWebSocket(gw.port)
    try:
        times = []
        while len(times) < 3:
            opcode, payload = ws.recv()
            assert opcode == 0x9
            times.append(time.monotonic())
            ws.send(0xA, payload)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.5 < g < 2.5 for g in gaps), gaps
        assert httpx.get(f"{gw.url}/health").json()["sessions"] == 1
    finally:
        ws.close()
    assert_no_children(gw)


def test_dead_peer_is_dropped_and_its_child_stopped(make_gateway):
    """A peer that never answers pings is dropped after ``pingTimeout``; its session and child end."""
    gw = start(make_gateway, websocket={"pingInterval": 1, "pingTimeout": 1})
    ws = RawWebSocket(gw.port)
    try:
        assert wait_until(lambda: len(gw.child_pids()) == 1)
        opcode, _ = ws.recv()
        assert opcode == 0x9
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                ws.recv()
    finally:
        ws.close()
    assert_no_children(gw)
    assert "ping timeout" in gw.log()


# -- backpressure: a client that stops reading ----------------------------------


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise KeyError("wchar")


def _blocked_writing(pid: int) -> bool:
    """Some thread of ``pid`` sleeps in a pipe write: its stdout is full."""
    for wchan in glob.glob(f"/proc/{pid}/task/*/wchan"):
        try:
            with open(wchan) as f:
                if "pipe_write" in f.read():
                    return True
        except OSError:
            pass
    return False


class Stalled:
    """True once ``pid`` has sat blocked on its stdout, writing nothing more, for ``hold`` seconds.

    A moment of full pipe happens to any fast writer; staying blocked means nobody reads it.
    """

    def __init__(self, pid: int, hold: float = 1.0):
        self.pid = pid
        self.hold = hold
        self.written = -1
        self.since = time.monotonic()

    def __call__(self) -> bool:
        written = _written(self.pid)
        now = time.monotonic()
        if written != self.written or not _blocked_writing(self.pid):
            self.written, self.since = written, now
            return False
        return now - self.since >= self.hold


def test_slow_reader_pauses_the_child_and_bounds_memory(make_gateway):
    """A client that stops reading while its child streams 50 MB: the child is paused, the
    gateway's memory grows by at most the buffer bound, and nothing is lost once it reads again."""
    count, size = 50, 1024 * 1024
    bound_kb = 16 * 1024
    gw = start(make_gateway)

    async def client():
        async with connect(ws_url(gw), max_size=None, max_queue=1) as ws:
            await initialize(ws)
            [child] = await asyncio.to_thread(gw.child_pids)
            before = _status_kb(gw.proc.pid, "VmRSS")
            await ws.send(rpc(2, "tools/call", {"name": "flood", "arguments": {"count": count, "size": size}}))
            stalled = Stalled(child)
            blocked = await asyncio.to_thread(wait_until, stalled, 30, 0.1)
            peak = _status_kb(gw.proc.pid, "VmHWM")
            now = _status_kb(gw.proc.pid, "VmRSS")
            seqs, result = [], None
            while result is None:
                msg = await recv_json(ws)
                if msg.get("method") == "notifications/message":
                    seqs.append(msg["params"]["data"]["seq"])
                    assert len(msg["params"]["data"]["text"]) == size
                else:
                    result = msg
            return blocked, stalled.written, before, now, peak, seqs, result

    blocked, written, before, now, peak, seqs, result = run(client())
    assert blocked, "the child never stayed blocked on its stdout: the gateway kept reading"
    assert written < count * size / 2, f"the child got {written} bytes out before it was held back"
    assert now - before < bound_kb, f"gateway RSS grew by {now - before} kB"
    assert peak - before < bound_kb, f"gateway peak RSS grew by {peak - before} kB"
    assert seqs == list(range(count))
    assert result["id"] == 2 and result["result"]["content"][0]["text"] == f"flooded {count}"
    assert_no_children(gw)


# -- the official mcp 1.x SDK's websocket_client ----------------------------------------

MCP1_CLIENT = textwrap.dedent('''
    import json, sys
    import anyio
    from mcp import ClientSession
    from mcp.client.websocket import websocket_client

    URL = sys.argv[1]

    async def one(i, out):
        async with websocket_client(URL) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                tools = await session.list_tools()
                result = await session.call_tool("echo", {"text": f"sdk-{i}"})
                out[i] = {"server": init.serverInfo.name, "tools": [t.name for t in tools.tools],
                          "text": result.content[0].text}

    async def main():
        out = {}
        await one(-1, out)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i, out)
        print(json.dumps(out))

    anyio.run(main)
''')


def _mcp1_python() -> str:
    """The venv's python with ``mcp[ws]<2`` (made once, cached, one builder at a time: tests/cache_lock.py); a
    venv or pip failure fails the test."""
    from tests import cache_lock

    def ready(venv: Path) -> bool:
        check = "import mcp.client.websocket, importlib.metadata as m; assert m.version('mcp') < '2'"
        python = venv / "bin" / "python"
        return python.exists() and subprocess.run([str(python), "-c", check], capture_output=True, check=False).returncode == 0

    def build(venv: Path) -> None:
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
        assert made.returncode == 0, f"cannot create a venv: {made.stderr.strip()[-1000:]}"
        # ``python -m pip``: a renamed venv's python still finds its site-packages (its scripts' #! lines would not).
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "mcp[ws]<2"],
                             capture_output=True, text=True, timeout=600, check=False)
        assert pip.returncode == 0, f"pip cannot install mcp[ws]<2: {pip.stderr.strip()[-1000:]}"

    return str(cache_lock.cached(MCP1_VENV, ready, build) / "bin" / "python")


def test_mcp1_sdk_websocket_client(make_gateway, tmp_path):
    """mcp 1.x ``websocket_client``: initialize, list tools, call echo; then 20 concurrent sessions."""
    python = _mcp1_python()
    gw = start(make_gateway)
    script = tmp_path / "mcp1_client.py"
    script.write_text(MCP1_CLIENT)
    proc = subprocess.run([python, str(script), ws_url(gw)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {str(i) for i in range(-1, 20)}
    for i, r in out.items():
        assert r["server"] == "mcpgw-conformance-fixture"
        assert "echo" in r["tools"]
        assert r["text"] == f"sdk-{i}"
    assert_no_children(gw)


# -- wscat (npm) -------------------------------------------------------------


def _wscat() -> str:
    """``wscat`` installed once into a cache directory (one builder at a time: tests/cache_lock.py); skip when
    npm is absent, fail when it cannot install wscat."""
    from tests import cache_lock

    wscat = Path("node_modules") / ".bin" / "wscat"
    npm = shutil.which("npm")

    def build(directory: Path) -> None:
        if npm is None:
            pytest.skip("npm is not installed (wscat is installed with it)")
        (directory / "package.json").write_text('{"private": true}\n')
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "wscat@6"],
                              cwd=directory, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"npm cannot install wscat: {done.stderr.strip()[-1000:]}"

    return str(cache_lock.cached(WSCAT_DIR, lambda d: (d / wscat).exists(), build) / wscat)


def test_wscat_ping_pong_and_jsonrpc_ping(make_gateway):
    """The README's wscat session: ``{"type":"ping"}`` -> pong, a JSON-RPC ping -> its result."""
    wscat = _wscat()
    gw = start(make_gateway)
    proc = subprocess.Popen([wscat, "--no-color", "-c", ws_url(gw)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdin is not None and proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def send(text: str) -> None:
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    def reply(timeout: float = 15.0, skip_pongs: bool = True) -> dict[str, Any]:
        """The next message wscat prints (without a tty for stdout it prints each message as is)."""
        deadline = time.monotonic() + timeout
        while True:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, "wscat exited"
            text = line.strip().lstrip("<> ").strip()
            if text.startswith("{"):
                msg = json.loads(text)
                if not (skip_pongs and msg == {"type": "pong"}):
                    return msg

    def first_pong() -> dict[str, Any]:
        """wscat drops lines typed before its socket opens: ping until the pong comes back."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            send('{"type":"ping"}')
            try:
                return reply(timeout=0.5, skip_pongs=False)
            except queue.Empty:
                continue
        raise AssertionError("wscat printed no pong")

    try:
        assert first_pong() == {"type": "pong"}
        send(rpc(1, "initialize", INIT_PARAMS))
        assert reply()["id"] == 1
        send(rpc(2, "ping"))
        assert reply() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert_no_children(gw)
