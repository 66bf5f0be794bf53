"""Shared parts of the hostile-client tests (issue 15): a legitimate SDK client that keeps
calling a tool while an attack runs, and what an attack costs the gateway process.

Every attack test runs against a real ``twistd mcpgw`` (``tests.gateway_process.Gateway``),
measures the gateway's RSS, descriptors and the bytes it left on disk before and after, and
requires the legitimate client to see no failed call and a p99 under a second
(``LegitClient.assert_healthy``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


@dataclass(frozen=True)
class ProcStats:
    """One reading of a process: resident memory and open descriptors."""

    rss: int  # bytes
    fds: int

    def grew(self, before: ProcStats) -> ProcStats:
        return ProcStats(self.rss - before.rss, self.fds - before.fds)


def proc_stats(pid: int) -> ProcStats:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return ProcStats(rss, len(os.listdir(f"/proc/{pid}/fd")))


def sockets_held(pid: int) -> int:
    """Sockets the process holds open (its children's pipes, which a legitimate client's session
    opens and closes on its own schedule, are left out)."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed while listed
    return held


def tmp_bytes_held(pid: int) -> int:
    """Bytes in regular files the process holds open that are deleted or under a temp folder
    (a spooled request body shows up here)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.endswith("(deleted)") or target.startswith(("/tmp/", "/var/tmp/")):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


@dataclass
class LegitReport:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def p99(self) -> float:
        if not self.latencies:
            return float("inf")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class LegitClient:
    """The official Python SDK over Streamable HTTP, in a thread of its own, calling ``tool``
    every ``pace`` seconds from ``start()`` to ``stop()``; each call is timed.

    ``with LegitClient(gw.url + "/mcp") as legit: <attack>`` then ``legit.assert_healthy()``.
    The pacing keeps the client from taking a core of its own on a 2-core machine; it is the
    client's rhythm, not a wait for the gateway.
    """

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, tool: str = "echo",
                 arguments: dict[str, Any] | None = None, pace: float = 0.05):
        self.url = url
        self.headers = headers or {}
        self.tool = tool
        self.arguments = arguments if arguments is not None else {"text": "legit"}
        self.pace = pace
        self.report = LegitReport()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LegitClient:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LegitClient:
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the legitimate client did not connect: %s" % self.report.failures)
        return self

    def stop(self) -> LegitReport:
        self._stop.set()
        self._thread.join(60)
        return self.report

    def _run(self) -> None:
        try:
            anyio.run(self._calls)
        except BaseException as e:  # noqa: BLE001 - recorded, asserted by assert_healthy
            self.report.failures.append("session: %r" % (e,))
        finally:
            self._ready.set()

    async def _calls(self) -> None:
        http = httpx.AsyncClient(headers=self.headers, timeout=httpx.Timeout(30.0))
        async with http, Client(streamable_http_client(self.url, http_client=http)) as client:
            self._ready.set()
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    result = await client.call_tool(self.tool, self.arguments)
                    if result.is_error:
                        self.report.failures.append("tool error: %r" % (result.content,))
                except Exception as e:  # noqa: BLE001 - a failed call is what the test counts
                    self.report.failures.append("call: %r" % (e,))
                self.report.latencies.append(time.monotonic() - started)
                await anyio.sleep(self.pace)

    def assert_healthy(self, max_p99: float = 1.0, min_calls: int = 5) -> LegitReport:
        self.stop()
        r = self.report
        assert not r.failures, "legitimate client failed: %s" % r.failures[:5]
        assert len(r.latencies) >= min_calls, "legitimate client made only %d calls" % len(r.latencies)
        assert r.p99 < max_p99, "legitimate client p99 %.3f s (max %.3f s)" % (r.p99, max_p99)
        return r
