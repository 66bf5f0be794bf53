"""Results as markdown (summary like issue 8's table, targets, every row) and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GATEWAYS = ("direct", "mcpgw", "supergateway", "mcp-proxy")
TRANSPORT_NAMES = {
    "pipe": "direct pipes",
    "streamable": "Streamable HTTP",
    "streamable-sse": "Streamable HTTP, SSE answers",
    "sse": "legacy HTTP+SSE",
    "ws": "WebSocket",
}


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def describe(r: Any) -> str:
    """One line for the console."""
    r = r if isinstance(r, dict) else r.to_json()
    if not r["ok"] and r["workload"] != "idle":
        return f"FAILED {r['note']}"
    parts = []
    if r["workload"] == "idle":
        parts.append(f"{r['sessions']} streams: {_n(r['value'], 1)} KiB/stream")
    elif r["lat_us"]:
        lat = r["lat_us"]
        parts.append(f"p50 {_n(lat['p50'])} p90 {_n(lat['p90'])} p99 {_n(lat['p99'])} max {_n(lat['max'])} us")
    if r["rate"] and r["workload"] in ("sequential", "throughput"):
        parts.append(f"{_n(r['rate'])} calls/s")
    if r["client_cpu_us"] is not None:
        parts.append(f"cpu client {_n(r['client_cpu_us'])} gw {_n(r['gw_cpu_us'])} us/call")
    parts.append(f"isolation {r['isolation']}")
    if r["errors"]:
        parts.append(f"errors {r['errors']}")
    if r["mode"]:
        parts.append(f"mode {r['mode']}")
    return ", ".join(parts)


class Results:
    def __init__(self, doc: dict[str, Any]):
        self.meta = doc["meta"]
        self.rows = doc["rows"]

    def find(self, gw: str, transport: str, workload: str, sessions: int | None = None) -> dict | None:
        for r in self.rows:
            if r["gateway"] == gw and r["transport"] == transport and r["workload"] == workload:
                if sessions is None or r["sessions"] == sessions:
                    return r
        return None

    def gateways(self) -> list[str]:
        seen = [g for g in GATEWAYS if any(r["gateway"] == g for r in self.rows)]
        return seen + sorted({r["gateway"] for r in self.rows} - set(seen))

    def max_sessions(self) -> int:
        return max([r["sessions"] for r in self.rows if r["workload"] == "throughput"] or [0])


def _fail(r: dict) -> str:
    note = r["note"].split(" b'")[0].split(' b"')[0].replace("|", "/").replace("\n", " ")
    return f"failed: {note[:90]}"


def _leak(r: dict) -> str:
    return f" (**{r['isolation']} foreign replies**)" if r["isolation"] else ""


def cell_p50(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["ok"] or not r["lat_us"]:
        return _fail(r)
    return f"{_n(r['lat_us']['p50'])} µs" + _leak(r)


def cell_rate(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["ok"] or not r["rate"]:
        return _fail(r)
    return f"{_n(r['rate'])} calls/s" + _leak(r)


def cell_ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["ok"] or r["value"] is None:
        return _fail(r)
    return f"{_n(r['value'], 1)} ms" + _leak(r)


def cell_idle(res: Results, gw: str) -> str:
    rows = [r for r in res.rows if r["gateway"] == gw and r["workload"] == "idle"]
    if not rows:
        return "-"
    out = []
    for r in rows:
        if r["value"] is not None:
            out.append(f"{_n(r['value'], 1)} KiB ({_n(r['sessions'])} streams{'' if r['ok'] else ', ' + str(r['errors']) + ' lost'})")
        else:
            out.append(_fail(r))
    return "; ".join(out)


def summary_table(res: Results) -> list[str]:
    gws = res.gateways()
    S = res.max_sessions()
    calls = None
    r50 = res.find("mcpgw", "streamable", "throughput", S) or res.find("direct", "pipe", "throughput", S)
    if r50:
        calls = r50["calls"] // max(1, r50["sessions"])
    head = ["figure (same run)"] + [("direct pipes (floor)" if g == "direct" else f"{g} {res.meta['machine'].get(g, '').split()[0] if res.meta['machine'].get(g) else ''}".strip()) for g in gws]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, fn) -> None:
        lines.append("| " + label + " | " + " | ".join(fn(g) for g in gws) + " |")

    def floor_or(gw: str, transport: str, workload: str, cell, sessions: int | None = None) -> str:
        if gw == "direct":
            return cell(res.find("direct", "pipe", workload, sessions))
        return cell(res.find(gw, transport, workload, sessions))

    row("Streamable HTTP, 1 session, sequential echo p50", lambda g: floor_or(g, "streamable", "sequential", cell_p50))
    row(f"Streamable HTTP, {S} sessions x {calls} calls", lambda g: floor_or(g, "streamable", "throughput", cell_rate, S))
    row("Streamable HTTP with SSE answers (progress first), p50", lambda g: "" if g == "direct" else cell_p50(res.find(g, "streamable-sse", "sequential")))
    row(f"Streamable HTTP with SSE answers, {S} sessions", lambda g: "" if g == "direct" else cell_rate(res.find(g, "streamable-sse", "throughput", S)))
    row("legacy SSE, sequential echo p50", lambda g: floor_or(g, "sse", "sequential", cell_p50))
    row(f"legacy SSE, {S} sessions x {calls} calls", lambda g: floor_or(g, "sse", "throughput", cell_rate, S))
    row("WebSocket, sequential echo p50", lambda g: floor_or(g, "ws", "sequential", cell_p50))
    row(f"WebSocket, {S} sessions x {calls} calls", lambda g: floor_or(g, "ws", "throughput", cell_rate, S))
    row("gateway RSS per idle open stream", lambda g: "-" if g == "direct" else cell_idle(res, g))
    for tr in ("streamable", "sse", "ws"):
        row(f"{_mib(res)} request round trip, {TRANSPORT_NAMES[tr]} (p50)", lambda g, tr=tr: floor_or(g, tr, "large", cell_ms))
    def setup_cell(g: str) -> str:
        cell = floor_or(g, "streamable", "setup", cell_ms)
        spaced = res.find(g, "streamable", "setup-spaced")
        return f"{cell} back to back; {cell_ms(spaced)} {spaced['note']}" if spaced else cell

    row("session setup p50 (initialize reply; Streamable HTTP)", setup_cell)
    row("session setup p50, legacy SSE / WebSocket",
        lambda g: "" if g == "direct" else f"{cell_ms(res.find(g, 'sse', 'setup'))} / {cell_ms(res.find(g, 'ws', 'setup'))}")
    row(f"gateway / client CPU per call, Streamable HTTP, {S} sessions",
        lambda g: _cpu(res.find("direct", "pipe", "throughput", S) if g == "direct" else res.find(g, "streamable", "throughput", S)))
    row(f"gateway / client CPU per call, WebSocket, {S} sessions",
        lambda g: "" if g == "direct" else _cpu(res.find(g, "ws", "throughput", S)))
    row("isolation: foreign or mismatched replies, all rows", lambda g: str(sum(r["isolation"] for r in res.rows if r["gateway"] == g)))
    return lines


def _cpu(r: dict | None) -> str:
    if r is None or not r["ok"] or r["client_cpu_us"] is None:
        return "-"
    gw = "-" if r["gw_cpu_us"] is None else f"{_n(r['gw_cpu_us'])} µs"
    return f"{gw} / {_n(r['client_cpu_us'])} µs"


def _mib(res: Results) -> str:
    b = res.meta.get("large_bytes", 1 << 20)
    return f"{b / (1 << 20):g} MiB" if b >= 1 << 20 else f"{b / 1024:g} KiB"


def targets_table(res: Results) -> list[str]:
    """Issue 8's targets, each met or the gap stated."""
    S = res.max_sessions()
    peers = [g for g in res.gateways() if g != "direct" and not g.startswith("mcpgw")]
    lines = ["| target | measured | met? |", "|---|---|---|"]

    def add(target: str, measured: str, met: bool | None) -> None:
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no' if met is False else 'n/a'} |")

    def best_peer(transport: str) -> tuple[str | None, float | None]:
        best = (None, None)
        for g in peers:
            r = res.find(g, transport, "throughput", S)
            if r and r["ok"] and r["rate"] and (best[1] is None or r["rate"] > best[1]):
                best = (g, r["rate"])
        return best

    for tr in ("streamable", "streamable-sse", "sse"):
        r = res.find("mcpgw", tr, "sequential")
        if r and r["ok"] and r["lat_us"]:
            add(f"{TRANSPORT_NAMES[tr]} p50 < 400 µs", f"{_n(r['lat_us']['p50'])} µs", r["lat_us"]["p50"] < 400)
        r = res.find("mcpgw", tr, "throughput", S)
        peer, rate = best_peer("streamable" if tr == "streamable-sse" else tr)
        if r and r["ok"] and r["rate"]:
            if rate:
                add(f"{TRANSPORT_NAMES[tr]}, {S} sessions: >= 2.5x best peer ({peer}, {_n(rate)} calls/s)",
                    f"{_n(r['rate'])} calls/s = {r['rate'] / rate:.2f}x", r["rate"] >= 2.5 * rate)
            else:
                add(f"{TRANSPORT_NAMES[tr]}, {S} sessions: >= 2.5x best peer", f"{_n(r['rate'])} calls/s (no peer measured)", None)
    r = res.find("mcpgw", "ws", "throughput", S)
    peer, rate = best_peer("ws")
    if r and r["ok"] and r["rate"]:
        add(f"WebSocket, {S} sessions: >= best peer ({peer or 'none'}{', ' + _n(rate) + ' calls/s' if rate else ''})",
            f"{_n(r['rate'])} calls/s" + (f" = {r['rate'] / rate:.2f}x" if rate else ""), (r["rate"] >= rate) if rate else None)
    r = res.find("mcpgw-pooled", "ws", "throughput", S)
    if r and r["ok"] and r["rate"] and rate:  # like for like: supergateway's WebSocket mode shares one child too
        add(f"WebSocket, {S} sessions, children shared (mcpgw-pooled; {peer} shares one): >= best peer",
            f"{_n(r['rate'])} calls/s = {r['rate'] / rate:.2f}x", r["rate"] >= rate)
    idle = [r for r in res.rows if r["gateway"] == "mcpgw" and r["workload"] == "idle"]
    for r in idle:
        if r["value"] is not None:
            add(f"<= 30 KiB gateway memory per idle stream ({_n(r['sessions'])} streams)", f"{_n(r['value'], 1)} KiB", r["value"] <= 30)
    if idle:
        top = max(idle, key=lambda r: r["sessions"])
        add("10,000 idle open streams held by one process", f"{_n(top['calls'])} of {_n(top['sessions'])} open" + ("" if top["ok"] else f" ({top['note'][:80]})"),
            top["ok"] and top["sessions"] >= 10000)
    floor = res.find("direct", "pipe", "large")
    for tr in ("streamable", "sse", "ws"):
        r = res.find("mcpgw", tr, "large")
        if r and floor and floor["value"]:
            if r["ok"] and r["value"] is not None:
                add(f"{_mib(res)} intact in < 2x the floor ({_n(floor['value'], 1)} ms), {TRANSPORT_NAMES[tr]}",
                    f"{_n(r['value'], 1)} ms = {r['value'] / floor['value']:.2f}x, {'intact' if not r['isolation'] else 'CORRUPT'}",
                    r["value"] < 2 * floor["value"] and not r["isolation"])
            else:
                add(f"{_mib(res)} intact, {TRANSPORT_NAMES[tr]}", _fail(r), False)
    spawn = res.find("direct", "pipe", "setup")
    r = res.find("mcpgw", "streamable", "setup")
    if r and r["ok"] and r.get("paired_delta_ms") is not None:  # judged on sessions paired with a bare spawn
        add(f"session setup within 3 ms of the bare spawn ({_n(r['paired_floor_ms'], 1)} ms, spawned just before each session)",
            f"{_n(r['value'], 1)} ms (median difference {r['paired_delta_ms']:+.1f} ms)", r["paired_delta_ms"] <= 3)
    elif r and spawn and r["ok"] and spawn["ok"]:
        add(f"session setup within 3 ms of the bare spawn ({_n(spawn['value'], 1)} ms)",
            f"{_n(r['value'], 1)} ms (+{r['value'] - spawn['value']:.1f} ms)", r["value"] - spawn["value"] <= 3)
    warm = res.find("mcpgw-warm", "streamable", "setup")
    spaced = res.find("mcpgw-warm", "streamable", "setup-spaced")
    if spaced:  # the pool has children when each session comes; back to back it refills no faster than a spawn
        add("session setup < 2 ms with a warm pool",
            f"{cell_ms(spaced)} ({spaced['note']}); back to back (sustained) {cell_ms(warm)}",
            spaced["ok"] and spaced["value"] < 2)
    else:
        add("session setup < 2 ms with a warm pool", cell_ms(warm) if warm else "not measured (run the bench with `--warm-pool N`)",
            (warm["ok"] and warm["value"] < 2) if warm else False)
    bad = [f"{r['transport']} {r['workload']}" for r in res.rows if r["gateway"] == "mcpgw" and r["isolation"]]
    add("isolation zero on every mcpgw row", "0" if not bad else f"non-zero on {', '.join(bad)}", not bad)
    return lines


