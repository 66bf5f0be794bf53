"""Issue 7: the project's nginx configuration, run by the real nginx in front of a real gateway.

The files are the project's own (``nginx/nginx.conf``, ``nginx/conf.d/*.conf``,
``nginx/snippets/*``), copied into a temporary prefix. One template step,
``render_site()``, changes only the upstream server (``mcp-gateway:3000`` -> the
test gateway's loopback port) and the ``listen`` ports (80/443 -> free loopback
ports); nothing else. The TLS certificate is made by the project's
``scripts/make-self-signed-cert.sh`` (openssl) for this run.

Through nginx, over HTTP and over HTTPS: the first SSE event arrives while the
stream is still open (no buffering), a Streamable HTTP tool call, a WebSocket
upgrade with ping/pong and a tool call, ``/health``; and the client's Host
header reaches the gateway (which, bound to 127.0.0.1, refuses non-loopback names).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_process import fixture_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "nginx"
CERT_SCRIPT = ROOT / "scripts" / "make-self-signed-cert.sh"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)

if NGINX is None:
    pytest.skip("no nginx binary (apt-get install nginx; .ci/run does)", allow_module_level=True)
if shutil.which("openssl") is None:
    pytest.skip("no openssl to make the test certificate", allow_module_level=True)

#: The upstream line of nginx/conf.d/default.conf (the compose service name and port).
UPSTREAM = re.compile(r"(?m)^(?P<indent>[ \t]*)server[ \t]+mcp-gateway:3000\b(?P<rest>[^;\n]*);")
LISTEN = re.compile(r"(?m)^(?P<head>[ \t]*listen[ \t]+)(?P<port>80|443)\b")

INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "nginx-test", "version": "1"}}
MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def render_site(text: str, gateway_ports: list[int], http_port: int, https_port: int) -> tuple[str, int, int]:
    """The template step: upstream servers and listen ports, nothing else.

    ``server mcp-gateway:3000 ARGS;`` becomes one ``server 127.0.0.1:PORT ARGS;``
    per gateway port; ``listen 80``/``listen 443`` become ``listen
    127.0.0.1:PORT`` (the rest of the line, ``ssl http2 default_server``, kept).
    Returns the text and how many upstream and listen lines were rewritten.
    """

    def upstream(m: re.Match[str]) -> str:
        return "\n".join(f"{m['indent']}server 127.0.0.1:{p}{m['rest']};" for p in gateway_ports)

    def listen(m: re.Match[str]) -> str:
        port = http_port if m["port"] == "80" else https_port
        return f"{m['head']}127.0.0.1:{port}"

    text, n_upstream = UPSTREAM.subn(upstream, text)
    text, n_listen = LISTEN.subn(listen, text)
    return text, n_upstream, n_listen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prefix(prefix: Path, gateway_ports: list[int], http_port: int, https_port: int) -> Path:
    """The project's nginx files in ``prefix`` (conf.d rendered), a fresh certificate; returns nginx.conf."""
    shutil.copy(NGINX_DIR / "nginx.conf", prefix / "nginx.conf")
    shutil.copytree(NGINX_DIR / "snippets", prefix / "snippets")
    (prefix / "auth").mkdir()
    (prefix / "conf.d").mkdir()
    upstreams = listens = 0
    for conf in sorted((NGINX_DIR / "conf.d").glob("*.conf")):
        text, n_up, n_listen = render_site(conf.read_text(), gateway_ports, http_port, https_port)
        upstreams += n_up
        listens += n_listen
        (prefix / "conf.d" / conf.name).write_text(text)
    assert upstreams == 1, f"expected one `server mcp-gateway:3000` line in nginx/conf.d, rewrote {upstreams}"
    assert listens == 2, f"expected `listen 80` and `listen 443` in nginx/conf.d, rewrote {listens}"
    made = subprocess.run(["sh", str(CERT_SCRIPT), str(prefix / "certs"), "localhost"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return prefix / "nginx.conf"


class Nginx:
    """A foreground nginx master on a temporary prefix; ``stop()`` ends it and its workers."""

    def __init__(self, prefix: Path, conf: Path):
        self.prefix = prefix
        self.pid_file = prefix / "nginx.pid"
        self.out = prefix / "stdout.log"
        self.err = prefix / "stderr.log"
        self.argv = [
            NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log"),
            "-g", f"pid {self.pid_file}; daemon off;",
        ]
        checked = subprocess.run([*self.argv, "-t"], capture_output=True, text=True)
        assert checked.returncode == 0, f"nginx -t rejected the project's config:\n{checked.stderr}"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        parts = []
        for f in (self.err, self.prefix / "error.log", self.out):
            if f.exists():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')}")
        return "\n".join(parts)

    def wait_listening(self, *ports: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(ports)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    pending.discard(port)
                except OSError:
                    pass
            time.sleep(0.05)
        assert not pending, f"nginx is not listening on {sorted(pending)}:\n{self.log()}"

    def workers(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        workers = self.workers()
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            raise AssertionError(f"nginx did not stop within 10 s of SIGTERM:\n{self.log()}") from None


class Stack:
    def __init__(self, gateway: Any, nginx: Nginx, http_port: int, https_port: int, ca: Path):
        self.gateway = gateway
        self.nginx = nginx
        self.ports = {"http": http_port, "https": https_port}
        self.ca = ca

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def base(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.ports[scheme]}"

    def client(self, scheme: str, **kw: Any) -> httpx.Client:
        verify: Any = self.ssl_context() if scheme == "https" else True
        return httpx.Client(base_url=self.base(scheme), verify=verify, timeout=httpx.Timeout(10.0, read=5.0), **kw)

    def ws_url(self, scheme: str, path: str = "/ws") -> str:
        return f"{'wss' if scheme == 'https' else 'ws'}://127.0.0.1:{self.ports[scheme]}{path}"


@pytest.fixture(scope="module")
def stack(make_module_gateway, tmp_path_factory) -> Iterator[Stack]:
    # A long keepalive: no `: ping` comment can push a buffered event out; only an unbuffered proxy
    # delivers the first event in time.
    gateway = make_module_gateway({"mcpServers": {"fx": fixture_server()}, "sse": {"keepalive": 120}})
    prefix = tmp_path_factory.mktemp("nginx")
    http_port, https_port = free_port(), free_port()
    conf = make_prefix(prefix, [gateway.port], http_port, https_port)
    nginx = Nginx(prefix, conf)
    try:
        nginx.wait_listening(http_port, https_port)
        yield Stack(gateway, nginx, http_port, https_port, prefix / "certs" / "server.crt")
    finally:
        nginx.stop()


SCHEMES = ["http", "https"]


def test_render_site_changes_only_upstream_and_listen_ports():
    """The template step rewrites the upstream and listen lines and leaves every other line alone."""
    for conf in sorted((NGINX_DIR / "conf.d").glob("*.conf")):
        original = conf.read_text().splitlines()
        rendered, _, _ = render_site(conf.read_text(), [4001], 8081, 8444)
        assert len(rendered.splitlines()) == len(original)
        for before, after in zip(original, rendered.splitlines()):
            if before != after:
                assert UPSTREAM.search(before) or LISTEN.search(before), f"{conf.name}: changed {before!r}"
    text, n_up, n_listen = render_site((NGINX_DIR / "conf.d" / "default.conf").read_text(), [4001, 4002], 8081, 8444)
    assert (n_up, n_listen) == (1, 1)
    assert "server 127.0.0.1:4001 max_fails" in text and "server 127.0.0.1:4002 max_fails" in text
    assert "listen 127.0.0.1:8081 default_server;" in text
    assert "mcp-gateway" not in re.sub(r"#.*", "", text)
    ssl_text, _, _ = render_site((NGINX_DIR / "conf.d" / "ssl.conf").read_text(), [4001], 8081, 8444)
    assert "listen 127.0.0.1:8444 ssl http2 default_server;" in ssl_text


@pytest.mark.parametrize("scheme", SCHEMES)
def test_health(stack: Stack, scheme: str):
    """``/health`` passes through nginx."""
    with stack.client(scheme) as c:
        r = c.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "healthy" and "uptime" in body
    assert r.headers.get("server") == "nginx"  # server_tokens off: no version


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sse_first_event_arrives_while_stream_is_open(stack: Stack, scheme: str):
    """``GET /sse``: ``event: endpoint`` arrives at once, the stream stays open and carries the replies."""
    with stack.client(scheme) as c:
        started = time.monotonic()
        with c.stream("GET", "/sse", headers={"accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in stream.headers
            lines = stream.iter_lines()
            event: dict[str, str] = {}
            try:
                for line in lines:
                    if line == "" and event:
                        break
                    if line.startswith(("event:", "data:")):
                        k, _, v = line.partition(":")
                        event[k] = v.strip()
            except httpx.ReadTimeout:
                pytest.fail(f"no SSE event through nginx within 5 s ({scheme}): nginx buffers the stream")
            elapsed = time.monotonic() - started
            # The event came while the response is still being streamed (not at its end).
            assert not stream.is_closed
            assert event.get("event") == "endpoint", event
            assert event["data"].startswith("/messages?sessionId="), event
            assert elapsed < 5.0

            # The open stream carries the reply to a POST made through nginx.
            posted = c.post(event["data"], json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
            assert posted.status_code == 202, posted.text
            reply: dict[str, str] = {}
            for line in lines:
                if line == "" and reply.get("event") == "message":
                    break
                if line.startswith(("event:", "data:")):
                    k, _, v = line.partition(":")
                    reply[k] = v.strip()
            message = json.loads(reply["data"])
            assert message["id"] == 1 and message["result"]["serverInfo"]["name"] == "mcpgw-conformance-fixture"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_streamable_http_tool_call(stack: Stack, scheme: str):
    """``/mcp``: initialize, initialized, tools/call echo, DELETE, all through nginx."""
    with stack.client(scheme) as c:
        init = c.post("/mcp", headers=MCP_HEADERS, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
        assert init.status_code == 200, init.text
        sid = init.headers["mcp-session-id"]
        assert init.json()["result"]["serverInfo"]["name"] == "mcpgw-conformance-fixture"
        headers = {**MCP_HEADERS, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        note = c.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202, note.text
        text = f"through nginx over {scheme}"
        call = c.post("/mcp", headers=headers, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}},
        })
        assert call.status_code == 200, call.text
        assert call.json() == {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": text}]}}
        gone = c.delete("/mcp", headers=headers)
        assert gone.status_code in (200, 204), gone.text


@pytest.mark.parametrize("scheme", SCHEMES)
def test_websocket_ping_pong_and_tool_call(stack: Stack, scheme: str):
    """``/ws`` through nginx: the upgrade (subprotocol ``mcp``), ``{"type":"ping"}`` -> pong, an echo call."""
    from websockets.asyncio.client import connect

    async def client() -> None:
        kw: dict[str, Any] = {"ssl": stack.ssl_context()} if scheme == "https" else {}
        async with connect(stack.ws_url(scheme), subprotocols=["mcp"], open_timeout=10, **kw) as ws:
            assert ws.subprotocol == "mcp"
            await ws.send('{"type":"ping"}')
            assert json.loads(await ws.recv()) == {"type": "pong"}
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}))
            assert json.loads(await ws.recv())["id"] == 1
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            await ws.send(json.dumps({
                "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "ws"}},
            }))
            assert json.loads(await ws.recv()) == {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "ws"}]}}

    asyncio.run(asyncio.wait_for(client(), 30))


def test_host_header_reaches_the_gateway(stack: Stack):
    """nginx sends the client's Host (``$host``): a loopback-bound gateway serves 127.0.0.1, refuses other names."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    with stack.client("http") as c:
        ok = c.post("/mcp", headers=MCP_HEADERS, json=body)
        assert ok.status_code == 200, ok.text
        refused = c.post("/mcp", headers={**MCP_HEADERS, "host": "mcp.example.com"}, json=body)
        assert refused.status_code == 403, refused.text
        assert "invalid Host header" in refused.text
        # /health is not guarded: any Host.
        assert c.get("/health", headers={"host": "mcp.example.com"}).status_code == 200
        c.delete("/mcp", headers={**MCP_HEADERS, "mcp-session-id": ok.headers["mcp-session-id"]})


def test_tls_versions_and_http2(stack: Stack):
    """The HTTPS server offers HTTP/2 by ALPN and speaks TLS 1.2 and 1.3."""
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = stack.ssl_context()
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", stack.ports["https"]), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
                assert tls.selected_alpn_protocol() == "h2"


def test_nginx_logged_no_errors(stack: Stack):
    """After the traffic above, nginx's logs have no [error]/[crit]/[alert]/[emerg] lines.

    Except ``worker_rlimit_nofile 65535`` failing where the test's own hard limit is lower
    (the compose file raises the container's limit to match).
    """
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    bad = [
        line for line in stack.nginx.log().splitlines()
        if re.search(r"\[(error|crit|alert|emerg)\]", line)
        and not ("setrlimit(RLIMIT_NOFILE, 65535)" in line and hard != resource.RLIM_INFINITY and hard < 65535)
    ]
    assert not bad, "\n".join(bad)
