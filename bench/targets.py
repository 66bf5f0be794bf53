"""What the bench measures: the gateways (mcpgw and the peers) as processes on loopback ports.

Each Target starts its process(es) on free 127.0.0.1 ports the bench picks,
says how to make a client for each transport it has, and stops (and reaps)
everything it started.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.clients import DirectClient, LegacySseClient, StreamableClient, WsClient, echo_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
LOOPBACK_JS = HERE / "loopback.cjs"
PEERS_DIR = Path(os.environ.get("MCPGW_BENCH_PEERS", Path.home() / ".cache" / "mcpgw-bench-peers"))
SUPERGATEWAY_VERSION = "4.0.0"
MCP_PROXY_VERSION = "0.13.0"
#: Open files for the gateways (and the bench): every idle stream is a socket,
#: and in mcpgw also a child's three pipes.
NOFILE = 200_000


def free_port() -> int:
    """A port nothing listens on now (bound and released on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(want, int(f.read()))
    except OSError:
        pass
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_children(pid: int) -> int | None:
    """How many child processes ``pid`` has (all its threads'), from /proc; None if it cannot tell."""
    try:
        count = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                count += len(f.read().split())
        return count
    except OSError:
        return None


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Process:
    """One server process: started in its own process group, stopped with its whole group."""

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str] | None = None, cwd: str | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    r.read()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # Whatever is left of its group (children of a killed peer).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def command(self) -> str:
        return shlex.join(self.argv)


class Target:
    """A gateway under test (or the direct pipes)."""

    name = "?"
    version = ""
    transports: tuple[str, ...] = ()
    #: File descriptors the gateway holds per idle SSE stream.
    fds_per_idle_stream = 1

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.processes: list[Process] = []
        self.commands: list[str] = []
        self.notes: list[str] = []

    def start(self) -> None:
        pass

    def client(self, transport: str) -> Any:
        raise NotImplementedError

    def pid(self, transport: str) -> int | None:
        return None

    def idle_stream(self) -> tuple[Callable[[], LegacySseClient], int]:
        """A fresh process for the idle-stream workload: (client factory, pid to watch)."""
        raise NotImplementedError

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, health: str | None = None,
               timeout: float = 60.0) -> Process:
        # cwd: the scratch folder, not the checkout (``python -c`` puts the cwd first on sys.path,
        # which would load the checkout's mcpgw over a ``bench.ab --before`` copy).
        p = Process(name, argv, os.path.join(self.workdir, f"{name}.log"), env=env, cwd=self.workdir)
        self.processes.append(p)
        self.commands.append(p.command())
        if health:
            p.wait_http(health, timeout)
        return p

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes = []


class Direct(Target):
    """The floor: the bench drives the echo server over its pipes itself."""

    name = "direct"
    transports = ("pipe",)

    def start(self) -> None:
        self.version = f"Python {sys.version.split()[0]}"
        self.commands.append(shlex.join(echo_command()) + "   # spawned by the bench, driven over its pipes")

    def client(self, transport: str) -> DirectClient:
        return DirectClient()


def _mcpgw_config(port: int, servers: dict[str, Any], log_level: str = "info",
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "host": HOST,
        "port": port,
        "logLevel": log_level,
        "session": {"maxAge": 3_600_000},
        "sse": {"keepalive": 15},
        "mcpServers": servers,
        **(extra or {}),
    }


