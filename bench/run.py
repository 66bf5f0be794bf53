"""Run the benchmark: ``python3 -m bench [--peers] [--quick | --smoke]``.

Measures, in one run on this machine, the direct-pipe floor, mcpgw on every
transport and (with ``--peers``) supergateway and mcp-proxy, and writes
``bench/results/<date>.md``, ``.json`` and ``.png`` (``--quick``: ``<date>-quick``; ``--smoke``:
``bench/results/smoke/<date>``, ignored by git).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report, workloads
from bench.clients import DirectClient
from bench.targets import Direct, Mcpgw, McpProxy, Supergateway, Target, install_peers, mkworkdir, raise_nofile
from bench.workloads import Row

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
#: Seconds between sessions in the warm pool's second setup row (longer than a child's start here).
WARM_GAP = 0.2

PROFILES = {
    # name: (sequential n, warmup, sessions list, calls per session, setup n, large n, idle counts)
    "full": dict(seq=2000, warmup=200, sessions=[1, 10, 50], calls=200, min_calls=2000, setup=30, large=10, idle=[1000, 10000]),
    "quick": dict(seq=500, warmup=50, sessions=[1, 10, 50], calls=50, min_calls=200, setup=10, large=3, idle=[200]),
    "smoke": dict(seq=20, warmup=5, sessions=[1, 3], calls=5, min_calls=5, setup=2, large=1, idle=[5]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def measure_target(t: Target, p: dict[str, Any], args: argparse.Namespace, rows: list[Row]) -> None:
    transports = [tr for tr in t.transports if not args.transports or tr in args.transports]
    timeout = args.timeout

    async def guarded(desc: str, coro_fn, transport: str, workload: str, sessions: int = 0) -> None:
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(coro_fn(), timeout)
        except Exception as e:  # noqa: BLE001 - whatever fails one workload is that row's result; the next runs
            msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log(f"  {t.name} {desc}: FAILED {msg[:300]}")
            if args.verbose:
                traceback.print_exc()
            rows.append(Row(t.name, transport, workload, sessions=sessions, ok=False, errors=1, note=msg[:300]))
            await asyncio.sleep(0.5)
            return
        for r in result if isinstance(result, list) else [result]:
            rows.append(r)
            log(f"  {t.name} {desc}: {report.describe(r)} ({time.perf_counter() - t0:.1f} s)")
        await asyncio.sleep(0.2)

    for tr in transports:
        wire = "streamable" if tr == "streamable-sse" else tr
        progress = tr == "streamable-sse"
        pid = t.pid(wire)

        def make(wire: str = wire) -> Any:
            return t.client(wire)

        if tr != "pipe":
            # A first client starts lazily launched processes (supergateway, one per transport).
            try:
                c = make()
                await asyncio.wait_for(c.connect(), timeout)
                await c.close()
                pid = t.pid(wire)
            except Exception as e:  # noqa: BLE001 - a target that cannot open a session is a failed row, not a crash
                log(f"  {t.name} {tr}: cannot start a session: {e!r:.300}")
                rows.append(Row(t.name, tr, "sequential", ok=False, errors=1, note=f"no session: {e!r:.200}"))
                continue
        if getattr(t, "setup_only", False):  # a variant measured for session setup only (mcpgw-warm)
            # Back to back: the sustained rate, where the pool refills no faster than a child starts;
            # spaced: what a session gets while the pool has children (sessions no faster than spawns).
            await guarded(f"{tr} setup", lambda tr=tr, pid=pid: workloads.setup(make, t.name, tr, pid, p["setup"], args.setup_gap),
                          tr, "setup")
            if not args.setup_gap:
                await guarded(f"{tr} setup, {WARM_GAP * 1000:g} ms apart",
                              lambda tr=tr, pid=pid: workloads.setup(make, t.name, tr, pid, p["setup"], WARM_GAP,
                                                                     workload="setup-spaced"),
                              tr, "setup-spaced")
            continue
        await guarded(f"{tr} sequential", lambda tr=tr, pid=pid, progress=progress: workloads.sequential(
                          make, t.name, tr, pid, p["seq"], p["warmup"], progress),
                      tr, "sequential", 1)
        for s in p["sessions"]:
            if progress and s != max(p["sessions"]):
                continue
            calls = max(p["calls"], p["min_calls"] // s)
            await guarded(f"{tr} throughput {s}x{calls}",
                          lambda s=s, calls=calls, tr=tr, pid=pid, progress=progress: workloads.throughput(
                              make, t.name, tr, pid, s, calls, progress),
                          tr, "throughput", s)
        if progress or getattr(t, "throughput_only", False):  # mcpgw-pooled: the shared-children rate only
            continue
        # Each session after a bare spawn of the fixture at the same moment (the floor, paired).
        await guarded(f"{tr} setup", lambda tr=tr, pid=pid: workloads.setup(
                          make, t.name, tr, pid, p["setup"], args.setup_gap,
                          paired=None if tr == "pipe" else DirectClient), tr, "setup")
        await guarded(f"{tr} large", lambda tr=tr, pid=pid: workloads.large(make, t.name, tr, pid, args.large_bytes, p["large"]),
                      tr, "large")

    if t.name != "direct" and not getattr(t, "setup_only", False) and not getattr(t, "throughput_only", False) and p["idle"] and not args.no_idle and (not args.transports or "sse" in args.transports):
        # Each idle stream costs the gateway ``fds_per_idle_stream`` descriptors
        # (mcpgw: the socket and its child's three pipes) and the bench one socket.
        budget = (args.nofile - 1000) // max(1, t.fds_per_idle_stream)
        cap = max(budget // 500 * 500, 100)
        counts = sorted({min(c, cap) for c in p["idle"]})
        capped = [c for c in p["idle"] if c > cap]
        if capped:
            t.notes.append(f"idle streams: {', '.join(map(str, capped))} capped to {cap}: RLIMIT_NOFILE is {args.nofile} here "
                           f"and each stream costs this gateway {t.fds_per_idle_stream} descriptors")
            log(f"  {t.name}: {t.notes[-1]}")

        async def idle() -> list[Row]:
            make_idle, pid = t.idle_stream()
            proc = t.processes[-1]
            try:
                rows = await workloads.idle(make_idle, t.name, pid, counts, log=log)
                for r in rows:
                    if capped and r.sessions == cap:
                        r.note += f"; capped from {max(capped)} by RLIMIT_NOFILE {args.nofile}"
                return rows
            finally:
                proc.stop()
                t.processes.remove(proc)
        await guarded("idle streams", idle, "sse", "idle", max(p["idle"]))


def machine_facts(targets: list[Target], nofile: int) -> dict[str, str]:
    import platform
    import subprocess

    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        facts["cpu"] = f"{len(models)} x {models[0]}" if models else platform.processor()
    except OSError:
        facts["cpu"] = platform.processor()
    facts["cores (os.cpu_count)"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            facts["memory"] = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    facts["kernel"] = platform.release()
    facts["python"] = f"{sys.version.split()[0]} ({sys.executable})"
    try:
        import orjson

        facts["orjson"] = orjson.__version__
    except ImportError:
        facts["orjson"] = "absent (stdlib json)"
    for t in targets:
        if t.version:
            facts[t.name] = t.version
    try:
        facts["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip() or "absent"
    except OSError:
        facts["node"] = "absent"
    try:
        import aiohttp

        facts["client"] = f"asyncio raw HTTP/1.1 (bench/http.py) + aiohttp {aiohttp.__version__} for WebSocket, one process"
    except ImportError:
        facts["client"] = "asyncio raw HTTP/1.1 (bench/http.py), one process; aiohttp absent: no WebSocket"
    facts["RLIMIT_NOFILE (bench and gateways)"] = str(nofile)
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "mcpgw"], capture_output=True, text=True).stdout
        if head:
            facts["mcpgw source"] = f"commit {head}" + (" + uncommitted changes in mcpgw/" if dirty.strip() else "")
    except OSError:
        pass
    return facts


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


async def amain(args: argparse.Namespace) -> int:
    p = dict(PROFILES[args.profile])
    if args.idle is not None:
        p["idle"] = [int(x) for x in args.idle.split(",") if x]
    nofile = args.nofile = raise_nofile()
    workdir = mkworkdir()
    log(f"bench: profile {args.profile}, work dir {workdir}, RLIMIT_NOFILE {nofile}")
    peer_problems: dict[str, str] = {}
    targets: list[Target] = [Direct(workdir), Mcpgw(workdir, log_level=args.log_level)]
    if args.warm_pool:
        targets.append(Mcpgw(workdir, log_level=args.log_level, name="mcpgw-warm", warm_pool=args.warm_pool))
    if args.pooled:
        targets.append(Mcpgw(workdir, log_level=args.log_level, name="mcpgw-pooled", pool_size=args.pooled))
    if args.peers:
        peer_problems = install_peers(log)
        if "supergateway" not in peer_problems:
            targets.append(Supergateway(workdir))
        if "mcp-proxy" not in peer_problems:
            targets.append(McpProxy(workdir))
    if args.only:
        targets = [t for t in targets if t.name in args.only]
    rows: list[Row] = []
    load_start = loadavg()
    started = datetime.datetime.now()
    for t in targets:
        log(f"== {t.name} {t.version}")
        try:
            t.start()
            await measure_target(t, p, args, rows)
        except Exception as e:  # noqa: BLE001 - a target that cannot start is a failed row; the others still run
            log(f"  {t.name}: FAILED {e!r:.400}")
            rows.append(Row(t.name, "-", "start", ok=False, errors=1, note=f"{e!r:.300}"))
        finally:
            t.stop()
    for name, problem in peer_problems.items():
        rows.append(Row(name, "-", "install", ok=False, errors=1, note=problem))
    machine = machine_facts(targets, nofile)
    machine["load average (1, 5, 15 min) at start / at end"] = f"{load_start} / {loadavg()}"
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now() - started).total_seconds(), 1),
        "command": "python3 -m bench " + shlex.join(sys.argv[1:]),
        "profile": args.profile,
        "params": p,
        "large_bytes": args.large_bytes,
        "machine": machine,
        "commands": {t.name: t.commands for t in targets},
        "notes": {t.name: t.notes for t in targets},
    }
    out = Path(args.out) if args.out else default_out(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or default_stem(args.profile, started)
    doc = {"meta": meta, "rows": [r.to_json() for r in rows]}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    chart = None
    if not args.no_chart:
        chart = report.chart(doc, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(report.markdown(doc, chart.name if chart else None))
    log(f"bench: wrote {out / (stem + '.md')}" + (f", {chart}" if chart else "") + f" in {meta['duration_s']} s")
    bad = [r for r in rows if r.gateway == "mcpgw" and r.isolation]
    return 1 if bad else 0


#: Where a run writes when --out is not given: a smoke run checks that the bench runs, so its
#: figures go to bench/results/smoke/ (ignored by git), never beside the tracked full results.
SMOKE_RESULTS = RESULTS / "smoke"


def default_out(profile: str) -> Path:
    return SMOKE_RESULTS if profile == "smoke" else RESULTS


def default_stem(profile: str, started: datetime.datetime) -> str:
    """Today's date; a --quick run's names say so, so it never replaces a same-day full result."""
    day = started.strftime("%Y-%m-%d")
    return f"{day}-quick" if profile == "quick" else day


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", action="store_true", help="also install and measure supergateway (npm) and mcp-proxy (PyPI)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="profile", action="store_const", const="quick", help="smaller counts (about a minute)")
    group.add_argument("--smoke", dest="profile", action="store_const", const="smoke", help="tiny counts: checks the bench runs")
    ap.set_defaults(profile="full")
    ap.add_argument("--only", nargs="+", metavar="GATEWAY", help="direct, mcpgw, mcpgw-warm, mcpgw-pooled, supergateway, mcp-proxy")
    ap.add_argument("--pooled", type=int, default=0, metavar="N",
                    help='also measure mcpgw with the echo server "sessions": "pooled", poolSize N (row mcpgw-pooled: '
                         "sequential and throughput; every session shares N children); 0: not")
    ap.add_argument("--warm-pool", type=int, default=0, metavar="N",
                    help="also measure session setup of mcpgw with warmPool N (row mcpgw-warm); 0: not")
    ap.add_argument("--setup-gap", type=float, default=0.0, metavar="S",
                    help="seconds between sessions in the session-setup workload (default 0: back to back)")
    ap.add_argument("--transports", nargs="+", metavar="T", help="pipe, streamable, streamable-sse, sse, ws")
    ap.add_argument("--idle", metavar="N,N", help="idle stream counts (default 1000,10000 in the full profile)")
    ap.add_argument("--no-idle", action="store_true", help="skip the idle-stream workload")
    ap.add_argument("--large-bytes", type=int, default=MiB, help="payload of the large-message workload (default 1 MiB)")
    ap.add_argument("--log-level", default="info", help="mcpgw's logLevel (default info, as shipped)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one workload may take before it counts as failed")
    ap.add_argument("--out", help="results folder (default bench/results; --smoke: bench/results/smoke, ignored by git)")
    ap.add_argument("--name", help="file stem of the results (default: today's date; --quick: DATE-quick)")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
