"""Issue 10, point 3: the MCP conformance suite through an aggregated server.

The aggregate ``all`` (prefix ``on-collision``) holds the conformance fixture and a
second stdio server (tests/fixtures/names_server.py) whose tool names do not collide
with the fixture's, so every scenario sees the fixture's own names while the gateway
fans out, merges and routes. Same runner as tests/test_conformance.py.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway_process import fixture_server

HERE = Path(__file__).resolve().parent
RUN = HERE / "conformance" / "run.sh"
NAMES_SERVER = HERE / "fixtures" / "names_server.py"
pytestmark = pytest.mark.integration


def aggregate_config() -> dict:
    extra = {"command": sys.executable, "args": [str(NAMES_SERVER), "--name", "extra", "--tools", "extra_tool,other_tool"]}
    return {
        "mcpServers": {"conformance": fixture_server(), "extra": extra},
        "aggregate": {"name": "all", "servers": ["conformance", "extra"], "prefix": "on-collision"},
    }


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_conformance_suite_passes_through_an_aggregate(make_gateway):
    """Every server scenario passes on /servers/all/mcp (fixture + a non-colliding server, on-collision)."""
    gw = make_gateway(aggregate_config())
    result = subprocess.run(["bash", str(RUN), f"{gw.url}/servers/all/mcp"], capture_output=True, text=True, timeout=840, check=False)
    report = result.stdout + result.stderr
    print(report)
    assert result.returncode == 0, report[-8000:]
    assert "=== CONFORMANCE RESULTS ===" in report
    assert "scenarios: " in report and " 0 failed" in report.split("scenarios: ")[-1]
