"""A private ``redis-server`` for tests: a free loopback port, no persistence, killed at the end.

Never the machine's Redis on 6379: every server here is started from the
binary on a port the kernel picked, with ``--save "" --appendonly no`` (so a
restart starts empty, like a Redis that lost its data), optionally with
``--requirepass``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REDIS_SERVER = shutil.which("redis-server") or next(
    (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; ``stop()``/``kill()``/``restart()`` keep the same port and password."""

    def __init__(self, password: str | None = None, port: int | None = None, tls: bool = False):
        if REDIS_SERVER is None:
            raise RuntimeError("no redis-server binary (apt-get install redis-server; .ci/run does)")
        self.password = password
        self.port = port or free_port()
        self.tls = tls
        self._dir = tempfile.TemporaryDirectory(prefix="mcpgw-redis-")
        self.ca_file = os.path.join(self._dir.name, "cert.pem")
        if tls:
            # A self-signed certificate for localhost and 127.0.0.1; it is its own CA.
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                 "-keyout", os.path.join(self._dir.name, "key.pem"), "-out", self.ca_file],
                check=True, capture_output=True,
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int = 0, password: bool = False) -> str:
        auth = f":{self.password}@" if password and self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning", "--protected-mode", "no",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", self.ca_file, "--tls-key-file", os.path.join(self._dir.name, "key.pem"),
                     "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                if self._ping():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def _ping(self) -> bool:
        if self.tls:
            import ssl

            context = ssl.create_default_context(cafile=self.ca_file)
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as s:
                if self.password:
                    s.sendall(self._command("AUTH", self.password))
                    s.recv(256)
                s.sendall(self._command("PING"))
                return s.recv(256).startswith(b"+PONG")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            if self.password:
                s.sendall(self._command("AUTH", self.password))
                s.recv(256)
            s.sendall(self._command("PING"))
            return s.recv(256).startswith(b"+PONG")

    @staticmethod
    def _command(*args: str) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def command(self, *args: str, db: int = 0) -> bytes:
        """One command over a fresh socket (on database ``db``); the raw RESP reply (for test assertions)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if self.password:
                s.sendall(self._command("AUTH", self.password))
                s.recv(256)
            if db:
                s.sendall(self._command("SELECT", str(db)))
                s.recv(256)
            s.sendall(self._command(*args))
            s.settimeout(0.5)
            chunks = []
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except TimeoutError:
                pass
            return b"".join(chunks)

    def wait_for_key(self, pattern: str, timeout: float) -> bool:
        """Block until a key matching ``pattern`` exists on database 0, at most ``timeout`` seconds: woken by a
        keyspace notification (Redis tells when the key is written), never by polling."""
        assert not self.tls, "plain connections only"
        self.command("CONFIG", "SET", "notify-keyspace-events", "KA")
        deadline = time.monotonic() + timeout
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            if self.password:
                s.sendall(self._command("AUTH", self.password))
                s.recv(256)
            s.sendall(self._command("PSUBSCRIBE", f"__keyspace@0__:{pattern}"))
            received = b""
            while not received.endswith(b":1\r\n"):  # the subscription's confirmation
                received += s.recv(4096)
            # Written before the subscription: already there (KEYS answers "*0" when nothing matches).
            if not self.command("KEYS", pattern).startswith(b"*0\r\n"):
                return True
            received = b""
            while b"pmessage" not in received:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                s.settimeout(remaining)
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    return False
                if not chunk:
                    return False
                received += chunk
            return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the clients see their connections drop at once."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """Kill and start again on the same port: an empty Redis (no persistence)."""
        self.kill()
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
