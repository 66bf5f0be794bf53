"""The benchmark still runs (tiny counts, no peers): ``python3 -m bench --smoke``.

No timing assertions: only that every workload produced a row, none failed,
and no session ever saw a reply that was not its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_bench_smoke_runs_and_isolation_is_zero(tmp_path):
    pytest.importorskip("aiohttp")  # the WebSocket client
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--pooled", "1", "--no-chart", "--out", str(tmp_path), "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "smoke.json").read_text())
    rows = doc["rows"]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    seen = {(r["gateway"], r["transport"], r["workload"]) for r in rows}
    for transport in ("streamable", "sse", "ws"):
        for workload in ("sequential", "throughput", "setup", "large"):
            assert ("mcpgw", transport, workload) in seen
    assert ("mcpgw", "streamable-sse", "sequential") in seen
    assert ("mcpgw", "sse", "idle") in seen
    assert ("direct", "pipe", "sequential") in seen
    for transport in ("streamable", "sse", "ws"):  # --pooled: every session shares the pool's child
        assert ("mcpgw-pooled", transport, "throughput") in seen
    for r in rows:
        assert r["isolation"] == 0, r
        assert r["errors"] == 0, r
    md = (tmp_path / "smoke.md").read_text()
    assert "| isolation: foreign or mismatched replies, all rows | 0 | 0 |" in md
