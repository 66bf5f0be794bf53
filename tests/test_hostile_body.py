"""Issue 15, finding 1: request bodies against a real ``twistd mcpgw`` (auth and rate limit on).

- 200 MiB ``Content-Length`` bodies without credentials, four connections at once: the 401 comes
  with the head, nothing is spooled to disk, the body is dropped while the client still sends
  (a lingering close), and the connection ends within a few seconds;
- a ``Content-Length`` over ``maxBodyBytes`` with a valid token: 413 before a byte of the body;
- a 100 MiB chunked body with a valid token: 413 the moment it passes ``maxBodyBytes``.

RSS bound: a refused body is never stored, so the gateway grows by its read buffers and the
allocator's noise only (32 MiB allowed); a chunked body is kept in memory up to the limit
(16 MiB) before it is cut (64 MiB allowed: the body, its BytesIO growth, the allocator).
Meanwhile a legitimate SDK client keeps calling a tool (no failed call, p99 < 1 s).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest

from tests.gateway_process import Gateway
from tests.hostile import LegitClient, proc_stats, tmp_bytes_held
from tests.hostile_http import (
    LEGIT_HEADERS,
    TOKEN,
    BodyFlood,
    connect,
    mib,
    read_until_closed,
    report,
    run_floods,
    secured_config,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gw():
    g = Gateway(secured_config())
    yield g
    g.stop()


def post_head(port: int, length: int | None, token: bool, chunked: bool = False) -> bytes:
    lines = ["POST /mcp HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             "Accept: application/json, text/event-stream"]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_200_mib_bodies_without_credentials_are_401_on_the_head(gw):
    """Spec 2025-11-25 basic/authorization (401 with WWW-Authenticate, RFC 6750 section 3); the
    body is never accepted: at most what the kernel buffers and the lingering drain take."""
    pid = gw.proc.pid
    tmp_before = shutil.disk_usage("/tmp").used
    before = proc_stats(pid)
    with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
        outcomes = []
        started = time.monotonic()
        while time.monotonic() - started < 4:  # rounds, so the legitimate client calls all along
            floods = [BodyFlood(gw.port, post_head(gw.port, 200 * MiB, token=False), 200 * MiB) for _ in range(4)]
            outcomes += run_floods(floods, pid, deadline=20)
        after = proc_stats(pid)
    tmp_delta = shutil.disk_usage("/tmp").used - tmp_before
    report("outcomes (status, end, answer):", repr(Counter((o.status, o.end, o.answer[:40]) for o in outcomes)))
    report(f"no token, 200 MiB each: {len(outcomes)} connections (4 at a time) in {time.monotonic() - started:.1f} s; "
           f"statuses {sorted({o.status for o in outcomes})}; 401 after at most {max(o.t_answer or 99 for o in outcomes):.3f} s; "
           f"at most {mib(max(o.sent for o in outcomes))} sent; closed ({sorted({o.end for o in outcomes})}) after at most "
           f"{max(o.t_end or 99 for o in outcomes):.2f} s",
           f"gateway RSS {mib(before.rss)} -> peak {mib(max(o.rss_peak for o in outcomes))} -> {mib(after.rss)}; "
           f"temp-file bytes held at most {max(o.max_tmp_bytes for o in outcomes)}; /tmp used {tmp_delta:+d} bytes "
           f"(whole machine); legit p99 {legit.report.p99 * 1000:.0f} ms over {len(legit.report.latencies)} calls")
    legit.assert_healthy()
    for o in outcomes:
        assert o.status == 401, o.answer[:300]
        assert b'WWW-Authenticate: Bearer realm="mcpgw"' in o.answer
        assert b"Connection: close" in o.answer
        assert o.t_answer is not None and o.t_answer < 1.0
        assert o.end in ("eof", "reset") and o.t_end is not None and o.t_end < 6.0, (o.end, o.t_end)
        assert o.sent < 64 * MiB, mib(o.sent)  # maxBodyBytes of dropping, plus kernel buffers
    assert max(o.max_tmp_bytes for o in outcomes) == 0
    assert max(o.rss_peak for o in outcomes) - before.rss < 32 * MiB
    assert tmp_bytes_held(pid) == 0


def test_content_length_over_the_limit_is_413_before_the_body(gw):
    """With a valid token: 413 answers the head alone (no byte of the body sent)."""
    with connect(gw.port) as s:
        s.sendall(post_head(gw.port, 200 * MiB, token=True))
        answer, end = read_until_closed(s, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request body of 209715200 bytes exceeds the limit of 16777216 bytes" in answer
    assert end == "eof"


def test_100_mib_chunked_body_cut_at_the_limit(gw):
    pid = gw.proc.pid
    before = proc_stats(pid)
    with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
        outcomes = []
        started = time.monotonic()
        while time.monotonic() - started < 4:
            outcomes += run_floods([BodyFlood(gw.port, post_head(gw.port, None, token=True, chunked=True), 100 * MiB,
                                              chunked=True)], pid, deadline=20)
        after = proc_stats(pid)
    o = max(outcomes, key=lambda o: o.sent)
    report("outcomes (status, end, answer):", repr(Counter((o.status, o.end, o.answer[:40]) for o in outcomes)))
    report(f"{len(outcomes)} chunked bodies; the largest:",
           f"chunked 100 MiB with a token: {o.status} after {o.t_answer:.3f} s, {mib(o.sent)} sent, "
           f"{o.end} after {o.t_end:.2f} s; RSS {mib(before.rss)} -> peak {mib(o.rss_peak)} -> {mib(after.rss)}; "
           f"temp-file bytes {o.max_tmp_bytes}; legit p99 {legit.report.p99 * 1000:.0f} ms")
    legit.assert_healthy()
    assert all(x.status == 413 for x in outcomes)
    assert o.status == 413, o.answer[:300]
    assert b"request body exceeds the limit of 16777216 bytes" in o.answer
    assert o.end in ("eof", "reset") and o.t_end < 6.0
    # Cut at 16 MiB: what was sent beyond it is kernel buffers and the lingering drain (16 MiB more at most).
    assert o.sent < 48 * MiB, mib(o.sent)
    assert o.max_tmp_bytes == 0
    assert o.rss_peak - before.rss < 64 * MiB
