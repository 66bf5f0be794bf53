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
    import aiohttp  # noqa: F401  (the bench's WebSocket client, in the test extra: missing, this fails)
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


def _tracked_results() -> dict[str, int]:
    """The files directly in bench/results (the tracked full runs): name -> mtime in ns."""
    results = ROOT / "bench" / "results"
    return {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.is_file()}


def test_smoke_run_leaves_the_tracked_results_alone():
    """Issue 20, item 10: ``python3 -m bench --smoke`` (no --out) writes under bench/results/smoke/,
    which git ignores, never ``bench/results/<today>.*`` where a full run's results live."""
    before = _tracked_results()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "direct", "--no-idle", "--no-chart"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _tracked_results() == before
    wrote = proc.stdout + proc.stderr
    smoke = ROOT / "bench" / "results" / "smoke"
    assert f"bench: wrote {smoke}/" in wrote, wrote[-2000:]
    written = [line.split("bench: wrote ", 1)[1].split(" in ")[0] for line in wrote.splitlines() if "bench: wrote " in line]
    md = Path(written[-1])
    assert md.parent == smoke and md.exists() and md.with_suffix(".json").exists()
    if (ROOT / ".git").exists():
        for path in (md, md.with_suffix(".json")):
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
            assert ignored.returncode == 0, f"{path} is not ignored by git"
