"""Issue 2, point 2: the MCP conformance suite (server scenarios, --suite all) through the gateway.

The npm package @modelcontextprotocol/conformance drives /mcp; our own stdio
fixture (tests/fixtures/conformance_server.py) sits behind the gateway and
implements the tools, resources and prompts the scenarios call.
tests/conformance/run.sh installs Node 22 and the suite on first use.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.gateway_process import fixture_server

RUN = Path(__file__).resolve().parent / "conformance" / "run.sh"
pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_conformance_suite_all_scenarios_pass(make_gateway):
    gw = make_gateway({"mcpServers": {"conformance": fixture_server()}})
    result = subprocess.run(["bash", str(RUN), f"{gw.url}/mcp"], capture_output=True, text=True, timeout=840)
    report = result.stdout + result.stderr
    print(report)
    assert result.returncode == 0, report[-8000:]
    assert "=== CONFORMANCE RESULTS ===" in report
