"""Issue 5: structured logs: ``logFormat: "json"`` / ``--log-format json`` / ``LOG_FORMAT``.

One JSON object per line with ``time``, ``level``, ``event``, ``namespace`` and
the event's fields; session start/end, child start/exit and failed requests
carry their ids; message bodies never reach the log at info level.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application, IService
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import logfile
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import logs, tap
from tests.gateway_process import Gateway, fixture_server, wait_until
from tests.wire import POST_HEADERS, http_client, messages_of, open_session, session_headers

MARKER = "secret-payload-7f3a9c"


def parsed(gw: Gateway) -> list[dict[str, Any]]:
    """Every log line of the gateway as JSON (each one must parse)."""
    out = []
    for line in gw.log().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class JsonEventTests(SynchronousTestCase):
    """mcpgw.logs.json_event: the object written for one event."""

    def capture(self, emit: Any) -> dict[str, Any]:
        out = io.StringIO()
        observer = logs.JsonLinesObserver(out)
        log = Logger(namespace="mcpgw.test", observer=observer)
        emit(log)
        [line] = out.getvalue().splitlines()
        return json.loads(line)

    def test_fieldsLevelEventNamespace(self) -> None:
        """The formatted text is ``event``; the named fields are keys of their own."""
        doc = self.capture(lambda log: log.info("session {session} started ({server}/{transport})",
                                                session="abc", server="fx", transport="ws"))
        self.assertEqual(doc["level"], "info")
        self.assertEqual(doc["event"], "session abc started (fx/ws)")
        self.assertEqual(doc["namespace"], "mcpgw.test")
        self.assertEqual((doc["session"], doc["server"], doc["transport"]), ("abc", "fx", "ws"))
        self.assertRegex(doc["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertFalse([k for k in doc if k.startswith("log_")])

    def test_numbersStayNumbers(self) -> None:
        doc = self.capture(lambda log: log.warn("child {pid} exited {status}", pid=42, status=3, duration=0.5, ok=None))
        self.assertEqual((doc["level"], doc["pid"], doc["status"], doc["duration"], doc["ok"]), ("warn", 42, 3, 0.5, None))

    def test_otherValuesAsShortText(self) -> None:
        """Objects become their text, cut at 200 characters."""
        doc = self.capture(lambda log: log.info("x", thing=["a" * 500]))
        self.assertIsInstance(doc["thing"], str)
        self.assertLessEqual(len(doc["thing"]), 203)

    def test_failure(self) -> None:
        """log.failure: error, its type and the traceback."""
        def emit(log: Logger) -> None:
            try:
                raise ValueError("boom")
            except ValueError:
                log.failure("request {request_id} failed", Failure(), request_id=7)
        doc = self.capture(emit)
        self.assertEqual((doc["level"], doc["request_id"], doc["error"], doc["error_type"]),
                         ("critical", 7, "boom", "builtins.ValueError"))
        self.assertIn("ValueError: boom", doc["traceback"])

    def test_legacyEvent(self) -> None:
        """twisted.python.log events (e.g. "Site starting on N") come out as lines too."""
        doc = logs.json_event({"message": ("GatewaySite starting on 1234",), "isError": 0, "system": "-",
                               "log_format": "{log_text}", "log_text": "GatewaySite starting on 1234"})
        self.assertEqual(doc["level"], "info")
        self.assertIn("starting on 1234", doc["event"])


class TwistdWiringTests(SynchronousTestCase):
    """twistd takes the observer from the application's ILogObserver component."""

    def tmpdir(self) -> str:
        path = tempfile.mkdtemp(prefix="mcpgw-logs-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def options(self, *args: str) -> tap.Options:
        config = Path(self.tmpdir()) / "gateway.json"
        config.write_text(json.dumps({"host": "127.0.0.1", "mcpServers": {"fx": fixture_server()}}))
        options = tap.Options()
        options.parseOptions(["--config", str(config), "--listen", "tcp:0", *args])
        options.parent = {"nodaemon": True, "logfile": None}  # type: ignore[assignment]  # twistd's own options
        return options

    def test_jsonObserverOnTheApplication(self) -> None:
        """--log-format json: setServiceParent(application) sets the component before twistd starts logging."""
        top = tap.makeService(self.options("--log-format", "json"))
        application = Application("mcpgw")
        top.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsInstance(observer, logs.GatewayObserver)
        self.assertIsInstance(observer.inner, logs.JsonLinesObserver)
        self.assertIn(top, list(IService(application)))

    def test_textIsTwistdsOwnBehindTheLevel(self) -> None:
        """Text: twistd's own text observer, behind logLevel and the cleaning (issue 20: Twisted's
        own info lines go at LOG_LEVEL=warn too)."""
        top = tap.makeService(self.options())
        application = Application("mcpgw")
        top.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsInstance(observer, logs.GatewayObserver)
        self.assertNotIsInstance(observer.inner, logs.JsonLinesObserver)

    def test_whereTwistdWouldWrite(self) -> None:
        """stdout for -n (or --logfile -); twistd's log file otherwise."""
        self.assertIs(logs.json_observer_for({"nodaemon": True, "logfile": None})._out, sys.stdout)
        self.assertIs(logs.json_observer_for({"nodaemon": False, "logfile": "-"})._out, sys.stdout)
        path = os.path.join(self.tmpdir(), "twistd.log")
        observer = logs.json_observer_for({"nodaemon": False, "logfile": path})
        self.assertIsInstance(observer._out, logfile.LogFile)
        observer({"log_level": LogLevel.info, "log_format": "hello {who}", "who": "file", "log_namespace": "t"})
        observer._out.close()
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["event"], "hello file")


