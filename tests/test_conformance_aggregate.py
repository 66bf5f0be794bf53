"""Issue 10, point 3: the MCP conformance suite through an aggregated server.

The aggregate ``all`` (prefix ``on-collision``) holds the conformance fixture and a
second stdio server (tests/fixtures/names_server.py) whose tool names do not collide
with the fixture's, so every scenario sees the fixture's own names while the gateway
fans out, merges and routes. Same runner and assertions as tests/test_conformance.py.
"""

import shutil
import sys
from pathlib import Path

import pytest

from tests.conformance.results import run_handshake_suite
from tests.gateway_process import fixture_server

HERE = Path(__file__).resolve().parent
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
    """Every server scenario passes on /servers/all/mcp (fixture + a non-colliding server, on-collision), with the
    assertions of tests/conformance/results.py (exit code, exact scenario set, no failure, no warning)."""
    gw = make_gateway(aggregate_config())
    run_handshake_suite(f"{gw.url}/servers/all/mcp")
