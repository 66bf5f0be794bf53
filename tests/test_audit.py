"""Issue 19: the audit trail (mcpgw.audit) and its ``auditLog`` config.

Against the real reactor and its thread pool (pytest-twisted), writing real files in tmp_path: what
a line says for each outcome, that arguments and results have no way in, rotation by size, order
across batches, the bounded queue, a failing disk, and that ``close`` writes everything first.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor

from mcpgw import audit
from mcpgw.audit import AUDITED, NOOP_AUDIT, AuditEvent, AuditLog, encode
from mcpgw.config.checks import ConfigError
from mcpgw.config.observability import DEFAULT_AUDIT_MAX_BYTES, AuditConfig, parse_audit

T0 = 1_777_777_777.25  # 2026-05-03T03:09:37.250Z
KEYS = ["time", "method", "target", "server", "identity", "client_ip", "outcome", "error_code", "duration_ms", "trace_id"]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def event(n: int = 0, **kw: Any) -> AuditEvent:
    fields: dict[str, Any] = dict(time=T0 + n, method="tools/call", outcome="ok", identity="token:ci", client_ip="10.0.0.7",
                                  server="time", target="get_time", duration=0.0125, trace_id=TRACE, error_code=None)
    fields.update(kw)
    return AuditEvent(**fields)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def open_log(tmp_path: Path, **kw: Any) -> tuple[AuditLog, Path]:
    path = tmp_path / "audit.log"
    return AuditLog(AuditConfig(path=str(path), **kw), reactor), path


# -- the line --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, {"outcome": "ok", "error_code": None}),
    ({"outcome": "tool_error"}, {"outcome": "tool_error", "error_code": None}),
    ({"outcome": "error", "error_code": -32602}, {"outcome": "error", "error_code": -32602}),
    ({"outcome": "timeout", "error_code": -32001, "duration": 300.0}, {"outcome": "timeout", "error_code": -32001, "duration_ms": 300000.0}),
    ({"outcome": "unauthorized", "identity": None, "server": None, "duration": None, "trace_id": None},
     {"outcome": "unauthorized", "identity": None, "server": None, "duration_ms": None, "trace_id": None}),
    ({"outcome": "rate_limited", "error_code": -32000}, {"outcome": "rate_limited", "error_code": -32000}),
])
def test_the_line_of_each_outcome(kw: dict[str, Any], expected: dict[str, Any]) -> None:
    line = orjson.loads(encode(event(**kw)))
    assert list(line) == KEYS  # every key, always, in this order: a stable schema
    base = {"time": "2026-05-03T03:09:37.250Z", "method": "tools/call", "target": "get_time", "server": "time",
            "identity": "token:ci", "client_ip": "10.0.0.7", "outcome": "ok", "error_code": None,
            "duration_ms": 12.5, "trace_id": TRACE}
    assert line == {**base, **expected}


def test_arguments_and_results_have_no_way_in() -> None:
    assert {f.name for f in attrs.fields(AuditEvent)} == {
        "time", "method", "outcome", "identity", "client_ip", "server", "target", "duration", "trace_id", "error_code"}
    with pytest.raises(TypeError):
        AuditEvent(time=T0, method="tools/call", outcome="ok", arguments={"password": "x"})  # type: ignore[call-arg]
    assert AUDITED == {"tools/call", "resources/subscribe", "logging/setLevel"}


def test_client_text_is_cleaned_and_cut() -> None:
    line = orjson.loads(encode(event(target="evil\n{\"forged\":1}\u202e" + "x" * 100_000, identity="jwt:\x1b[31mroot")))
    assert "\n" not in line["target"] and "\u202e" not in line["target"] and line["target"].startswith("evil\\u000a")
    assert len(line["target"]) <= 512
    assert line["identity"] == "jwt:\\u001b[31mroot"
    assert encode(event()).count(b"\n") == 1


# -- writing -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_writes_every_line_in_order(tmp_path: Path) -> None:
    log, path = open_log(tmp_path)
    outcomes = ["ok", "tool_error", "timeout", "unauthorized", "rate_limited"]
    for i in range(500):
        log.record(event(i, outcome=outcomes[i % 5]))
    await log.close()
    written = lines(path)
    assert [w["time"] for w in written] == [encode(event(i)).split(b'"')[3].decode() for i in range(500)]
    assert [w["outcome"] for w in written] == [outcomes[i % 5] for i in range(500)]
    assert log.dropped == 0
    await log.close()  # a second close fires at once


@pytest_twisted.ensureDeferred
async def test_rotates_after_max_bytes_and_keeps_keep_files(tmp_path: Path) -> None:
    log, path = open_log(tmp_path, maxBytes=4096, keep=2)
    size = len(encode(event()))
    count = 4096 * 5 // size
    for i in range(count):
        log.record(event(i))
    await log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    for rotated in (path.with_name("audit.log.1"), path.with_name("audit.log.2")):
        assert 4096 <= rotated.stat().st_size < 4096 + size  # rotated at the first line past maxBytes
    # The newest lines are in audit.log, the ones before in .1, then .2; older files are gone.
    newest = lines(path.with_name("audit.log.2")) + lines(path.with_name("audit.log.1")) + lines(path)
    assert [w["time"] for w in newest] == [orjson.loads(encode(event(i)))["time"] for i in range(count - len(newest), count)]


@pytest_twisted.ensureDeferred
async def test_a_new_file_is_0640_and_a_rotated_one_keeps_the_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        log, path = open_log(tmp_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    await log.close()
    path.chmod(0o600)
    log, path = open_log(tmp_path, maxBytes=4096)
    for i in range(4096 // len(encode(event())) + 2):
        log.record(event(i))
    await log.close()
    assert path.with_name("audit.log.1").exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    log, path = open_log(tmp_path)
    log.record(event(0))
    await log.close()
    log, path = open_log(tmp_path)
    log.record(event(1))
    await log.close()
    assert len(lines(path)) == 2


@pytest_twisted.ensureDeferred
async def test_a_full_queue_drops_and_says_so(tmp_path: Path) -> None:
    log, path = open_log(tmp_path, maxQueue=5)
    # One reactor turn: the first event is handed to the thread, five wait, two find no room.
    for i in range(8):
        log.record(event(i))
    assert log.dropped == 2
    await log.close()
    written = lines(path)
    assert written[1]["method"] == "audit/dropped" and written[1]["dropped"] == 2
    assert [w["time"] for w in written[:1] + written[2:]] == [orjson.loads(encode(event(i)))["time"] for i in range(6)]
    log.record(event(9))  # after close: lost, and counted
    assert log.dropped == 3


@pytest_twisted.ensureDeferred
async def test_a_failed_write_is_counted_and_reported_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, path = open_log(tmp_path)
    real_write = log._file.write
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_disk(data: bytes) -> None:
        if failures:
            raise failures.pop()
        real_write(data)

    monkeypatch.setattr(log._file, "write", full_disk)
    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(audit.log, "observer", logged.append)
    log.record(event(0))
    log.record(event(1))  # waits for the next batch
    await log.close()
    written = lines(path)
    assert written[0] == {"time": written[0]["time"], "method": "audit/dropped", "dropped": 1}
    assert [w["time"] for w in written[1:]] == [orjson.loads(encode(event(1)))["time"]]
    assert log.dropped == 1
    assert any("No space left" in str(e.get("error")) for e in logged)


@pytest_twisted.ensureDeferred
async def test_noop_audit() -> None:
    assert audit.build(None) is NOOP_AUDIT
    NOOP_AUDIT.record(event())
    await NOOP_AUDIT.close()


def test_an_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "audit.log").mkdir()
    with pytest.raises(ConfigError, match="^auditLog.path: cannot open"):
        AuditLog(AuditConfig(path=str(tmp_path / "audit.log")), reactor)


# -- the auditLog section of the config -----------------------------------------------------------


def test_parse_audit(tmp_path: Path) -> None:
    assert parse_audit(None) is None
    path = str(tmp_path / "audit.log")
    assert parse_audit({"path": path}) == AuditConfig(path=path, format="json", maxBytes=DEFAULT_AUDIT_MAX_BYTES, keep=10)
    assert parse_audit({"path": path, "maxBytes": 1 << 20, "keep": 3, "maxQueue": 50}) == AuditConfig(
        path=path, maxBytes=1 << 20, keep=3, maxQueue=50)


@pytest.mark.parametrize(("raw", "message"), [
    ("audit.log", "auditLog: must be an object"),
    ({}, "auditLog.path: is required"),
    ({"path": 5}, "auditLog.path: must be a file path"),
    ({"path": "{dir}/"}, "auditLog.path: must name a file"),
    ({"path": "{dir}/missing/audit.log"}, "auditLog.path: {dir}/missing is not a directory"),
    ({"path": "{dir}/a.log", "format": "text"}, 'auditLog.format: must be "json"'),
    ({"path": "{dir}/a.log", "maxBytes": 100}, "auditLog.maxBytes: must be at least 4096"),
    ({"path": "{dir}/a.log", "keep": 0}, "auditLog.keep: must be at least 1"),
    ({"path": "{dir}/a.log", "keep": True}, "auditLog.keep: must be an integer"),
    ({"path": "{dir}/a.log", "rotate": "daily"}, "auditLog.rotate: unknown key"),
])
def test_parse_audit_errors_name_the_key(tmp_path: Path, raw: Any, message: str) -> None:
    if isinstance(raw, dict) and isinstance(raw.get("path"), str):
        raw = {**raw, "path": raw["path"].format(dir=tmp_path)}
    with pytest.raises(ConfigError) as caught:
        parse_audit(raw)
    assert str(caught.value).startswith(message.format(dir=tmp_path)), str(caught.value)


def test_parse_audit_refuses_a_path_it_cannot_create(tmp_path: Path) -> None:
    """Checked at startup, as root too (which may write in any directory): a path under a regular file, or
    one that is a directory, can never be the audit file."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="a-file is not a directory"):
        parse_audit({"path": str(tmp_path / "a-file" / "audit.log")})
    (tmp_path / "logs").mkdir()
    with pytest.raises(ConfigError, match="logs is a directory: name a file in it"):
        parse_audit({"path": str(tmp_path / "logs")})