def detail_table(res: Results) -> list[str]:
    head = ["gateway", "transport", "workload", "sessions", "calls", "p50 µs", "p90 µs", "p99 µs", "max µs", "calls/s",
            "client CPU µs/call", "gateway CPU µs/call", "isolation", "errors", "value", "answer mode", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res.rows:
        lat = r["lat_us"] or {}
        value = "" if r["value"] is None else f"{_n(r['value'], 1)} {r['unit']}"
        note = r["note"].split(" b'")[0].split(' b"')[0].replace("|", "/").replace("\n", " ")[:160]
        lines.append("| " + " | ".join([
            r["gateway"], r["transport"], r["workload"], str(r["sessions"]), str(r["calls"]),
            _n(lat.get("p50")), _n(lat.get("p90")), _n(lat.get("p99")), _n(lat.get("max")),
            _n(r["rate"]) if r["workload"] in ("sequential", "throughput") else "",
            _n(r["client_cpu_us"]), _n(r["gw_cpu_us"]), str(r["isolation"]), str(r["errors"]), value, r["mode"],
            ("" if r["ok"] else "FAILED: ") + note,
        ]) + " |")
    return lines


def markdown(doc: dict[str, Any], chart_name: str | None) -> str:
    res = Results(doc)
    m = res.meta
    out = [f"# mcpgw benchmark, {m['date']}", ""]
    out += [f"Command: `{m['command']}` (profile `{m['profile']}`, {m['duration_s']} s). "
            "All figures are from this one run on this machine; client, gateways and children share its cores.", ""]
    out += ["## Summary", ""] + summary_table(res) + [""]
    if chart_name:
        out += [f"![chart]({chart_name})", ""]
    out += ["## Targets (issue 8)", ""] + targets_table(res) + [""]
    out += ["## Machine", ""] + [f"- {k}: {v}" for k, v in m["machine"].items()] + [""]
    out += ["## Every row", "",
            "Latencies are per call as the client saw it; CPU is user+system time per call over the measured stretch "
            "(client: the bench process, `getrusage`; gateway: its main process and threads, `/proc/PID/stat`, 10 ms ticks). "
            "`isolation` counts replies a session received that were not its own or not what it sent: any non-zero value "
            "invalidates the row. `answer mode` is how replies came back (json: `application/json`, sse: an event stream).", ""]
    out += detail_table(res) + [""]
    out += ["## Commands", "", f"- bench: `{m['command']}`"]
    for gw, cmds in m["commands"].items():
        for c in cmds:
            out.append(f"- {gw}: `{c}`")
    for gw, notes in m.get("notes", {}).items():
        for n in notes:
            out.append(f"- {gw}: {n}")
    out += ["", "Parameters: " + ", ".join(f"{k}={v}" for k, v in m["params"].items()), ""]
    return "\n".join(out)


def chart(doc: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return None
    res = Results(doc)
    gws = res.gateways()
    S = res.max_sessions()
    transports = ["streamable", "streamable-sse", "sse", "ws"]
    colors = {"direct": "#777777", "mcpgw": "#1f77b4", "supergateway": "#ff7f0e", "mcp-proxy": "#2ca02c"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))

    def bars(ax, title: str, ylabel: str, getter, log: bool = False) -> None:
        width = 0.8 / max(1, len(gws))
        for i, g in enumerate(gws):
            xs, ys = [], []
            for j, tr in enumerate(transports):
                v = getter(g, tr)
                if v:
                    xs.append(j + (i - (len(gws) - 1) / 2) * width)
                    ys.append(v)
            b = ax.bar(xs, ys, width, label=g, color=colors.get(g))
            ax.bar_label(b, labels=[f"{y:,.0f}" if y >= 10 else f"{y:.1f}" for y in ys], fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(transports)), [TRANSPORT_NAMES[t].replace(", ", ",\n") for t in transports], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)

    def floor(tr: str, workload: str, sessions: int | None = None) -> dict | None:
        return res.find("direct", "pipe", workload, sessions)

    def get(g: str, tr: str, workload: str, sessions: int | None = None) -> dict | None:
        r = floor(tr, workload, sessions) if g == "direct" else res.find(g, tr, workload, sessions)
        return r if r and r["ok"] else None

    bars(axes[0][0], "sequential echo, p50 (µs, log; floor = direct pipes)", "µs",
         lambda g, tr: (get(g, tr, "sequential") or {}).get("lat_us", {}).get("p50"), log=True)
    bars(axes[0][1], f"throughput, {S} sessions (calls/s)", "calls/s",
         lambda g, tr: (get(g, tr, "throughput", S) or {}).get("rate"))
    bars(axes[1][0], "1 MiB round trip, p50 (ms)", "ms",
         lambda g, tr: None if tr == "streamable-sse" else (get(g, tr, "large") or {}).get("value"))
    ax = axes[1][1]
    names, vals = [], []
    for g in gws:
        for r in res.rows:
            if r["gateway"] == g and r["workload"] == "idle" and r["value"] is not None:
                names.append(f"{g}\n{r['sessions']:,}")
                vals.append(r["value"])
    b = ax.bar(range(len(vals)), vals, color=[colors.get(n.split("\n")[0]) for n in names])
    ax.bar_label(b, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.axhline(30, color="red", linestyle="--", linewidth=0.8)
    ax.set_title("gateway RSS per idle open SSE stream (KiB; target 30)", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"mcpgw bench {res.meta['date']} - {res.meta['machine'].get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
