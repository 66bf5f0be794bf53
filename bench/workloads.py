"""The workloads: sequential latency, throughput, session setup, large messages, idle streams.

Every workload returns Rows. ``isolation`` on a row is the number of replies
that reached a session and were not its own (a foreign id, or the right id
with another session's text), plus replies whose text was not what was sent:
any non-zero value invalidates the row.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.targets import proc_children, proc_cpu, proc_rss_kib

_tag_counter = 0


def _tag() -> str:
    """A text prefix unique to one session in this run."""
    global _tag_counter
    _tag_counter += 1
    return f"s{_tag_counter}x{os.urandom(3).hex()}"


def client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max in microseconds (nearest rank)."""
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, max(0, int(round(p * n + 0.5)) - 1))] / 1000.0

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": s[-1] / 1000.0}


@dataclass
class Row:
    gateway: str
    transport: str
    workload: str
    sessions: int = 0
    calls: int = 0
    lat_us: dict[str, float] = field(default_factory=dict)
    rate: float | None = None  # calls/s
    client_cpu_us: float | None = None  # per call (or per session for setup)
    gw_cpu_us: float | None = None
    isolation: int = 0
    errors: int = 0
    value: float | None = None  # KiB per idle stream, ms for setup/large
    unit: str = ""
    mode: str = ""
    ok: bool = True
    note: str = ""
    #: setup rows measured in pairs (``setup(paired=...)``): the bare spawn's p50 in the same pairs and
    #: the median of (this session - the bare spawn just before it), ms.
    paired_floor_ms: float | None = None
    paired_delta_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CpuWindow:
    """Client and gateway CPU over a measured stretch."""

    def __init__(self, pid: int | None):
        self.pid = pid

    def __enter__(self) -> CpuWindow:
        self.c0 = client_cpu()
        self.g0 = proc_cpu(self.pid) if self.pid else None
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.client = client_cpu() - self.c0
        self.gw = (proc_cpu(self.pid) - self.g0) if self.pid else None

    def per(self, n: int) -> tuple[float | None, float | None]:
        if n <= 0:
            return None, None
        return self.client / n * 1e6, (self.gw / n * 1e6 if self.gw is not None else None)


def _modes(clients: list[Any]) -> str:
    modes: set[str] = set()
    for c in clients:
        modes |= c.modes
    return "+".join(sorted(modes))


