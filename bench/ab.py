"""Before/after in one run: ``python3 -m bench.ab --before DIR [--rounds 5]``.

DIR holds another copy of the ``mcpgw`` package (e.g. ``git stash``-free:
``mkdir -p /tmp/before && git archive HEAD mcpgw | tar -x -C /tmp/before``), or ``.`` for this
tree itself with ``--before-env``: ``--before . --before-env MCPGW_FAST_PATHS=0`` compares the
public paths (before) with the fast paths (after).
``--tracing`` gives both gateways a ``tracing`` section (sampleRatio 1.0) exporting to a sink in a
process of its own (bench/otlp_sink.py): ``--before . --before-env OTEL_SDK_DISABLED=true --tracing`` compares
tracing off (before) with tracing on at ratio 1.0 (after).
Both gateways run side by side; the workloads alternate between them
(ABAB...) so that a busy neighbour on the shared cores hits both alike, and
the medians over the rounds are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from bench import workloads
from bench.targets import Mcpgw, mkworkdir, raise_nofile

MiB = 1 << 20


async def one_round(t: Mcpgw, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    make = lambda: t.client(args.transport)  # noqa: E731
    pid = t.pid(args.transport)
    if args.seq:
        r = await workloads.sequential(make, t.name, args.transport, pid, args.seq, 50)
        out["p50 us"] = r.lat_us["p50"]
        out["seq gw CPU us/call"] = r.gw_cpu_us
    if args.calls:
        r = await workloads.throughput(make, t.name, args.transport, pid, args.sessions, args.calls)
        out[f"calls/s @{args.sessions}"] = r.rate
        out[f"gw CPU us/call @{args.sessions}"] = r.gw_cpu_us
        out["client CPU us/call"] = r.client_cpu_us
        if r.isolation:
            raise RuntimeError(f"{t.name}: isolation {r.isolation}")
    if args.large:
        r = await workloads.large(make, t.name, args.transport, pid, MiB, args.large)
        out["1 MiB ms"] = r.value
        out["1 MiB gw CPU ms"] = r.gw_cpu_us / 1000 if r.gw_cpu_us is not None else float("nan")
        if r.isolation:
            raise RuntimeError(f"{t.name}: 1 MiB corrupted")
    return out


async def amain(args: argparse.Namespace) -> None:
    workdir = mkworkdir()
    environ = dict(item.split("=", 1) for item in args.before_env)
    before = None if args.before == "." else args.before
    config: dict[str, object] = {}
    sink = None
    if args.tracing:
        from bench import otlp_sink

        sink = otlp_sink.start()
        config["tracing"] = {"enabled": True, "endpoint": sink.endpoint, "sampleRatio": 1.0, "serviceName": "mcpgw-bench"}
    targets = [Mcpgw(workdir, name="before", pythonpath=before, environ=environ, config=config),
               Mcpgw(workdir, name="after", config=config)]
    for t in targets:
        t.start()
    try:
        results: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        for i in range(args.rounds):
            order = targets if i % 2 == 0 else targets[::-1]
            for t in order:
                results[t.name].append(await one_round(t, args))
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        keys = list(results["before"][0])
        print(f"\n{args.transport}, medians of {args.rounds} alternating rounds\n")
        print("| figure | before | after | change |\n|---|---|---|---|")
        for k in keys:
            b = statistics.median(r[k] for r in results["before"])
            a = statistics.median(r[k] for r in results["after"])
            print(f"| {k} | {b:,.1f} | {a:,.1f} | {100 * (a - b) / b:+.1f}% |")
    finally:
        for t in targets:
            t.stop()
        if sink is not None:
            sink.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="folder holding the 'before' mcpgw package")
    ap.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the 'before' gateway only (repeatable)")
    ap.add_argument("--transport", default="streamable", choices=["streamable", "sse", "ws"])
    ap.add_argument("--tracing", action="store_true", help="a tracing section (ratio 1.0, to a sink process) for both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=1000, help="sequential calls per round (0: none)")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--calls", type=int, default=100, help="calls per session in the throughput part (0: none)")
    ap.add_argument("--large", type=int, default=5, help="1 MiB round trips per round (0: none)")
    args = ap.parse_args()
    raise_nofile()
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
