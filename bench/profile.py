"""Profile mcpgw under load: ``python3 -m bench.profile [--transport streamable] [--sessions 50] [--seconds 15]``.

Starts a gateway, drives ``sessions`` sessions of back-to-back echo calls on
one transport for ``seconds``, and samples the gateway with py-spy meanwhile
(``--gil``: only samples that hold the GIL, i.e. Python work). Writes
``OUT.svg`` (flame graph) and ``OUT.txt`` (collapsed stacks) and prints the
functions with the largest own and cumulative share of the samples.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time

from bench.targets import Mcpgw, mkworkdir, raise_nofile
from bench.workloads import CpuWindow, big_text


async def drive(t: Mcpgw, transport: str, sessions: int, seconds: float, ready=lambda: None, payload: int = 0) -> tuple[int, CpuWindow]:
    """Open the sessions, call ``ready()`` (start the profiler), then load for ``seconds``."""
    wire = "streamable" if transport == "streamable-sse" else transport
    progress = transport == "streamable-sse"
    clients = [t.client(wire) for _ in range(sessions)]
    for i in range(0, sessions, 50):
        await asyncio.gather(*(c.connect() for c in clients[i:i + 50]))
    await asyncio.gather(*(c.call(0, "warm", progress) for c in clients))
    ready()
    await asyncio.sleep(0.5)
    done = 0
    stop = time.monotonic() + seconds
    pad = big_text(payload) if payload else ""

    async def run(k: int, c) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            i += 1
            text = f"p{k}-{i}" + pad
            if await c.call(i, text, progress) != text:
                raise RuntimeError("wrong reply")
            done += 1

    with CpuWindow(t.pid(wire)) as cpu:
        await asyncio.gather(*(run(k, c) for k, c in enumerate(clients)))
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return done, cpu


#: Where a sample's time goes: the category of the deepest frame that names one (leaf first).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("child spawn", ("_trySpawnInsteadOfFork", "spawnProcess")),
    ("logging (twisted.logger events)", ("Logger.emit", "LogPublisher", "FilteringLogObserver", "formatEvent")),
    ("JSON decode/encode (orjson)", ("jsonrpc.py",)),
    ("session id check (HMAC)", ("SessionIds.valid", "hmac.py")),
    ("response: headers, Date, write, finish", ("Request.write", "Request.finish", "Request.setHeader", "datetimeToString",
                                               "Request.setResponseCode", "HTTPChannel.writeHeaders", "_json (mcpgw",
                                               "SseResponse", "frame (mcpgw", "EventStream", "sendFrame", "sendMessage")),
    ("child stdout: framing and routing", ("StdioUpstream.outReceived", "LineFramer", "Session.upstreamMessage",
                                           "PostExchange.answer", "LegacyStream.answer", "WsConnection")),
    ("child stdin: relay", ("StdioUpstream.send", "Session.request", "Session.notify")),
    ("mcpgw request handling (guards, Accept, parse, route)", ("Guard.render", "StreamableEndpoint", "MessagesEndpoint",
                                                               "parse_messages", "media_types", "SessionManager.get",
                                                               "PostExchange.__init__", "onMessage (mcpgw")),
    ("twisted.web request object, resource lookup, Deferreds", ("Request.__init__", "Request.gotLength", "Request.process",
                                                               "Request.requestReceived", "getChildForRequest",
                                                               "Deferred", "notifyFinish", "Request.render")),
    ("HTTP parsing (request line, headers)", ("HTTPChannel", "LineReceiver", "http_headers.py", "_IdentityTransferDecoder")),
    ("WebSocket framing (autobahn)", ("autobahn",)),
    ("socket and pipe syscalls", ("writeToFD", "readFromFD", "_getsockname", "Connection.doRead", "writeSomeData",
                                  "untilConcludes", "doWrite")),
    ("reactor loop and dispatch (per-event log context without the mcpgw-epoll reactor)", ("callWithLogger", "callWithContext", "_doReadOrWrite", "doPoll", "mainLoop",
                                             "runUntilCurrent")),
]


def breakdown(collapsed: str) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(collapsed) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            frames = stack.split(";")
            name = "other"
            for fr in reversed(frames):
                hit = next((c for c, keys in CATEGORIES if any(k in fr for k in keys)), None)
                if hit:
                    name = hit
                    break
            counts[name] += int(n)
    return [(name, 100.0 * n / max(1, total)) for name, n in counts.most_common()]


def summarize(collapsed: str, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    with open(collapsed) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            count = int(n)
            total += count
            frames = stack.split(";")
            own[frames[-1]] += count
            for fr in set(frames):
                cum[fr] += count
    out = [f"{total} samples (GIL held)", "", "by category (deepest matching frame):"]
    out += [f"  {share:5.1f}%  {name}" for name, share in breakdown(collapsed)]
    out += ["", "own time:"]
    for fr, n in own.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {fr}")
    out += ["", "cumulative:"]
    for fr, n in cum.most_common(top + 20):
        out.append(f"  {100 * n / total:5.1f}%  {fr}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="streamable", choices=["streamable", "streamable-sse", "sse", "ws"])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--payload", type=int, default=0, help="bytes of text per call (e.g. 1048576 for the large-message path)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--no-spy", action="store_true", help="only the load (e.g. for py-spy top by hand)")
    ap.add_argument("--out", default="/tmp/mcpgw-profile")
    args = ap.parse_args()
    raise_nofile()
    spy = shutil.which("py-spy")
    if spy is None and not args.no_spy:
        print("py-spy is not installed: pip install py-spy (or -e '.[bench]')", file=sys.stderr)
        return 2
    t = Mcpgw(mkworkdir())
    t.start()
    pid = t.pid("streamable")
    procs: list[subprocess.Popen] = []

    def start_spy() -> None:
        if args.no_spy:
            return
        common = ["record", "--gil", "--nonblocking", "--rate", str(args.rate), "--pid", str(pid),
                  "--duration", str(int(args.seconds))]
        procs.append(subprocess.Popen([spy, *common, "-o", args.out + ".svg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([spy, *common, "--format", "raw", "-o", args.out + ".txt"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        print(f"gateway pid {pid}: {args.sessions} sessions on {args.transport} for {args.seconds:.0f} s", file=sys.stderr)
        done, cpu = asyncio.run(drive(t, args.transport, args.sessions, args.seconds, start_spy, args.payload))
        print(f"{done} calls, {done / cpu.wall:,.0f} calls/s; CPU per call: gateway {cpu.gw / done * 1e6:.0f} us, "
              f"client {cpu.client / done * 1e6:.0f} us (py-spy sampling adds its own cost)")
        for p in procs:
            p.wait(60)
        if not args.no_spy and os.path.exists(args.out + ".txt"):
            print(summarize(args.out + ".txt"))
            print(f"\nflame graph: {args.out}.svg, collapsed stacks: {args.out}.txt")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(10)
        t.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
