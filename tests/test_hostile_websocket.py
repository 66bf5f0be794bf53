"""Issue 15, finding 4: a WebSocket peer that floods frames and never reads.

Each one-byte invalid text frame (7 bytes on the wire) costs the gateway a parse and a
-32700 reply of about 80 bytes; a refused one a 429 reply; a ping control frame a pong.
Without backpressure on those replies the gateway reads on and queues them in memory
for as long as the socket is open. What must hold, against a real ``twistd mcpgw`` with
authentication and rate limiting on, while a legitimate SDK client keeps calling ``echo``
over Streamable HTTP on the same gateway:

- garbage is refused after ``websocket.maxErrors`` (100) invalid messages in a row with
  close code 1008 (RFC 6455 section 7.4.1, policy violation), and the gateway drops the
  TCP connection when the closing handshake times out: the 600,000-frame flood ends
  within seconds;
- with that budget off, every reply the gateway writes (-32700, 429, pong) counts toward
  backpressure: once its write buffer is over the high-water mark the gateway stops
  reading the socket (the bytes wait in the kernel, unread), its memory stays flat, and
  the keepalive ping timeout drops the peer (its pong is never read).

The attacker is a raw socket speaking RFC 6455 framing with a small receive buffer, so
the gateway's replies back up into its own process at once rather than into the
kernel's buffers.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

import pytest

from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.hostile import LegitClient, proc_stats

pytestmark = pytest.mark.integration

LEGIT_TOKEN = "legit-client-token-0123456789"
MALLORY_TOKEN = "mallory-token-0123456789abcdef"
MASK = b"\x5a\xa5\x3c\xc3"
#: The attack of the issue: this many frames, each a whole masked text frame of one byte.
FRAMES = 600_000
#: One byte that is not JSON, as a masked client text frame (RFC 6455 section 5.2): 7 bytes.
GARBAGE = bytes((0x81, 0x81)) + MASK + bytes((ord("x") ^ MASK[0],))
#: A ping control frame with the largest payload (opcode 9, 125 bytes, masked): 131 bytes,
#: answered with a pong of 127 bytes by Autobahn's own code (control frames never take the
#: fast path). Empty pings cost CPU rather than memory: their 2-byte pongs fit in the kernel's
#: buffers, so they never reach the high-water mark.
PING_FRAME = bytes((0x89, 0x80 | 125)) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(b"p" * 125))
#: The attacker's receive buffer: the kernel's minimum, so replies back up into the gateway.
ATTACKER_RCVBUF = 4096
#: The attacker's send buffer: small, so what it manages to send is what the gateway took in.
ATTACKER_SNDBUF = 65536
#: Seconds without any progress sending after which the gateway counts as not reading.
STALL = 2.0
#: Bound on each flood, seconds (the attack loops are bounded in count and in time).
FLOOD_TIME = 30.0
#: RSS growth allowed over a whole attack. The gateway answers at most what fits in its
#: write buffer's high-water mark (64 KiB) plus one socket read (64 KiB of input: about
#: 9,400 one-byte frames, about 1 MiB of replies) before it stops reading; 16 MiB also
#: leaves room for the legitimate client's own allocations and the allocator's slack, and
#: is a seventh of the +109 MiB the unbounded gateway held (it grows with every frame read).
RSS_BOUND = 16 << 20
TCP_ESTABLISHED = 1


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def gateway_config(websocket: dict[str, Any] | None = None, rate_max: int = 1_000_000) -> dict[str, Any]:
    """Every security feature on: bearer tokens (a legitimate identity and the attacker's) and
    rate limiting per identity, so the attacker's hits never count against the legitimate client."""
    return {
        "mcpServers": {"fx": fixture_server()},
        "auth": {"bearerTokens": [{"name": "legit", "token": LEGIT_TOKEN},
                                  {"name": "mallory", "token": MALLORY_TOKEN}]},
        "rateLimit": {"enabled": True, "max": rate_max, "window": "1h"},
        "websocket": websocket or {},
    }


class RawWebSocket:
    """A client that speaks the framing by hand (so it can flood without reading)."""

    def __init__(self, port: int, token: str, rcvbuf: int | None = ATTACKER_RCVBUF, path: str = "/ws"):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ATTACKER_SNDBUF)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.local_port = self.sock.getsockname()[1]
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mcp\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode())
        self.sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "the gateway closed the upgrade: %r" % head
            head += chunk
        head, _, self.pending = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def flood(self, data: bytes) -> tuple[int, float, str]:
        """Send ``data`` without reading until it is all sent, the gateway stops taking it
        (no progress for STALL seconds), the connection fails, or FLOOD_TIME passes.
        (bytes sent, seconds, how it ended)."""
        self.sock.setblocking(False)
        view = memoryview(data)
        sent = 0
        started = time.monotonic()
        last_progress = started
        while sent < len(data):
            now = time.monotonic()
            if now - started > FLOOD_TIME:
                return sent, now - started, "time"
            if now - last_progress > STALL:
                return sent, last_progress - started, "stalled"
            _, writable, _ = select.select([], [self.sock], [], 0.1)  # the kernel's buffer, not a clock
            if not writable:
                continue
            try:
                n = self.sock.send(view[sent:sent + 65536])
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return sent, time.monotonic() - started, "reset"
            sent += n
            last_progress = time.monotonic()
        return sent, time.monotonic() - started, "sent"

    def exchange(self, data: bytes, replies: int) -> list[tuple[int, bytes]]:
        """Send ``data`` and read ``replies`` frames (a well-behaved phase of the client)."""
        self.sock.setblocking(True)
        self.sock.sendall(data)
        frames: list[tuple[int, bytes]] = []
        while len(frames) < replies:
            chunk = self.sock.recv(65536)
            assert chunk, "the gateway closed the connection"
            self.pending += chunk
            frames += self.take_frames()
        return frames

    def take_frames(self) -> list[tuple[int, bytes]]:
        frames = []
        data = self.pending
        while len(data) >= 2:
            n, i = data[1] & 0x7F, 2
            if n == 126:
                n, i = (struct.unpack("!H", data[2:4])[0], 4) if len(data) >= 4 else (1 << 62, 4)
            elif n == 127:
                n, i = (struct.unpack("!Q", data[2:10])[0], 10) if len(data) >= 10 else (1 << 62, 10)
            if len(data) < i + n:
                break
            frames.append((data[0] & 0x0F, data[i:i + n]))
            data = data[i + n:]
        self.pending = data
        return frames

    def drain(self) -> list[tuple[int, bytes]]:
        """Everything the gateway sent that is still readable (read after the attack, to check it)."""
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            self.pending += chunk
        return self.take_frames()

    def close(self) -> None:
        self.sock.close()


