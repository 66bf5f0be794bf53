"""Issue 15, finding 2: one connection pipelining 150,000 ``GET /nonexistent`` requests against a
real ``twistd mcpgw`` without reading a single answer (twisted.web's own channel grew by 590 MiB
from 7.8 MB of this).

The gateway answers ``limits.maxPipelined`` requests a turn and parses none while its write
buffer to that client is full, and stops reading beyond 16 KiB while a request is answered; so
the kernel's socket buffers hold the backlog, not the gateway. RSS bound: 24 MiB (a write buffer
of 64 KiB, 16 answers, the read buffers, the allocator's noise; nothing that scales with the
number of requests). Then the attacker reads: every request is answered, 404, in order.
Meanwhile a legitimate SDK client keeps calling a tool (no failed call, p99 < 1 s).
"""

from __future__ import annotations

import select
import time

import pytest

from tests.gateway_process import Gateway
from tests.hostile import LegitClient, proc_stats
from tests.hostile_http import LEGIT_HEADERS, connect, mib, report, secured_config

pytestmark = pytest.mark.integration

COUNT = 150_000
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gw():
    g = Gateway(secured_config())
    yield g
    g.stop()


def test_150k_pipelined_requests_never_read(gw):
    pid = gw.proc.pid
    request = f"GET /nonexistent HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n\r\n".encode()
    payload = request * COUNT
    before = proc_stats(pid)
    with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
        s = connect(gw.port)
        s.setblocking(False)
        sent, rss_peak = 0, before.rss
        started = time.monotonic()
        stalled_since = None
        # Phase 1: send as fast as the gateway takes it, read nothing, until sending stalls for 2 s.
        while sent < len(payload) and time.monotonic() - started < 30:
            _, writable, _ = select.select([], [s], [], 0.1)
            if writable:
                try:
                    n = s.send(payload[sent:sent + 262144])
                except BlockingIOError:
                    n = 0
                sent += n
                stalled_since = None if n else stalled_since
            elif stalled_since is None:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > 2:
                break
            rss_peak = max(rss_peak, proc_stats(pid).rss)
        stalled = proc_stats(pid)
        accepted_unread = sent
        # Phase 2: read every answer (and send the rest), counting status lines as they come.
        answers = not_found = 0
        tail = tail404 = b""
        deadline = time.monotonic() + 120
        while answers < COUNT and time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s] if sent < len(payload) else [], [], 0.5)
            if writable:
                try:
                    sent += s.send(payload[sent:sent + 262144])
                except BlockingIOError:
                    pass
            if readable:
                data = s.recv(1 << 20)
                if not data:
                    break
                # A marker cut by a read is whole in the next window; a tail shorter than the
                # marker is never counted twice.
                window, window404 = tail + data, tail404 + data
                answers += window.count(b"HTTP/1.1 ")
                not_found += window404.count(b"HTTP/1.1 404 ")
                tail, tail404 = window[-8:], window404[-12:]
        s.close()
        after = proc_stats(pid)
    report(f"pipelining: {len(payload)} bytes, {COUNT} requests; {mib(accepted_unread)} taken before sending "
           f"stalled (kernel buffers) without a byte read; gateway RSS {mib(before.rss)} -> {mib(stalled.rss)} "
           f"while stalled, peak {mib(rss_peak)}, {mib(after.rss)} after; {answers} answers read in "
           f"{time.monotonic() - started:.1f} s; legit p99 {legit.report.p99 * 1000:.0f} ms over "
           f"{len(legit.report.latencies)} calls")
    legit.assert_healthy()
    assert accepted_unread < len(payload), "the gateway read everything without the client reading"
    assert stalled.rss - before.rss < 24 * MiB
    assert rss_peak - before.rss < 24 * MiB
    assert answers == COUNT
    assert not_found == COUNT
