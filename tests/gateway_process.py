"""Run a real ``twistd -n mcpgw`` in a subprocess for integration tests."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXTURE_SERVER = HERE / "fixtures" / "conformance_server.py"
#: ``twistd -n --pidfile=`` run by this interpreter (so a venv's plugins are found).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


#: ``--listen`` for a socket handed over as systemd hands one over (socket activation). The gateway cannot tell
#: which address it is bound to, so it treats it as a public bind (mcpgw.tap.listens_on_loopback_only,
#: mcpgw.origin.listen_interface: like ``interface=0.0.0.0``), while the test binds it to 127.0.0.1: the public-bind
#: rules are checked without a public bind.
ACTIVATED_LISTEN = "systemd:domain=INET:index=0"
#: The environment systemd sets beside LISTEN_PID (which ``socket_activated`` sets: it is the child's own pid).
ACTIVATION_ENV = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "activated"}
#: Moves the socket numbered argv[1] to descriptor 3, sets LISTEN_PID to this process, then becomes argv[2:]
#: (the same pid, so the LISTEN_PID check passes).
_ACTIVATE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
             "os.execv(sys.argv[2], sys.argv[2:])")


def loopback_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 and a free port, for ``socket_activated``."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def socket_activated(sock: socket.socket, argv: list[str]) -> list[str]:
    """``argv`` started with ``sock`` as systemd's first socket: run it with ``pass_fds=(sock.fileno(),)`` and
    ACTIVATION_ENV in its environment, and ``--listen ACTIVATED_LISTEN`` among its arguments."""
    return [sys.executable, "-c", _ACTIVATE, str(sock.fileno()), *argv]


def fixture_server(**extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(FIXTURE_SERVER)], **extra}


class Gateway:
    """A gateway process listening on a free loopback port; ``stop()`` ends it and checks it ended."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None, nofile: int | None = None,
                 port: int = 0):
        """``nofile``: the gateway's RLIMIT_NOFILE (soft and hard), for descriptor-exhaustion tests; ``port``:
        the one to listen on, for a test whose config names the gateway's own URL (0: a free one)."""
        config = {"host": "127.0.0.1", "port": 0, **config}
        self._dir = tempfile.TemporaryDirectory(prefix="mcpgw-test-")
        self.config_path = os.path.join(self._dir.name, "gateway.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            # /metrics on a free port too (never the default 9091, which gateways here would share).
            [*TWISTD, "mcpgw", "--config", self.config_path, "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024",
             "--metrics-listen", "tcp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=self._dir.name,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        self.lines: list[str] = []
        level = str(full_env.get("LOG_LEVEL") or config.get("logLevel") or "info").lower()
        if level in QUIET_LEVELS:  # Twisted's "starting on" line is an info line: not written
            threading.Thread(target=self._drain, daemon=True).start()
            self.port = self._wait_for_listening_port()
        else:
            self.port = self._wait_for_port()
            threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                raise RuntimeError("gateway exited before listening:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"GatewaySite starting on (\d+)", line)
            if m:
                return int(m.group(1))
        raise RuntimeError("gateway did not start listening:\n" + "".join(self.lines))

    def _wait_for_listening_port(self) -> int:
        """The port that answers /health among the gateway's listening sockets (/proc)."""
        import httpx

        found: list[int] = []

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway exited before listening:\n" + self.log())
            for port in listening_ports(self.proc.pid):
                try:
                    if b'"status"' in httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).content:
                        found.append(port)
                        return True
                except httpx.HTTPError:
                    continue
            return False

        if not wait_until(listening, timeout=30, interval=0.1):
            raise RuntimeError("gateway did not start listening:\n" + self.log())
        return found[0]

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    def log(self) -> str:
        return "".join(self.lines)

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:PORT/metrics`` once the metrics endpoint has logged its port."""
        found: list[int] = []

        def logged() -> bool:
            for line in list(self.lines):
                m = re.search(r"MetricsSite starting on (\d+)", line)
                if m:
                    found.append(int(m.group(1)))
                    return True
            return False

        if not wait_until(logged, timeout=10):
            raise RuntimeError("the metrics endpoint did not start:\n" + self.log())
        return f"http://127.0.0.1:{found[0]}/metrics"

    def child_pids(self) -> list[int]:
        """Live direct children of the gateway (the MCP servers)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("gateway did not exit within 15 s of SIGTERM") from None
        self._dir.cleanup()
        return self.proc.returncode


#: Log levels at which a gateway does not write Twisted's "GatewaySite starting on N" line.
QUIET_LEVELS = ("warn", "warning", "error", "critical")


def listening_ports(pid: int) -> list[int]:
    """TCP ports process ``pid`` listens on (its socket inodes in /proc/PID/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll an external process's state (never used for in-process timing logic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