def gateway_socket(gw: Gateway, peer_port: int) -> tuple[int, int, int] | None:
    """The gateway's end of the attacker's connection in /proc/net/tcp: (state, bytes queued to
    send, bytes received and not yet read by the gateway); None once the gateway closed it."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            remote_port = int(fields[2].split(":")[1], 16)
            if local_port == gw.port and remote_port == peer_port:
                tx, rx = (int(q, 16) for q in fields[4].split(":"))
                return int(fields[3], 16), tx, rx
    return None


def gateway_closed(gw: Gateway, peer_port: int) -> bool:
    entry = gateway_socket(gw, peer_port)
    return entry is None or entry[0] != TCP_ESTABLISHED


def error_codes(frames: list[tuple[int, bytes]]) -> list[Any]:
    return [json.loads(p)["error"]["code"] if op == 0x1 else ("close", struct.unpack("!H", p[:2])[0])
            for op, p in frames]


def test_garbage_flood_is_closed_1008_after_the_error_budget(make_gateway):
    """600,000 one-byte invalid frames, never read: 100 x -32700, a 1008 close, the connection
    dropped about a second later (Autobahn's closing-handshake timeout); nothing else is read."""
    gw = make_gateway(gateway_config())
    with LegitClient(gw.url + "/mcp", headers=auth(LEGIT_TOKEN)) as legit:
        # The kernel's default receive buffer holds the 100 replies and the Close frame unread,
        # so they can be checked after the attack.
        attacker = RawWebSocket(gw.port, MALLORY_TOKEN, rcvbuf=None)
        try:
            before = proc_stats(gw.proc.pid)
            started = time.monotonic()
            sent, seconds, ended = attacker.flood(GARBAGE * FRAMES)
            assert wait_until(lambda: gateway_closed(gw, attacker.local_port), timeout=10), gateway_socket(gw, attacker.local_port)
            closed_after = time.monotonic() - started
            after = proc_stats(gw.proc.pid)
            frames = attacker.drain()
        finally:
            attacker.close()
    report = legit.assert_healthy()
    print(f"\ngarbage flood: sent {sent} of {len(GARBAGE) * FRAMES} bytes in {seconds:.2f} s ({ended}), "
          f"gateway closed its end {closed_after:.2f} s in; "
          f"gateway RSS {before.rss >> 20} -> {after.rss >> 20} MiB; legit p99 {report.p99 * 1000:.0f} ms "
          f"over {len(report.latencies)} calls")
    codes = error_codes(frames)
    assert codes == [-32700] * 100 + [("close", 1008)], codes[:3] + codes[-3:]
    assert ended in ("reset", "stalled"), ended  # the gateway stopped taking the flood
    assert sent < len(GARBAGE) * FRAMES
    # the Close frame at once, the TCP connection when the 1 s closing handshake times out
    assert closed_after < 5, "the connection was dropped %.1f s into the flood" % closed_after
    assert after.rss - before.rss < RSS_BOUND, (before, after)


def flood_until_dropped(gw: Gateway, attacker: RawWebSocket, data: bytes, timeout: float) -> tuple[Any, ...]:
    """``attacker`` floods ``data`` until the gateway stops taking it, then waits up to ``timeout`` s for
    the gateway to drop it: (sent, seconds, how the flood ended, the gateway's socket while paused,
    proc_stats before, during and after, dropped, seconds from the flood's start to the drop)."""
    before = proc_stats(gw.proc.pid)
    started = time.monotonic()
    sent, seconds, ended = attacker.flood(data)
    paused = gateway_socket(gw, attacker.local_port)
    during = proc_stats(gw.proc.pid)
    dropped = wait_until(lambda: gateway_closed(gw, attacker.local_port), timeout=timeout)
    return sent, seconds, ended, paused, before, during, proc_stats(gw.proc.pid), dropped, time.monotonic() - started


@pytest.mark.parametrize("reply", ["parse-error", "rate-limited", "pong"])
def test_never_reading_peer_is_paused_then_dropped(make_gateway, reply):
    """The error budget off (``websocket.maxErrors: null``): each frame is answered with a -32700,
    a 429 (the attacker's rate limit spent first) or a pong (a control frame, Autobahn's path).
    The gateway stops reading once its replies are over the high-water mark, its RSS stays within
    RSS_BOUND, and the keepalive ping timeout drops the peer."""
    ping_interval, ping_timeout = 3, 3
    rate_max = 1000 if reply == "rate-limited" else 1_000_000
    gw = make_gateway(gateway_config({"maxErrors": None, "pingInterval": ping_interval, "pingTimeout": ping_timeout},
                                     rate_max=rate_max))
    with LegitClient(gw.url + "/mcp", headers=auth(LEGIT_TOKEN)) as legit:
        attacker = RawWebSocket(gw.port, MALLORY_TOKEN)
        try:
            if reply == "rate-limited":
                # Spend the attacker's budget while reading (the upgrade was hit 1): every
                # later message gets a 429 (the legitimate identity has a budget of its own).
                answered = attacker.exchange(GARBAGE * (rate_max - 1), rate_max - 1)
                assert set(error_codes(answered)) == {-32700}
                assert error_codes(attacker.exchange(GARBAGE, 1)) == [-32000]  # Too Many Requests
            frame = PING_FRAME if reply == "pong" else GARBAGE
            sent, seconds, ended, paused, before, during, after, dropped, dropped_after = flood_until_dropped(
                gw, attacker, frame * FRAMES, ping_interval + ping_timeout + 10)
        finally:
            attacker.close()
    report = legit.assert_healthy()
    print(f"\n{reply}: sent {sent} of {len(frame) * FRAMES} bytes in {seconds:.2f} s ({ended}); gateway socket "
          f"{paused}; RSS {before.rss >> 20} -> {during.rss >> 20} -> {after.rss >> 20} MiB; dropped after "
          f"{dropped_after:.1f} s; legit p99 {report.p99 * 1000:.0f} ms over {len(report.latencies)} calls")
    assert ended == "stalled", (ended, sent)
    assert paused is not None and paused[0] == TCP_ESTABLISHED, paused
    assert paused[2] > 0, "the gateway read everything it was sent: %r" % (paused,)
    assert during.rss - before.rss < RSS_BOUND, (before, during)
    assert after.rss - before.rss < RSS_BOUND, (before, after)
    assert dropped, "the never-reading peer is still connected %.1f s later" % dropped_after


#: A notification the session relays to its child and nobody answers: 67 bytes on the wire.
NOTIFICATION = bytes((0x81, 0x80 | 61)) + MASK + bytes(
    b ^ MASK[i % 4] for i, b in enumerate(b'{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}'))


def test_notifications_for_a_child_that_does_not_read_stdin_stop_the_reading(make_gateway):
    """A child that never reads its stdin, and a peer that floods it with notifications (no reply
    to the client, so the write buffer never fills): the gateway once queued every one for the
    child's pipe (1,000,000 of them, 67 MB: all taken, RSS +107 MiB). Now the pipe's buffer over
    its high-water mark stops reading the socket (mcpgw.upstream.stdin): the flood stalls, RSS
    stays flat, and the keepalive ping timeout drops the peer."""
    ping_interval, ping_timeout = 3, 3
    config = gateway_config({"pingInterval": ping_interval, "pingTimeout": ping_timeout}, rate_max=100_000_000)
    config["mcpServers"]["deaf"] = {"command": sys.executable, "args": ["-c", "import time; time.sleep(600)"]}
    gw = make_gateway(config)
    with LegitClient(gw.url + "/mcp", headers=auth(LEGIT_TOKEN)) as legit:
        attacker = RawWebSocket(gw.port, MALLORY_TOKEN, path="/servers/deaf/ws")
        try:
            sent, seconds, ended, paused, before, during, after, dropped, dropped_after = flood_until_dropped(
                gw, attacker, NOTIFICATION * 1_000_000, ping_interval + ping_timeout + 10)
        finally:
            attacker.close()
    report = legit.assert_healthy()
    print(f"\ndeaf child: sent {sent} of {len(NOTIFICATION) * 1_000_000} bytes in {seconds:.2f} s ({ended}); gateway socket "
          f"{paused}; RSS {before.rss >> 20} -> {during.rss >> 20} -> {after.rss >> 20} MiB; dropped after "
          f"{dropped_after:.1f} s; legit p99 {report.p99 * 1000:.0f} ms over {len(report.latencies)} calls")
    assert ended == "stalled", (ended, sent)
    assert paused is not None and paused[0] == TCP_ESTABLISHED and paused[2] > 0, paused
    assert during.rss - before.rss < RSS_BOUND, (before, during)
    assert after.rss - before.rss < RSS_BOUND, (before, after)
    assert dropped, "the peer is still connected %.1f s later" % dropped_after
