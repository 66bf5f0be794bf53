"""Issue 2, point 2: the MCP conformance suite (server scenarios, --suite all) through the gateway.

The npm package @modelcontextprotocol/conformance drives /mcp; our own stdio
fixture (tests/fixtures/conformance_server.py) sits behind the gateway and
implements the tools, resources and prompts the scenarios call.
tests/conformance/run.sh installs Node 22 and the suite on first use.

Issue 22: the run must show the CLI's exit code 0, exactly the suite's scenarios by name, no failure,
no warning, and no scenario without a passed check but those tests/conformance/results.py allows (with
the reason).
"""

import shutil

import pytest

from tests.conformance.results import run_handshake_suite
from tests.gateway_process import fixture_server

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_conformance_suite_all_scenarios_pass(make_gateway):
    gw = make_gateway({"mcpServers": {"conformance": fixture_server()}})
    run_handshake_suite(f"{gw.url}/mcp")
