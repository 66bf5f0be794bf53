"""Issue 9, must-show 2: the conformance suite's 2026-07-28 scenarios through the gateway, pooled children.

The npm package @modelcontextprotocol/conformance has 2026-07-28 scenarios only in its 0.2.0 alphas
(``--requirements 2026-07-28``: the revision's frozen requirement set); tests/conformance/run.sh keeps 0.1.16
for the handshake-version scenarios (tests/test_conformance.py). This test installs the alpha (and Node 22)
once into ``$CONFORMANCE_MODERN_DIR`` (default ~/.cache/mcpgw-conformance-2026), runs the requirement set
against a gateway whose fixture server is ``"sessions": "pooled"``, and requires (issue 22) the CLI's exit
code 0, the exact scenario set by name, no failure and no warning (the tasks extension aside: reported,
never scored, not implemented), and a passed check in every scenario.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import cache_lock
from tests.conformance import results
from tests.gateway_process import fixture_server

pytestmark = pytest.mark.integration
VERSION = "0.2.0-alpha.12"
NODE_MAJOR = "22"
DIR = Path(os.environ.get("CONFORMANCE_MODERN_DIR", Path.home() / ".cache" / "mcpgw-conformance-2026"))
CLI = DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
NODE = DIR / "node_modules" / "node" / "bin" / "node"

#: The server scenarios ``--requirements 2026-07-28`` runs and scores (the revision's frozen requirement set).
REQUIRED = frozenset({
    "server-stateless", "completion-complete", "tools-list", "tools-call-simple-text", "tools-call-image",
    "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content", "tools-call-error",
    "tools-call-with-progress", "server-sse-multiple-streams", "resources-list", "resources-read-text",
    "resources-read-binary", "resources-templates-read", "sep-2164-resource-not-found", "prompts-list",
    "prompts-get-simple", "prompts-get-with-args", "prompts-get-embedded-resource", "prompts-get-with-image",
    "dns-rebinding-protection", "caching", "input-required-result-basic-elicitation",
    "input-required-result-basic-sampling", "input-required-result-basic-list-roots",
    "input-required-result-request-state", "input-required-result-multiple-input-requests",
    "input-required-result-multi-round", "input-required-result-missing-input-response",
    "input-required-result-non-tool-request", "input-required-result-result-type",
    "input-required-result-unsupported-methods", "input-required-result-tampered-state",
    "input-required-result-capability-check", "input-required-result-ignore-extra-params",
    "input-required-result-validate-input",
})
#: Run and reported with the requirement set, never scored: pending scenarios (they must pass here all the same).
PENDING = frozenset({"json-schema-2020-12", "http-header-validation", "http-custom-header-server-validation"})
#: The tasks extension (io.modelcontextprotocol/tasks): run and reported, never scored; the gateway implements no
#: tasks (its children are handshake-era servers), so these fail and are left aside, as the issue says.
TASKS = {name: "the gateway implements no tasks extension" for name in (
    "tasks-lifecycle", "tasks-capability-negotiation", "tasks-wire-fields", "tasks-request-state-removal",
    "tasks-mrtr-input", "tasks-request-headers", "tasks-dispatch-and-envelope", "tasks-status-notifications",
    "tasks-required-task-error", "tasks-mrtr-composition")}
#: Check ids allowed to be WARNING, and why (none: issue 22 closed sep-2322-ignore-unexpected-params and
#: sep-2164-error-code).
WARNINGS_OK: dict[str, str] = {}
#: Scenarios allowed to pass without a SUCCESS check, and why (none).
EMPTY_OK: dict[str, str] = {}


def _installed(directory: Path) -> bool:
    cli, node = directory / CLI.relative_to(DIR), directory / NODE.relative_to(DIR)
    return cli.is_file() and node.is_file() and \
        json.loads((cli.parent.parent / "package.json").read_text()).get("version") == VERSION


def _install(directory: Path) -> None:
    """npm install into ``directory`` (a fresh one: tests/cache_lock.py renames it to DIR); an npm failure fails."""
    (directory / "package.json").write_text('{"private": true, "allowScripts": {"node": true}}\n')
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--save-exact", "--loglevel=error",
                           f"@modelcontextprotocol/conformance@{VERSION}", f"node@{NODE_MAJOR}"],
                          cwd=directory, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"npm cannot install the conformance suite: {done.stderr.strip()[-2000:]}"


#: The checks that need the fixture's ``_meta["mcpgw/inputKey"]`` hint, because the scenario names the
#: inputRequests key itself (``user_name``); without the hint the child's request is keyed ``elicitation``.
NEEDS_INPUT_KEY = {
    # input-required-result-basic-elicitation: requires inputRequests.user_name (its retry is then not run).
    "sep-2322-elicitation-incomplete": "FAILURE",
    # input-required-result-ignore-extra-params: sends inputResponses.user_name with its first request.
    "sep-2322-ignore-unexpected-params": "WARNING",
}


def run_requirements(make_gateway, **env: str) -> tuple[int, dict[str, list[dict]]]:
    """``conformance server --requirements 2026-07-28`` against a pooled fixture (``env``: the fixture's): the
    CLI's exit code and the saved results."""
    cache_lock.cached(DIR, _installed, _install)  # one installer at a time (pytest -n, two checkouts)
    # Several scenarios never retry an InputRequiredResult (streaming elicitation, missing / invalid
    # inputResponses, the tampered retry): their calls stay parked in the children (poolInputWait), which must not
    # keep the later scenarios' requests on the same children from being bridged. Two children.
    gw = make_gateway({"mcpServers": {"conformance": fixture_server(sessions="pooled", poolSize=2, env=env)}})
    with tempfile.TemporaryDirectory(prefix="mcpgw-conformance-2026-") as out:
        result = subprocess.run([str(NODE), str(CLI), "server", "--url", f"{gw.url}/mcp",
                                 "--requirements", "2026-07-28", "--output-dir", out],
                                capture_output=True, text=True, timeout=840, check=False)
        print(result.stdout[-6000:] + result.stderr[-2000:])
        ran = results.load(out)
    print(results.table(ran))
    return result.returncode, ran


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_conformance_2026_07_28_requirements(make_gateway):
    """Must-show 1: the 2026-07-28 requirement set (``--requirements 2026-07-28``) passes through a pooled server
    whose fixture tools are plain handshake-era tools, tampered-state and capability-check included: the CLI
    exits 0, exactly REQUIRED + PENDING + the tasks extension run, no failure and no warning outside the tasks
    extension, and every scenario has a passed check."""
    code, ran = run_requirements(make_gateway)
    assert code == 0, results.table(ran)
    results.verify(ran, REQUIRED | PENDING | set(TASKS), empty_ok=EMPTY_OK, warnings_ok=WARNINGS_OK, unscored=TASKS)
    passed = {c["id"] for checks in ran.values() for c in checks if c["status"] == "SUCCESS"}
    for must in ("sep-2322-reject-tampered-state", "sep-2322-respect-client-capabilities",
                 "sep-2322-ignore-unexpected-params", "sep-2164-error-code", "sep-2575-server-rejects-undeclared-capability"):
        assert must in passed, must


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_which_passes_need_the_input_key_hint(make_gateway):
    """docs/conformance.md: with a fixture that names none of its requests (``FIXTURE_INPUT_KEYS=0``) every check
    outside the tasks extension passes but exactly NEEDS_INPUT_KEY: those are the passes the hint buys."""
    code, ran = run_requirements(make_gateway, FIXTURE_INPUT_KEYS="0")
    assert code != 0  # a required check fails without the hint
    assert set(ran) == REQUIRED | PENDING | set(TASKS)
    problems = {c["id"]: c["status"] for name, checks in ran.items() if name not in TASKS
                for c in checks if c["status"] in ("FAILURE", "WARNING")}
    assert problems == NEEDS_INPUT_KEY, results.table(ran)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to install the conformance suite")
@pytest.mark.timeout(900)
def test_handshake_scenarios_through_a_pooled_server(make_gateway):
    """The handshake-version scenarios (tests/conformance/run.sh, 0.1.16) pass with the fixture
    ``"sessions": "pooled"`` too, with the same assertions as tests/test_conformance.py: sessions without a child
    of their own; sampling and elicitation relayed to clients that declared them (and only to those)."""
    gw = make_gateway({"mcpServers": {"conformance": fixture_server(sessions="pooled", poolSize=2)}})
    results.run_handshake_suite(f"{gw.url}/mcp")
