"""Issue 15, finding 10 (log injection) and issue 20, items 4 and 5 (LOG_LEVEL for every line,
session ids shortened in logs).

A request id holding ``\\n``, ESC sequences and 100 KB was written raw into the text log: forged
log lines, terminal escapes. Every field of every event is now cleaned once, where mcpgw's events
are published and again in the observer twistd writes with (mcpgw.logs): control characters as
``\\uXXXX``, a field cut at ``logs.MAX_FIELD`` characters, session ids shortened to a prefix and a
hash; the level applies to Twisted's own lines too. The admin API keeps the full ids.

In memory: ``clean``, ``short_session``, the observers. Against a real ``twistd mcpgw``, text and
JSON: hostile request ids, method names, tool names, stderr lines and user agents; the log has one
line per event, no raw control character and no line over ``MAX_LINE``.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel, globalLogPublisher, textFileLogObserver
from twisted.python import log as legacy_log
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import logs
from tests import wire
from tests.gateway_process import Gateway, fixture_server, wait_until

#: Everything ``logs.clean`` must escape: C0 and C1 controls, DEL, line separators, bidi controls.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: A forged line, a terminal clear and title change, a bidi override, then 100 KB.
HOSTILE = ("evil\n2026-01-01T00:00:00+0000 [mcpgw.session.Session#warn] forged line\r\x1b[2J\x1b]0;pwned\x07"
           "\u202e\x9b31m" + "A" * 100_000)
#: Longest line a test accepts: a format and a handful of fields, each at most MAX_FIELD characters.
MAX_LINE = 8 * logs.MAX_FIELD
SID = "cyfwABCDEFGHIJKLMNOPQR.0123456789abcdefghij"


class CleanTests(SynchronousTestCase):
    def test_controlsEscaped(self) -> None:
        self.assertEqual(logs.clean("a\nb\x1b[2Jc\x07\u202e\x9b"), "a\\u000ab\\u001b[2Jc\\u0007\\u202e\\u009b")

    def test_plainTextUntouched(self) -> None:
        for text in ("tools/call", "échec ✓ 日本", "C:\\path", ""):
            self.assertIs(logs.clean(text), text)

    def test_cutAtMaxField(self) -> None:
        out = logs.clean("A" * 100_000)
        self.assertTrue(out.startswith("A" * 400) and out.endswith("\u2026(100000 chars)"))
        self.assertLessEqual(len(out), logs.MAX_FIELD)

    def test_cutNeverSplitsAnEscape(self) -> None:
        for n in range(80, 100):
            out = logs.clean("\n" * n)
            head = out.split("\u2026")[0]
            self.assertTrue(re.fullmatch(r"(\\u000a)*", head), (n, out[-20:]))
            self.assertLessEqual(len(head), logs.MAX_FIELD)

    def test_idempotent(self) -> None:
        once = logs.clean(HOSTILE)
        self.assertEqual(logs.clean(once), once)
        self.assertIsNone(CONTROL.search(once))

    def test_shortSession(self) -> None:
        """A prefix and a hash: the same id always gives the same text, which does not hold the id."""
        short = logs.short_session(SID)
        self.assertRegex(short, r"^cyfw\u2026[A-Za-z0-9_-]{4}$")
        self.assertEqual(short, logs.short_session(SID))
        self.assertNotEqual(short, logs.short_session(SID[:-1] + "k"))
        self.assertNotIn(SID[4:], short)
        self.assertIsNone(CONTROL.search(logs.short_session("\n\x1b" + SID)))


class ObserverTests(SynchronousTestCase):
    """mcpgw Loggers publish cleaned events; the observer twistd writes with cleans and filters every event."""

    def setUp(self) -> None:
        self.addCleanup(logs.set_level, "info")

    def published(self, **fields: Any) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        Logger(namespace="mcpgw.test", observer=logs.observer).warn(
            "session {session}: request {request_id} ({method}) failed: {reason}", **fields)
        [event] = [e for e in seen if e.get("log_namespace") == "mcpgw.test"]
        return event

    def test_mcpgwEventsPublishedClean(self) -> None:
        """What any observer sees of an mcpgw event (an embedding application's too) is already clean."""
        event = self.published(session=SID, request_id=HOSTILE, method="tools/call", reason=HOSTILE, pid=7)
        self.assertEqual(event["session"], logs.short_session(SID))
        self.assertIsNone(CONTROL.search(event["request_id"]))
        self.assertLessEqual(len(event["request_id"]), logs.MAX_FIELD + 20)
        self.assertEqual(event["pid"], 7)

    def lines(self, inner: Any, out: io.StringIO, *events: dict[str, Any]) -> list[str]:
        observer = logs.GatewayObserver(inner)
        for event in events:
            observer(event)
        return out.getvalue().splitlines()

    def hostile_event(self, level: LogLevel = LogLevel.warn) -> dict[str, Any]:
        return {"log_format": "request {request_id} ({method}) from {agent}", "log_level": level,
                "log_namespace": "twisted.web.test", "log_time": 0.0, "request_id": HOSTILE, "method": HOSTILE,
                "agent": HOSTILE, "session": SID}

    def test_textOneLinePerEvent(self) -> None:
        out = io.StringIO()
        [line] = self.lines(textFileLogObserver(out), out, self.hostile_event())
        self.assertIsNone(CONTROL.search(line))
        self.assertLess(len(line), MAX_LINE)
        self.assertIn("evil\\u000a2026", line)
        self.assertNotIn(SID, line)

    def test_jsonOneLinePerEvent(self) -> None:
        """JSON escapes control characters by itself; the values are cleaned too, so a reader that
        decodes them (``jq -r``) does not get them back raw."""
        out = io.StringIO()
        [line] = self.lines(logs.JsonLinesObserver(out), out, self.hostile_event())
        doc = json.loads(line)
        for key in ("request_id", "method", "agent", "event"):
            self.assertIsNone(CONTROL.search(doc[key]), key)
        self.assertEqual(doc["session"], logs.short_session(SID))
        self.assertLess(len(line), MAX_LINE)

    def test_legacyEventCleaned(self) -> None:
        """twisted.python.log text (a legacy event's ``log_text``) is cleaned too."""
        out = io.StringIO()
        event = {"message": (HOSTILE,), "isError": 0, "system": "-", "log_format": "{log_text}",
                 "log_text": HOSTILE, "log_level": LogLevel.info, "log_namespace": "log_legacy", "log_time": 0.0}
        [line] = self.lines(textFileLogObserver(out), out, event)
        self.assertIsNone(CONTROL.search(line))

    def test_levelAppliesToTwistedsOwnEvents(self) -> None:
        """LOG_LEVEL=warn: Twisted's info lines ("Starting factory", "starting up") are not written."""
        logs.set_level("warn")
        out = io.StringIO()
        lines = self.lines(textFileLogObserver(out), out,
                           {"log_format": "Starting factory {f}", "f": "x", "log_level": LogLevel.info,
                            "log_namespace": "twisted.internet.protocol.Factory", "log_time": 0.0},
                           {"message": ("Received SIGTERM, shutting down.",), "isError": 0, "system": "-",
                            "log_format": "{log_text}", "log_text": "Received SIGTERM, shutting down.",
                            "log_level": LogLevel.info, "log_namespace": "log_legacy", "log_time": 0.0},
                           self.hostile_event(LogLevel.warn))
        self.assertEqual(len(lines), 1)
        self.assertIn("#warn]", lines[0])

    def test_legacyErrorKeepsItsTraceback(self) -> None:
        """A legacy error's text is its traceback: written whole (on its continuation lines), not escaped."""
        out = io.StringIO()
        observer = logs.GatewayObserver(textFileLogObserver(out))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        try:
            raise ValueError("boom")
        except ValueError:
            legacy_log.err(None, "failed")
        self.flushLoggedErrors(ValueError)
        self.assertIn("ValueError: boom", out.getvalue())


# -- against a real gateway ---------------------------------------------------------

TOKEN = "admin-token-0123456789abcdef"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")


def attack(gw: Gateway) -> str:
    """Hostile strings wherever a client (or its child's stderr) can put them; the session's id."""
    with wire.http_client(gw.url) as c:
        sid = wire.open_session(c, version="2025-03-26")
        headers = wire.session_headers(sid, "2025-03-26")
        c.post("/mcp", headers=headers, json=[
            wire.tool_call(HOSTILE, HOSTILE),                            # unknown tool: an error from the child
            wire.request(HOSTILE[:5000] + "2", HOSTILE[:5000], {}),      # unknown method
            wire.tool_call(HOSTILE[:3000] + "3", "stderr", {"text": HOSTILE}),
            wire.tool_call(HOSTILE[:1000] + "4", "sleep", {"seconds": 5}),  # times out: logged at info
        ])
        doomed = wire.open_session(c, version="2025-03-26")  # crashes: its request fails, logged at warn
        c.post("/mcp", headers=wire.session_headers(doomed, "2025-03-26"), json=wire.tool_call(HOSTILE[:2000] + "5", "crash"))
    agent = HOSTILE[:8000].replace("\n", "").replace("\r", "").encode("latin-1", "replace")
    wire.raw_http(gw.port, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nuser-agent: %s\r\nconnection: close\r\n\r\n"
                  % (gw.port, agent))
    return sid


def assert_admin_shows(gw: Gateway, sid: str) -> None:
    """The operator's view keeps the full id (issue 20, item 5)."""
    with wire.http_client(gw.url) as c:
        one = c.get(f"/admin/sessions/{sid}", headers={"authorization": f"Bearer {TOKEN}"})
        every = c.get("/admin/sessions", headers={"authorization": f"Bearer {TOKEN}"})
    assert one.status_code == 200 and sid in one.text, one.text
    assert every.status_code == 200 and sid in every.text, every.text


def hostile_config() -> dict[str, Any]:
    return {"mcpServers": {"fx": fixture_server()}, "admin": {"token": TOKEN},
            "limits": {"requestTimeout": 1}, "logLevel": "debug"}


@pytest.mark.integration
def test_text_log_one_line_per_event(make_gateway) -> None:
    gw = make_gateway({**hostile_config(), "logFormat": "text"})
    sid = attack(gw)
    assert wait_until(lambda: "timed out" in gw.log() and "exited" in gw.log(), 10), gw.log()[-3000:]
    assert_admin_shows(gw, sid)
    text = gw.log()
    lines = text.splitlines()
    assert all(TEXT_LINE.match(line) for line in lines), [line[:200] for line in lines if not TEXT_LINE.match(line)][:3]
    assert not [line[:200] for line in lines if CONTROL.search(line)]
    print(f"\ntext log: {len(lines)} lines, longest {max(len(line) for line in lines)} characters")
    assert max(len(line) for line in lines) < MAX_LINE
    assert "evil\\u000a2026" in text and "\\u001b[2J" in text  # logged, escaped
    assert sid not in text and logs.short_session(sid) in text


@pytest.mark.integration
def test_json_log_one_line_per_event(make_gateway) -> None:
    gw = make_gateway({**hostile_config(), "logFormat": "json"})
    sid = attack(gw)
    assert wait_until(lambda: "timed out" in gw.log() and "exited" in gw.log(), 10), gw.log()[-3000:]
    assert_admin_shows(gw, sid)
    lines = gw.log().splitlines()
    docs = [json.loads(line) for line in lines]  # one JSON object per line, each line whole
    print(f"\njson log: {len(lines)} lines, longest {max(len(line) for line in lines)} characters")
    assert max(len(line) for line in lines) < MAX_LINE
    for doc in docs:
        for key, value in doc.items():
            if isinstance(value, str) and key != "traceback":
                assert not CONTROL.search(value), (key, value[:200])
    assert any("evil\\u000a2026" in str(doc.get("request_id")) for doc in docs)
    assert sid not in gw.log()
    assert logs.short_session(sid) in {doc.get("session") for doc in docs}


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_level_warn_applies_to_twisted_lines(make_gateway, log_format: str) -> None:
    """Issue 20, item 4: LOG_LEVEL=warn drops Twisted's own info lines ("starting up", "Starting
    factory", "Received SIGTERM") as well as mcpgw's; warnings are still written."""
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "logFormat": log_format}, env={"LOG_LEVEL": "warn"})
    with wire.http_client(gw.url) as c:
        sid = wire.open_session(c)
        c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(6, "crash"))
    assert wait_until(lambda: "failed" in gw.log(), 10), gw.log()
    gw.stop()
    # The pipe is drained by a thread: poll (bounded) for any shutdown line that might still come.
    assert not wait_until(lambda: "Received SIGTERM" in gw.log() or "Main loop terminated" in gw.log(), 2)
    text = gw.log()
    for twisted_line in ("starting up", "Starting factory", "Site starting on", "reactor class", "Received SIGTERM",
                         "Server Shut Down"):
        assert twisted_line not in text, twisted_line
    if log_format == "json":
        assert {json.loads(line)["level"] for line in text.splitlines()} <= {"warn", "error", "critical"}
    else:
        assert "#info]" not in text and "#debug]" not in text
    assert sid not in text and logs.short_session(sid) in text