class Mcpgw(Target):
    name = "mcpgw"
    transports = ("streamable", "streamable-sse", "sse", "ws")
    # The client socket: a legacy SSE session's child is started by its first message, and an
    # idle stream sends none (before that: 4, with the child's stdin, stdout and stderr pipes).
    fds_per_idle_stream = 1

    def __init__(self, workdir: str, log_level: str = "info", name: str = "mcpgw", pythonpath: str | None = None,
                 warm_pool: int = 0, pool_size: int = 0, environ: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None):
        super().__init__(workdir)
        self.name = name
        #: Top-level config sections besides the bench's own (``tracing``: bench.ab --tracing).
        self.config = config or {}
        #: The echo server's ``warmPool`` (pre-spawned children); 0: off.
        self.warm_pool = warm_pool
        if warm_pool:
            self.transports = ("streamable",)
            self.setup_only = True
        #: The echo server as ``"sessions": "pooled"`` with this ``poolSize`` (every session shares
        #: its children, like supergateway's SSE and WebSocket modes); 0: one child per session.
        self.pool_size = pool_size
        if pool_size:
            self.transports = ("streamable", "sse", "ws")
            self.throughput_only = True
        self.log_level = log_level
        #: Another copy of the mcpgw package to run (a before/after comparison).
        self.pythonpath = pythonpath
        #: Environment of this gateway besides the bench's own (``MCPGW_FAST_PATHS=0``: the public paths).
        self.environ = environ or {}
        self.port = 0
        self.main: Process | None = None
        import mcpgw
        import twisted

        self.version = f"{mcpgw.__version__} (Twisted {twisted.__version__})" + (f" from {pythonpath}" if pythonpath else "")

    def _twistd(self, name: str, servers: dict[str, Any]) -> tuple[Process, int]:
        port = free_port()
        cfg = os.path.join(self.workdir, f"{name}.json")
        with open(cfg, "w") as f:
            json.dump(_mcpgw_config(port, servers, self.log_level, self.config), f, indent=1)
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "mcpgw", "--config", cfg,
                "--listen", f"tcp:{port}:interface={HOST}", "--metrics-listen", f"tcp:0:interface={HOST}"]
        with open(cfg) as f:
            self.notes.append(f"{name} config: `{json.dumps(json.load(f))}`")
        env = {**os.environ, **self.environ}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([self.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return self._spawn(name, argv, env=env, health=f"http://{HOST}:{port}/health"), port

    def start(self) -> None:
        cmd = echo_command()
        echo: dict[str, Any] = {"command": cmd[0], "args": cmd[1:], "default": True}
        if self.warm_pool:
            echo["warmPool"] = self.warm_pool
        if self.pool_size:
            echo.update(sessions="pooled", poolSize=self.pool_size)
        self.main, self.port = self._twistd(self.name, {"echo": echo})

    def client(self, transport: str) -> Any:
        if transport in ("streamable", "streamable-sse"):
            return StreamableClient(HOST, self.port, "/mcp")
        if transport == "sse":
            return LegacySseClient(HOST, self.port, "/sse")
        if transport == "ws":
            return WsClient(HOST, self.port, "/ws")
        raise KeyError(transport)

    def pid(self, transport: str) -> int | None:
        return self.main.pid if self.main else None

    def idle_stream(self) -> tuple[Callable[[], LegacySseClient], int]:
        # Each legacy SSE stream is a session whose child is started by its first message, which
        # an idle stream never sends; ``cat`` stands in for the MCP server all the same (a gateway
        # that spawned per stream would otherwise start ~10,000 interpreters).
        cat = shutil.which("cat") or "/bin/cat"
        proc, port = self._twistd(f"{self.name}-idle", {"idle": {"command": cat, "default": True}})
        return (lambda: LegacySseClient(HOST, port, "/sse")), proc.pid


# -- peers --------------------------------------------------------------------


def install_peers(log: Callable[[str], None]) -> dict[str, str]:
    """Install supergateway (npm) and mcp-proxy (PyPI) into PEERS_DIR; {name: problem} for what failed."""
    problems: dict[str, str] = {}
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    sg = PEERS_DIR / "npm" / "node_modules" / "supergateway" / "dist" / "index.js"
    if not sg.exists():
        npm = shutil.which("npm")
        if npm is None:
            problems["supergateway"] = "npm not found"
        else:
            log(f"installing supergateway@{SUPERGATEWAY_VERSION} into {PEERS_DIR / 'npm'}")
            r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(PEERS_DIR / "npm"),
                                f"supergateway@{SUPERGATEWAY_VERSION}"], capture_output=True, text=True)
            if r.returncode != 0 or not sg.exists():
                problems["supergateway"] = f"npm install failed: {r.stderr.strip()[-300:]}"
    venv = PEERS_DIR / "venv"
    mp = venv / "bin" / "mcp-proxy"
    if not mp.exists():
        log(f"installing mcp-proxy=={MCP_PROXY_VERSION} into {venv}")
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode == 0:
            r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"mcp-proxy=={MCP_PROXY_VERSION}"],
                               capture_output=True, text=True)
        if r.returncode != 0 or not mp.exists():
            problems["mcp-proxy"] = f"install failed: {r.stderr.strip()[-300:]}"
    return problems