async def _close_all(clients: list[Any]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _connect_all(clients: list[Any], batch: int = 50) -> None:
    for i in range(0, len(clients), batch):
        await asyncio.gather(*(c.connect() for c in clients[i:i + batch]))


async def sequential(make: Callable[[], Any], gw: str, transport: str, pid: int | None, n: int, warmup: int,
                     progress: bool = False) -> Row:
    """One session, ``n`` echo calls one after another: the latency distribution."""
    row = Row(gw, transport, "sequential", sessions=1, calls=n)
    c = make()
    try:
        await c.connect()
        tag = _tag()
        for i in range(warmup):
            if await c.call(i + 1, f"{tag}-w{i}", progress) != f"{tag}-w{i}":
                row.isolation += 1
        samples = []
        perf = time.perf_counter_ns
        with CpuWindow(pid) as cpu:
            for i in range(warmup + 1, warmup + n + 1):
                text = f"{tag}-{i}"
                t0 = perf()
                got = await c.call(i, text, progress)
                samples.append(perf() - t0)
                if got != text:
                    row.isolation += 1
        row.lat_us = percentiles(samples)
        row.rate = n / cpu.wall
        row.client_cpu_us, row.gw_cpu_us = cpu.per(n)
        row.isolation += c.foreign
        row.mode = _modes([c])
    finally:
        await c.close()
    return row


async def throughput(make: Callable[[], Any], gw: str, transport: str, pid: int | None, sessions: int, calls: int,
                     progress: bool = False) -> Row:
    """``sessions`` sessions at once, each making ``calls`` calls back to back: calls/s."""
    row = Row(gw, transport, "throughput", sessions=sessions, calls=sessions * calls)
    clients = [make() for _ in range(sessions)]
    samples: list[int] = []
    errors = 0
    try:
        await _connect_all(clients)
        tags = [_tag() for _ in clients]
        await asyncio.gather(*(c.call(1, f"{t}-w", progress) for c, t in zip(clients, tags)))
        perf = time.perf_counter_ns

        async def run(c: Any, tag: str) -> None:
            nonlocal errors
            for i in range(2, calls + 2):
                text = f"{tag}-{i}"
                t0 = perf()
                got = await c.call(i, text, progress)
                samples.append(perf() - t0)
                if got != text:
                    errors += 1

        with CpuWindow(pid) as cpu:
            await asyncio.gather(*(run(c, t) for c, t in zip(clients, tags)))
        row.lat_us = percentiles(samples)
        row.rate = row.calls / cpu.wall
        row.client_cpu_us, row.gw_cpu_us = cpu.per(row.calls)
        row.isolation = errors + sum(c.foreign for c in clients)
        row.mode = _modes(clients)
    finally:
        await _close_all(clients)
    return row


async def settle(pid: int | None, children: int | None, timeout: float = 2.0) -> None:
    """Wait (untimed) until gateway ``pid`` has no more children than ``children``: the child of
    a session just closed has exited, as the floor's own child has when its close() returns."""
    if pid is None or children is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = proc_children(pid)
        if now is None or now <= children:
            return
        await asyncio.sleep(0.001)


async def quiesce(pid: int | None, steady: float = 0.1, timeout: float = 5.0) -> None:
    """Wait (untimed) until gateway ``pid``'s number of children has not changed for ``steady``
    seconds: the children of the workload before (50 sessions just closed) have exited."""
    if pid is None or proc_children(pid) is None:
        return
    deadline = time.monotonic() + timeout
    last, since = proc_children(pid), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        now = proc_children(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= steady:
            return


async def setup(make: Callable[[], Any], gw: str, transport: str, pid: int | None, n: int, gap: float = 0.0,
                workload: str = "setup", paired: Callable[[], Any] | None = None) -> Row:
    """Open a session (for mcpgw and the floor: spawn its child), timed up to the initialize reply
    (``initialized_at``: the ``notifications/initialized`` that follows is not timed), close it; ``n`` times.

    ``gap``: seconds between one session's close and the next one's start (untimed), the time
    a warm pool (``warmPool``) has to start a replacement; 0: back to back. Either way the next
    session starts once the gateway's child of the last one has exited (``settle``, untimed), as
    the floor's does: a child still exiting (an interpreter tearing down on the shared cores)
    was measured in the next session's setup before.

    ``paired``: a client of the floor (``DirectClient``); a bare spawn is timed just before each
    session, so that the gateway's overhead is judged against a spawn made at the same moment on
    the shared cores (``paired_delta_ms``), not against the floor's own row a minute earlier."""
    row = Row(gw, transport, workload, sessions=n, calls=n, unit="ms")
    row.note = f"{gap * 1000:g} ms between sessions" if gap else "back to back"
    samples = []
    floors: list[int] = []
    pair_cpu = 0.0
    perf = time.perf_counter_ns
    await quiesce(pid)
    with CpuWindow(pid) as cpu:
        for i in range(n):
            if gap and i:
                await asyncio.sleep(gap)
            if paired is not None:
                c0 = client_cpu()
                f = paired()
                t0 = perf()
                try:
                    await f.connect()
                    floors.append((f.initialized_at or perf()) - t0)
                finally:
                    await f.close()
                pair_cpu += client_cpu() - c0
            c = make()
            children = proc_children(pid) if pid else None
            t0 = perf()
            try:
                await c.connect()
                samples.append((c.initialized_at or perf()) - t0)
                if c.foreign:
                    row.isolation += c.foreign
            finally:
                await c.close()
            await settle(pid, children)
    row.lat_us = percentiles(samples)
    row.value = row.lat_us["p50"] / 1000.0
    cpu.client -= pair_cpu  # the bare spawns are the bench's own work, not this row's
    row.client_cpu_us, row.gw_cpu_us = cpu.per(n)
    if floors and len(floors) == len(samples):
        deltas = sorted(s - f for s, f in zip(samples, floors))
        row.paired_floor_ms = percentiles(floors)["p50"] / 1000.0
        row.paired_delta_ms = deltas[len(deltas) // 2] / 1e6
        row.note += f"; each after a bare spawn: its p50 {row.paired_floor_ms:.1f} ms, median difference {row.paired_delta_ms:+.1f} ms"
    return row


def big_text(size: int) -> str:
    """``size`` characters that need no JSON escaping."""
    return base64.urlsafe_b64encode(os.urandom(size * 3 // 4 + 3)).decode().replace("=", "A")[:size]


async def large(make: Callable[[], Any], gw: str, transport: str, pid: int | None, size: int, n: int) -> Row:
    """Calls whose argument and reply both carry ``size`` bytes of text; each reply checked byte for byte."""
    row = Row(gw, transport, "large", sessions=1, calls=n, unit="ms")
    c = make()
    samples = []
    perf = time.perf_counter_ns
    try:
        await c.connect()
        base = big_text(size)
        tag = _tag()
        with CpuWindow(pid) as cpu:
            for i in range(1, n + 1):
                text = f"{tag}-{i}-" + base[len(tag) + 8:]
                text = text[:size]
                t0 = perf()
                got = await c.call(i, text)
                samples.append(perf() - t0)
                if got != text:
                    row.isolation += 1
        row.lat_us = percentiles(samples)
        row.value = row.lat_us["p50"] / 1000.0
        row.client_cpu_us, row.gw_cpu_us = cpu.per(n)
        row.isolation += c.foreign
        row.mode = _modes([c])
    finally:
        await c.close()
    return row


async def idle(make: Callable[[], Any], gw: str, pid: int, counts: list[int], batch: int = 100,
               log: Callable[[str], None] = print) -> list[Row]:
    """Hold ``counts`` open, idle SSE streams; gateway RSS growth per stream (from /proc)."""
    rows: list[Row] = []
    await asyncio.sleep(0.5)
    base = proc_rss_kib(pid)
    clients: list[Any] = []
    try:
        for count in sorted(counts):
            row = Row(gw, "sse", "idle", sessions=count, unit="KiB/stream")
            t0 = time.perf_counter()
            try:
                while len(clients) < count:
                    chunk = [make() for _ in range(min(batch, count - len(clients)))]
                    clients.extend(chunk)
                    await asyncio.gather(*(c.open_stream() for c in chunk))
            except Exception as e:  # noqa: BLE001 - how many streams opened before any failure is the result
                row.ok = False
                row.note = f"failed after {len(clients)} streams: {e!r:.200}"
                row.errors = 1
                rows.append(row)
                break
            opened = time.perf_counter() - t0
            await asyncio.sleep(2.0)
            alive = sum(1 for c in clients if c.stream is not None and not c.stream.closed)
            rss = proc_rss_kib(pid)
            row.value = (rss - base) / count
            row.calls = alive
            row.errors = count - alive
            row.ok = alive == count
            row.note = f"RSS {base / 1024:.1f} -> {rss / 1024:.1f} MiB; {alive}/{count} streams open after {opened:.1f} s"
            log(f"  idle {gw}: {row.note}")
            rows.append(row)
    finally:
        await _close_all(clients)
    return rows
