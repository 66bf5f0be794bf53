"""Issue 15, finding 3 (connection caps and descriptor exhaustion) against a real ``twistd mcpgw``.

- ``limits.maxConnectionsPerIp``: 100 idle connections from 127.0.0.2 with a cap of 20: 20 held,
  80 answered 503 and closed (EOF, no reset); the legitimate client on 127.0.0.1 is not affected.
- ``limits.maxConnections``: a cap shared by every client (the test names it: the legitimate
  client is not run; /health on a new connection gets the same clean 503).
- RLIMIT_NOFILE 256 and 400 slow-head connections from 127.0.0.1, the legitimate client's own
  address, with a header deadline far away (60 s): the gateway sheds the oldest heads past 80 %
  of its descriptors, never hits EMFILE, answers /health on 30 new connections during the attack,
  and the legitimate client keeps calling its tool.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.gateway_process import Gateway, wait_until
from tests.hostile import LegitClient, proc_stats
from tests.hostile_http import LEGIT_HEADERS, closed_by_peer, connect, mib, read_until_closed, report, secured_config

pytestmark = pytest.mark.integration


def test_per_ip_cap_spares_other_addresses():
    gw = Gateway(secured_config(limits={"maxConnectionsPerIp": 20, "headerTimeout": 60}))
    try:
        with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
            socks = [connect(gw.port, source="127.0.0.2") for _ in range(100)]
            outcomes = []
            for s in socks:
                s.settimeout(0.2)
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    outcomes.append(("held", b""))
                    continue
                rest, end = read_until_closed(s, 3)
                outcomes.append((end, data + rest))
            time.sleep(0.5)  # the legitimate client's calls keep going with the cap full
            for s in socks:
                s.close()
        held = sum(1 for end, _ in outcomes if end == "held")
        refused = [answer for end, answer in outcomes if end == "eof"]
        report(f"maxConnectionsPerIp 20: 100 connections from 127.0.0.2: {held} held, {len(refused)} answered and "
               f"closed, {sum(1 for end, _ in outcomes if end == 'reset')} reset; legit p99 "
               f"{legit.report.p99 * 1000:.0f} ms over {len(legit.report.latencies)} calls")
        legit.assert_healthy()
        assert held == 20
        assert len(refused) == 80
        assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"maxConnectionsPerIp 20" in a
                   for a in refused)
    finally:
        gw.stop()


def test_max_connections_is_a_shared_cap():
    gw = Gateway(secured_config(limits={"maxConnections": 10}))
    try:
        socks = [connect(gw.port, source="127.0.0.2") for _ in range(10)]
        assert wait_until(lambda: all(closed_by_peer(s) is None for s in socks), timeout=1)
        r = httpx.get(gw.url + "/health")
        assert r.status_code == 503
        assert "limits.maxConnections 10" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        socks.pop().close()
        assert wait_until(lambda: httpx.get(gw.url + "/health").status_code == 200, timeout=5)
        for s in socks:
            s.close()
    finally:
        gw.stop()


def test_descriptor_exhaustion_sheds_slow_heads_first():
    nofile = 256
    gw = Gateway(secured_config(limits={"headerTimeout": 60}), nofile=nofile)
    pid = gw.proc.pid
    try:
        before = proc_stats(pid)
        with LegitClient(gw.url + "/mcp", headers=LEGIT_HEADERS) as legit:
            attackers: list[socket.socket] = []
            failed_connects = 0
            fds_peak = 0
            health: list[int] = []
            started = time.monotonic()
            for i in range(400):
                try:
                    s = connect(gw.port, timeout=2)
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    attackers.append(s)
                except OSError:
                    failed_connects += 1
                if i % 40 == 39:
                    # A prompt client on a new connection, from the attackers' own address.
                    health.append(httpx.get(gw.url + "/health", timeout=5).status_code)
                    time.sleep(0.3)
                fds_peak = max(fds_peak, proc_stats(pid).fds)
            for _ in range(10):
                health.append(httpx.get(gw.url + "/health", timeout=5).status_code)
            time.sleep(1)
            ends = [closed_by_peer(s) for s in attackers]
            elapsed = time.monotonic() - started
            for s in attackers:
                s.close()
        log = gw.log()
        shed = [e for e in ends if e is not None]
        report(f"RLIMIT_NOFILE {nofile}: 400 slow heads from 127.0.0.1 in {elapsed:.1f} s: {len(attackers)} connected "
               f"({failed_connects} failed), {len(shed)} closed by the gateway ({shed.count('reset')} reset), "
               f"{len(attackers) - len(shed)} still open; gateway fds {before.fds} -> peak {fds_peak}; /health "
               f"{sorted(set(health))} x{len(health)}; legit p99 {legit.report.p99 * 1000:.0f} ms over "
               f"{len(legit.report.latencies)} calls; RSS {mib(before.rss)}")
        legit.assert_healthy()
        assert failed_connects == 0
        assert health == [200] * len(health)
        assert fds_peak < nofile
        assert "EMFILE" not in log and "Too many open files" not in log
        assert len(shed) >= 400 - nofile
        assert shed.count("reset") == 0
        assert "descriptors short" in log
    finally:
        gw.stop()
