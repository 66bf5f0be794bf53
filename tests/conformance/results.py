"""What a conformance run must show, read from the CLI's saved ``checks.json`` files (one directory per scenario).

Every runner (tests/test_conformance*.py) asserts the same things (issue 22): the CLI's exit code, the exact
set of scenarios that ran (by name, not a count), no FAILURE and no WARNING (but those an explicit allow-list
names, each with its reason), and no scenario that "passed" without a single SUCCESS check (but those an
allow-list names, with the reason).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

#: A scenario directory: ``server-<scenario>-<ISO time stamp>``.
_DIR = re.compile(r"server-(?P<name>.+)-(?P<stamp>\d{4}-\d\d-\d\dT[\d-]+Z)")

#: The scenarios of ``conformance server --suite all`` in @modelcontextprotocol/conformance 0.1.16 (handshake versions).
HANDSHAKE_SCENARIOS = frozenset({
    "server-initialize", "logging-set-level", "ping", "completion-complete", "tools-list", "tools-call-simple-text",
    "tools-call-image", "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content",
    "tools-call-with-logging", "tools-call-error", "tools-call-with-progress", "tools-call-sampling",
    "tools-call-elicitation", "json-schema-2020-12", "elicitation-sep1034-defaults", "elicitation-sep1330-enums",
    "server-sse-polling", "server-sse-multiple-streams", "resources-list", "resources-read-text", "resources-read-binary",
    "resources-templates-read", "resources-subscribe", "resources-unsubscribe", "prompts-list", "prompts-get-simple",
    "prompts-get-with-args", "prompts-get-embedded-resource", "prompts-get-with-image", "dns-rebinding-protection",
})

#: Scenarios allowed to pass with no SUCCESS check, and why.
HANDSHAKE_EMPTY = {
    "server-sse-polling": "pending SEP-1699 scenario: its checks (priming event, retry field, close and resume) run only "
                          "when the POST is answered with an SSE stream; the gateway answers a call that completes "
                          "within sse.keepalive with JSON, so every check is INFO",
}


def load(directory: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """Scenario name -> its checks, from a CLI ``--output-dir``."""
    results: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(os.listdir(directory)):
        m = _DIR.fullmatch(entry)
        path = Path(directory, entry, "checks.json")
        if m is None or not path.is_file():
            continue
        if m["name"] in results:
            raise AssertionError(f"scenario {m['name']} ran twice")
        results[m["name"]] = json.loads(path.read_text())
    return results


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One line per scenario: the count of each check status, then every failure and warning."""
    lines = []
    for name, checks in sorted(results.items()):
        counts = Counter(c.get("status") for c in checks)
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for c in checks:
            if c.get("status") in ("FAILURE", "WARNING"):
                lines.append(f"    {c['status']} {c.get('id')}: {c.get('errorMessage') or c.get('description')}")
    return "\n".join(lines)


def verify(results: dict[str, list[dict[str, Any]]], expected: frozenset[str] | set[str], *,
           empty_ok: dict[str, str] | None = None, warnings_ok: dict[str, str] | None = None,
           unscored: dict[str, str] | None = None) -> None:
    """The run is clean: exactly ``expected`` ran; no FAILURE or WARNING outside ``unscored`` scenarios (reported,
    never scored: an extension the gateway does not implement) and ``warnings_ok`` check ids; every other
    scenario has at least one SUCCESS check unless ``empty_ok`` names it."""
    empty_ok, warnings_ok, unscored = empty_ok or {}, warnings_ok or {}, unscored or {}
    report = table(results)
    ran = set(results)
    assert ran == set(expected), f"missing {sorted(set(expected) - ran)}, unexpected {sorted(ran - set(expected))}\n{report}"
    problems = []
    for name, checks in results.items():
        if name in unscored:
            continue
        for c in checks:
            status = c.get("status")
            if status == "FAILURE" or (status == "WARNING" and c.get("id") not in warnings_ok):
                problems.append(f"{name}: {status} {c.get('id')}: {c.get('errorMessage')}")
        if not any(c.get("status") == "SUCCESS" for c in checks) and name not in empty_ok:
            problems.append(f"{name}: passed with no SUCCESS check")
    assert not problems, "\n".join(problems) + "\n\n" + report


RUN = Path(__file__).resolve().parent / "run.sh"


def run_handshake_suite(url: str) -> None:
    """tests/conformance/run.sh against ``url`` (0.1.16, --suite all): exit code 0, then ``verify`` with the
    handshake scenario set."""
    with tempfile.TemporaryDirectory(prefix="mcpgw-conformance-") as out:
        result = subprocess.run(["bash", str(RUN), url], capture_output=True, text=True, timeout=840, check=False,
                                env={**os.environ, "CONFORMANCE_RESULTS": out})
        report = result.stdout + result.stderr
        print(report)
        assert result.returncode == 0, report[-8000:]
        assert "=== CONFORMANCE RESULTS ===" in report
        verify(load(out), HANDSHAKE_SCENARIOS, empty_ok=HANDSHAKE_EMPTY)


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    """The results as the Markdown table of docs/conformance.md (``python -m tests.conformance.results DIR``)."""
    rows = ["| scenario | result | passed | failed | warnings |", "| --- | --- | --- | --- | --- |"]
    for name, checks in sorted(results.items()):
        counts = Counter(c.get("status") for c in checks)
        result = "FAIL" if counts["FAILURE"] else ("PASS" if counts["SUCCESS"] else "no passed check")
        rows.append(f"| {name} | {result} | {counts['SUCCESS']} | {counts['FAILURE']} | {counts['WARNING']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(markdown(load(sys.argv[1])))
