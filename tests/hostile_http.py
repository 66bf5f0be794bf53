"""Raw-socket attackers for the HTTP hostile-client tests (issue 15, findings 1-3): what a client
that does not play by the rules sends, and what it sees back (an answer, EOF, or a reset)."""

from __future__ import annotations

import errno
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tests.hostile import proc_stats, tmp_bytes_held

#: Every gateway-process test config of these modules: auth on, rate limit on (high enough for the
#: legitimate client), so the attacks meet every security feature.
TOKEN = "hostile-legit-token-0123456789"


def secured_config(**extra: Any) -> dict[str, Any]:
    from tests.gateway_process import fixture_server

    return {
        "mcpServers": {"fx": fixture_server()},
        "auth": {"bearerTokens": [{"name": "legit", "token": TOKEN}]},
        "rateLimit": {"enabled": True, "max": 1000000, "window": "15m"},
        **extra,
    }


LEGIT_HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def connect(port: int, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        s.bind((source, 0))  # another loopback address: another client address for the gateway
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


@dataclass
class Outcome:
    """What one attacking connection saw."""

    answer: bytes = b""
    t_answer: float | None = None  # seconds from the start to the first answer byte
    sent: int = 0  # body bytes the kernel took from us
    end: str = "open"  # "eof", "reset", "open" (the deadline passed) or "done" (all sent, still open)
    t_end: float | None = None
    max_tmp_bytes: int = 0
    rss_peak: int = 0

    @property
    def status(self) -> int | None:
        if not self.answer.startswith(b"HTTP/1.1 "):
            return None
        return int(self.answer[9:12])


@dataclass
class BodyFlood:
    """One connection that sends ``head`` then ``total`` bytes of body as fast as the gateway takes
    them, reading whatever comes back meanwhile, until the gateway closes or ``deadline`` passes."""

    port: int
    head: bytes
    total: int
    chunked: bool = False
    pid: int | None = None
    sock: socket.socket = field(init=False)
    outcome: Outcome = field(default_factory=Outcome)

    def __post_init__(self) -> None:
        self.sock = connect(self.port)
        self.sock.setblocking(False)
        self._pending = self.head
        self._started = time.monotonic()
        self._left = self.total
        self._done = False

    def _next_piece(self) -> bytes:
        if self._left > 0:
            size = min(65536, self._left)
            self._left -= size
            data = b"x" * size
            return b"%x\r\n%s\r\n" % (size, data) if self.chunked else data
        if self.chunked and self._left == 0:
            self._left = -1
            return b"0\r\n\r\n"
        return b""

    def step(self) -> bool:
        """One round of reading and sending; False once this connection is over."""
        if self._done:
            return False
        now = time.monotonic() - self._started
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return self._end("eof", now)
                if self.outcome.t_answer is None:
                    self.outcome.t_answer = now
                self.outcome.answer += data
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return self._end("reset", now)
        try:
            while True:
                if not self._pending:
                    self._pending = self._next_piece()
                    if not self._pending:
                        break
                n = self.sock.send(self._pending)
                self.outcome.sent += n
                self._pending = self._pending[n:]
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return self._end("reset", now)
        return True

    def _end(self, how: str, now: float) -> bool:
        self._done = True
        self.outcome.end, self.outcome.t_end = how, now
        self.sock.close()
        return False

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.sock.close()


def run_floods(floods: list[BodyFlood], pid: int, deadline: float) -> list[Outcome]:
    """Drive every flood until each is over or ``deadline`` seconds pass; sample the gateway's
    temporary-file bytes and RSS throughout."""
    started = time.monotonic()
    live = list(floods)
    max_tmp = rss_peak = 0
    while live and time.monotonic() - started < deadline:
        socks = [f.sock for f in live]
        select.select(socks, socks, [], 0.05)
        live = [f for f in live if f.step()]
        max_tmp = max(max_tmp, tmp_bytes_held(pid))
        rss_peak = max(rss_peak, proc_stats(pid).rss)
    for f in live:
        f.outcome.end = "open"
        f.close()
    for f in floods:
        f.outcome.max_tmp_bytes, f.outcome.rss_peak = max_tmp, rss_peak
    return [f.outcome for f in floods]


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything the gateway sends until it closes: (bytes, "eof" | "reset" | "open")."""
    s.settimeout(timeout)
    got = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return got, "eof"
            got += data
    except ConnectionResetError:
        return got, "reset"
    except TimeoutError:
        return got, "open"
    except OSError as e:
        if e.errno == errno.ECONNRESET:
            return got, "reset"
        raise


def closed_by_peer(s: socket.socket) -> str | None:
    """"eof" or "reset" if the gateway has closed ``s`` (without blocking), else None."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return "eof"
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def report(*lines: str) -> None:
    """The measured figures, on the test's output (pytest -s) and in its failure report."""
    for line in lines:
        sys.stderr.write(line + "\n")