# -- integration: a real twistd writing JSON lines ---------------------------------


@pytest.mark.integration
def test_json_lines_from_a_real_gateway(make_gateway) -> None:
    """Every line parses; session start/end, child start/exit, stderr and a failed request carry their fields."""
    gw = make_gateway({"logFormat": "json", "mcpServers": {"fx": fixture_server()}})
    with http_client(gw.url) as client:
        sid = open_session(client, version="2025-06-18")
        headers = {**POST_HEADERS, **session_headers(sid, "2025-06-18")}
        r = client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                                                       "params": {"name": "echo", "arguments": {"text": MARKER}}})
        assert MARKER in json.dumps(messages_of(r))
        r = client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 6, "method": "tools/call",
                                                       "params": {"name": "crash", "arguments": {}}})
        assert "error" in messages_of(r)[0]

    def has(pred: Any) -> bool:
        return any(pred(d) for d in parsed(gw))

    short = logs.short_session(sid)  # logs carry the shortened id (issue 20)
    assert wait_until(lambda: has(lambda d: "ended" in d["event"] and d.get("session") == short))
    docs = parsed(gw)
    for d in docs:
        assert {"time", "level", "event", "namespace"} <= set(d), d
        assert d["level"] in ("debug", "info", "warn", "error", "critical"), d
    started = [d for d in docs if d.get("session") == short and "started" in d["event"]]
    assert started and started[0]["server"] == "fx" and started[0]["transport"] == "streamable"
    assert started[0]["namespace"].startswith("mcpgw.")
    ended = [d for d in docs if d.get("session") == short and "ended" in d["event"]]
    assert ended[0]["reason"] == "MCP server exited with status 3" and ended[0]["duration"] >= 0
    child_start = [d for d in docs if d["event"].startswith("child fx started")]
    pid = child_start[0]["pid"]
    assert isinstance(pid, int) and child_start[0]["server"] == "fx"
    [child_exit] = [d for d in docs if d.get("pid") == pid and "exited" in d["event"]]
    assert (child_exit["status"], child_exit["requested"]) == (3, False) and child_exit["duration"] >= 0
    stderr = [d for d in docs if d.get("stderr")]
    assert stderr and all(d["server"] == "fx" and d["pid"] == pid for d in stderr)
    [failed] = [d for d in docs if d.get("request_id") == 6]
    assert failed["level"] == "warn" and failed["session"] == short and failed["method"] == "tools/call"
    assert failed["server"] == "fx"
    # No message bodies at info level: the echoed text appears in no line.
    assert MARKER not in gw.log()


@pytest.mark.integration
def test_log_format_from_environment(make_gateway) -> None:
    """LOG_FORMAT=json overrides a text config; LOG_LEVEL=warn drops every info line, Twisted's too."""
    gw = make_gateway({"logFormat": "text", "mcpServers": {"fx": fixture_server()}},
                      env={"LOG_FORMAT": "json", "LOG_LEVEL": "warn"})
    with http_client(gw.url) as client:
        sid = open_session(client, version="2025-06-18")
        client.post("/mcp", headers={**POST_HEADERS, **session_headers(sid, "2025-06-18")},
                    json={"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "crash", "arguments": {}}})
    assert wait_until(lambda: any(d.get("request_id") == 6 for d in parsed(gw)))  # a warn line, as JSON
    docs = parsed(gw)
    assert not [d for d in docs if d["level"] in ("debug", "info")], docs


@pytest.mark.integration
def test_text_is_the_default(make_gateway) -> None:
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}}, env={"LOG_FORMAT": ""} if "LOG_FORMAT" in os.environ else None)
    first = gw.log().splitlines()[0]
    with pytest.raises(ValueError):
        json.loads(first)
