"""Issue 15, finding 3 (slowloris) against a real ``twistd mcpgw``: 250 connections from the
legitimate client's own address, each sending a request head one byte every 0.4 s (the idle
timeout is reset by every byte; the head deadline is not), and 20 connections trickling a body.

``limits.headerTimeout`` is 2 s and ``limits.bodyTimeout`` 3 s here (10 s and 60 s by default;
the deadline logic itself is unit-tested on a Clock in test_channel_unit.py): every attacking
connection gets 408 and is closed within its deadline plus scheduling slack; the gateway's
descriptors come back to where they were and its RSS grows by under 16 MiB (250 channels and
their partial heads, some KiB each). Meanwhile a legitimate SDK client keeps calling a tool.
"""

from __future__ import annotations

import time

import pytest

from tests.gateway_process import Gateway, wait_until
from tests.hostile import LegitClient, proc_stats, sockets_held
from tests.hostile_http import LEGIT_HEADERS, TOKEN, closed_by_peer, connect, mib, report, secured_config

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def gw():
    g = Gateway(secured_config(limits={"headerTimeout": HEADER_TIMEOUT, "bodyTimeout": BODY_TIMEOUT}))
    yield g
    g.stop()


def trickle(socks: dict, started: dict, first: bytes, limit: float, pid: int) -> tuple[dict, dict, int]:
    """Send ``first`` on every socket, then one byte each per 0.4 s until the gateway has closed
    them all (or ``limit`` s): per socket, when it was closed and what it got back."""
    for s in socks.values():
        s.sendall(first)
    closed: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    rss_peak = 0
    deadline = time.monotonic() + limit
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, s in socks.items():
            if key in closed:
                continue
            s.setblocking(False)
            try:
                data = s.recv(65536)
                answers[key] = answers.get(key, b"") + data
                if not data:
                    closed[key] = time.monotonic() - started[key]
                    continue
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed[key] = time.monotonic() - started[key]
                answers[key] = answers.get(key, b"") + b"<reset>"
                continue
            try:
                s.send(b"a")
            except OSError:
                pass
        rss_peak = max(rss_peak, proc_stats(pid).rss)
        time.sleep(0.4)  # the attacker's rhythm: a byte per connection every 0.4 s
    return closed, answers, rss_peak


def test_slowloris_heads_are_cut_at_the_header_deadline(gw):
    pid = gw.proc.pid
    before = proc_stats(pid)
    sockets_before = sockets_held(pid)
    with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
        socks, started = {}, {}
        for i in range(250):
            socks[i] = connect(gw.port)
            started[i] = time.monotonic()
        opened = proc_stats(pid)
        closed, answers, rss_peak = trickle(socks, started, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
                                            limit=15, pid=pid)
        for s in socks.values():
            s.close()
    # The attack's sockets are gone; the legitimate session's child pipes come and go on its own.
    wait_until(lambda: sockets_held(pid) <= sockets_before + 2, timeout=5)
    after = proc_stats(pid)
    sockets_after = sockets_held(pid)
    times = sorted(closed.values())
    report(f"slowloris: 250 connections; {len(closed)} closed by the gateway, after {times[0]:.2f}..{times[-1]:.2f} s "
           f"(headerTimeout {HEADER_TIMEOUT:g} s); {sum(a.startswith(b'HTTP/1.1 408 ') for a in answers.values())} "
           f"got 408; fds {before.fds} -> {opened.fds} -> {after.fds}; RSS {mib(before.rss)} -> peak {mib(rss_peak)} "
           f"-> {mib(after.rss)}; legit p99 {legit.report.p99 * 1000:.0f} ms over {len(legit.report.latencies)} calls")
    legit.assert_healthy()
    assert len(closed) == 250
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout") for a in answers.values())
    assert times[0] >= HEADER_TIMEOUT - 0.1 and times[-1] < HEADER_TIMEOUT + 2.0
    assert sockets_after <= sockets_before + 2, (sockets_before, sockets_after)
    assert rss_peak - before.rss < 16 * MiB


def test_silent_connections_closed_at_the_header_deadline(gw):
    """Connect and send nothing: closed without an answer (as nginx does)."""
    socks = [connect(gw.port) for _ in range(50)]
    started = time.monotonic()
    assert wait_until(lambda: all(closed_by_peer(s) for s in socks), timeout=HEADER_TIMEOUT + 3)
    elapsed = time.monotonic() - started
    outcomes = {closed_by_peer(s) or "eof" for s in socks}
    for s in socks:
        s.close()
    report(f"silent: 50 connections closed after {elapsed:.2f} s ({outcomes})")
    assert elapsed >= HEADER_TIMEOUT - 0.2


def test_slow_bodies_are_cut_at_the_body_deadline(gw):
    pid = gw.proc.pid
    head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            "Content-Length: 100000\r\n\r\n{").encode()
    with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
        socks, started = {}, {}
        for i in range(20):
            socks[i] = connect(gw.port)
            started[i] = time.monotonic()
        closed, answers, _ = trickle(socks, started, head, limit=15, pid=pid)
        for s in socks.values():
            s.close()
    times = sorted(closed.values())
    report(f"slow bodies: 20 connections closed after {times[0]:.2f}..{times[-1]:.2f} s (bodyTimeout {BODY_TIMEOUT:g} s); "
           f"legit p99 {legit.report.p99 * 1000:.0f} ms")
    legit.assert_healthy()
    assert len(closed) == 20
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout") and b"limits.bodyTimeout" in a for a in answers.values())
    assert times[0] >= BODY_TIMEOUT - 0.1 and times[-1] < BODY_TIMEOUT + 2.0