class Supergateway(Target):
    """supergateway: one process per output transport, all bound to 127.0.0.1 (preloaded loopback.cjs)."""

    name = "supergateway"
    transports = ("streamable", "sse", "ws")
    OUTPUT = {"streamable": ["--outputTransport", "streamableHttp", "--stateful"],
              "sse": ["--outputTransport", "sse"],
              "ws": ["--outputTransport", "ws"]}

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.index = PEERS_DIR / "npm" / "node_modules" / "supergateway" / "dist" / "index.js"
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Process] = {}
        self.version = SUPERGATEWAY_VERSION
        try:
            with open(self.index.parent.parent / "package.json") as f:
                self.version = json.load(f)["version"]
        except OSError:
            pass
        self.node = shutil.which("node") or "node"

    def _launch(self, transport: str, tag: str) -> tuple[Process, int]:
        port = free_port()
        argv = [self.node, "--require", str(LOOPBACK_JS), str(self.index), "--stdio", shlex.join(echo_command()),
                "--port", str(port), "--logLevel", "none", *self.OUTPUT[transport]]
        # The ws output answers HTTP only on its health endpoint.
        argv += ["--healthEndpoint", "/healthz"]
        p = self._spawn(f"supergateway-{tag}", argv, env={**os.environ}, health=f"http://{HOST}:{port}/healthz")
        return p, port

    def start(self) -> None:
        if not self.index.exists():
            raise RuntimeError(f"supergateway is not installed in {self.index.parent.parent}")

    def _ensure(self, transport: str) -> int:
        if transport not in self.procs:
            self.procs[transport], self.ports[transport] = self._launch(transport, transport)
        return self.ports[transport]

    def client(self, transport: str) -> Any:
        port = self._ensure(transport)
        if transport == "streamable":
            return StreamableClient(HOST, port, "/mcp")
        if transport == "sse":
            return LegacySseClient(HOST, port, "/sse")
        if transport == "ws":
            return WsClient(HOST, port, "/message")
        raise KeyError(transport)

    def pid(self, transport: str) -> int | None:
        p = self.procs.get(transport)
        return p.pid if p else None

    def idle_stream(self) -> tuple[Callable[[], LegacySseClient], int]:
        proc, port = self._launch("sse", "idle")
        return (lambda: LegacySseClient(HOST, port, "/sse")), proc.pid


class McpProxy(Target):
    """mcp-proxy (PyPI): one process, one shared child, ``/sse`` and ``/mcp``."""

    name = "mcp-proxy"
    transports = ("streamable", "sse")

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.venv = PEERS_DIR / "venv"
        self.port = 0
        self.main: Process | None = None
        self.version = MCP_PROXY_VERSION
        try:
            r = subprocess.run([str(self.venv / "bin" / "python"), "-c",
                                "import importlib.metadata as m; print(m.version('mcp-proxy'))"], capture_output=True, text=True)
            if r.returncode == 0:
                self.version = r.stdout.strip()
        except OSError:
            pass

    def _launch(self, tag: str) -> tuple[Process, int]:
        port = free_port()
        argv = [str(self.venv / "bin" / "python"), str(self.venv / "bin" / "mcp-proxy"), "--host", HOST, "--port", str(port),
                "--log-level", "WARNING", *echo_command()]
        p = self._spawn(tag, argv, env={**os.environ}, health=f"http://{HOST}:{port}/status")
        return p, port

    def start(self) -> None:
        if not (self.venv / "bin" / "mcp-proxy").exists():
            raise RuntimeError(f"mcp-proxy is not installed in {self.venv}")
        self.main, self.port = self._launch("mcp-proxy")

    def client(self, transport: str) -> Any:
        if transport == "streamable":
            return StreamableClient(HOST, self.port, "/mcp/", delete=True)
        if transport == "sse":
            return LegacySseClient(HOST, self.port, "/sse")
        raise KeyError(transport)

    def pid(self, transport: str) -> int | None:
        return self.main.pid if self.main else None

    def idle_stream(self) -> tuple[Callable[[], LegacySseClient], int]:
        proc, port = self._launch("mcp-proxy-idle")
        return (lambda: LegacySseClient(HOST, port, "/sse")), proc.pid


def mkworkdir() -> str:
    return tempfile.mkdtemp(prefix="mcpgw-bench-")
