"""The audit trail: one JSON line per audited operation, in a file of its own (``auditLog``).

Audited: ``tools/call``, ``resources/subscribe`` and ``logging/setLevel`` (``AUDITED``), and the
admin API's calls (``method`` "admin", ``target`` "<HTTP method> <path>"). A line says who
(``identity``, ``client_ip``), what (``method``, ``target``: the tool, the resource URI, the
level, the admin path; ``server``), how it ended (``outcome``, ``error_code``, ``duration_ms``) and
where to find its trace (``trace_id``)::

    {"time":"2026-05-04T09:12:03.120Z","method":"tools/call","target":"get_time","server":"time",
     "identity":"token:ci","client_ip":"10.0.0.7","outcome":"ok","error_code":null,
     "duration_ms":12.5,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}

Never arguments, results or message text: ``AuditEvent`` has no field for them. Every text field is
written as mcpgw.logs.clean makes it (control and bidi characters escaped, cut at MAX_FIELD):
a tool name is the client's.

Writing never blocks the reactor. ``record`` appends the event to a list; at most one batch is
being written at a time, in the reactor's thread pool, and what arrives meanwhile waits for the
next batch (so lines keep their order, only one thread touches the file, and a slow disk makes
batches larger rather than the reactor slower). The list is bounded (``maxQueue``): past it events
are dropped and counted, and the count is written as a line of its own before the next batch. A
timer-flushed buffer would add a timer and a delay to every line; one thread per line
(``callInThread`` each) would write out of order and rotate from two threads at once.

The file is rotated by size with twisted.python.logfile.LogFile (``path.1`` ... ``path.<keep>``).
A new file is made mode 0640 (less what the umask takes), and a rotated one gets the mode the file had: the rotation happens
here (``shouldRotate`` / ``rotate`` before each line) and the mode is set with ``chmod``, because
LogFile's own way, a process-wide ``umask`` switch, must not run in a worker thread (a child
spawned meanwhile would inherit the umask).
"""

from __future__ import annotations

import os
import stat
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import logfile
from twisted.python.failure import Failure

from mcpgw.config.checks import ConfigError
from mcpgw.config.observability import AuditConfig
from mcpgw.logs import clean

log = Logger(namespace="mcpgw.audit")

#: The MCP methods whose every call is audited.
AUDITED = frozenset({"tools/call", "resources/subscribe", "logging/setLevel"})
#: The mode of a new audit file: it names who called what from where.
NEW_FILE_MODE = 0o640


@attrs.frozen
class AuditEvent:
    """One audited operation, recorded when it is over."""

    #: When it began (seconds since the epoch).
    time: float
    method: str
    #: "ok", "error" (a JSON-RPC error), "tool_error" (a result with isError), "timeout",
    #: "unauthorized", "forbidden", "rate_limited", "cancelled", "upstream_gone", ...
    outcome: str
    identity: str | None = None
    client_ip: str | None = None
    server: str | None = None
    #: The tool (tools/call), the resource URI (resources/subscribe), the level, the admin path.
    target: str | None = None
    #: Seconds it took.
    duration: float | None = None
    trace_id: str | None = None
    error_code: int | None = None


def encode(event: AuditEvent) -> bytes:
    """The JSON line of ``event``: every key always present (null when unknown), text fields cleaned."""
    return orjson.dumps({
        "time": _timestamp(event.time),
        "method": clean(event.method),
        "target": _clean(event.target),
        "server": _clean(event.server),
        "identity": _clean(event.identity),
        "client_ip": _clean(event.client_ip),
        "outcome": clean(event.outcome),
        "error_code": event.error_code,
        "duration_ms": None if event.duration is None else round(event.duration * 1000, 3),
        "trace_id": _clean(event.trace_id),
    }, option=orjson.OPT_APPEND_NEWLINE)


def _clean(text: str | None) -> str | None:
    return None if text is None else clean(text)


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Audit(Protocol):
    """``AuditLog``, or ``NOOP_AUDIT`` when no ``auditLog`` is configured."""

    def record(self, event: AuditEvent) -> None: ...

    def close(self) -> Deferred[None]: ...


class NoopAudit:
    """The audit trail when none is configured."""

    __slots__ = ()

    def record(self, event: AuditEvent) -> None:
        return None

    def close(self) -> Deferred[None]:
        return succeed(None)


NOOP_AUDIT = NoopAudit()


def build(config: AuditConfig | None, reactor: Any = None) -> Audit:
    """``NOOP_AUDIT`` without ``auditLog``, else an ``AuditLog`` writing where it says."""
    if config is None:
        return NOOP_AUDIT
    if reactor is None:
        from twisted.internet import reactor
    return AuditLog(config, reactor)


class AuditLog:
    """The audit file: ``record`` queues, one batch at a time is written in a thread (see the module)."""

    def __init__(self, config: AuditConfig, reactor: Any):
        self._reactor = reactor
        self._max_queue = config.maxQueue
        self._file, self._mode = _open(config)
        self._pending: list[AuditEvent] = []
        self._writing = False
        #: Events lost (queue full, a failed write, recorded after close) not yet reported in the file.
        self._unreported = 0
        #: Every event lost since the start (for metrics).
        self.dropped = 0
        #: "open", "closing" (writing what is queued), "ending" (closing the file), "closed".
        self._state = "open"
        self._close_waiters: list[Deferred[None]] = []

    def record(self, event: AuditEvent) -> None:
        if self._state in ("ending", "closed") or len(self._pending) >= self._max_queue:
            self._lose(1)
            return
        self._pending.append(event)
        if not self._writing:
            self._flush()

    def close(self) -> Deferred[None]:
        """Write what is queued, then close the file; fires once it is closed."""
        done: Deferred[None] = Deferred()
        if self._state == "closed":
            done.callback(None)
            return done
        self._close_waiters.append(done)
        if self._state == "open":
            self._state = "closing"
            if not self._writing:
                self._next()
        return done

    def _lose(self, count: int) -> None:
        self._unreported += count
        self.dropped += count

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        unreported, self._unreported = self._unreported, 0
        self._writing = True
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._write, batch, unreported)
        d.addErrback(self._failed, len(batch) + unreported)
        d.addCallback(self._written)

    def _write(self, batch: list[AuditEvent], unreported: int) -> None:
        """In a pool thread: the lines of ``batch``, each after a rotation if the file is full."""
        lines = [encode(event) for event in batch]
        if unreported:
            lines.insert(0, orjson.dumps({"time": _timestamp(time.time()), "method": "audit/dropped", "dropped": unreported},
                                         option=orjson.OPT_APPEND_NEWLINE))
        for line in lines:
            if self._file.shouldRotate():
                self._file.rotate()
                os.chmod(self._file.path, self._mode)
            self._file.write(line)

    def _failed(self, failure: Failure, count: int) -> None:
        log.error("Cannot write the audit log {path}: {error}; {count} lines lost",
                  path=self._file.path, error=failure.getErrorMessage(), count=count)
        self._lose(count)

    def _written(self, _: None) -> None:
        self._writing = False
        self._next()

    def _next(self) -> None:
        if self._pending:
            self._flush()
        elif self._state == "closing":
            self._state = "ending"  # what is recorded from here on is counted as lost
            self._writing = True
            d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._file.close)
            d.addErrback(lambda f: log.error("Cannot close the audit log {path}: {error}",
                                             path=self._file.path, error=f.getErrorMessage()))
            d.addCallback(self._closed)

    def _closed(self, _: None) -> None:
        self._state = "closed"
        self._writing = False
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _open(config: AuditConfig) -> tuple[logfile.LogFile, int]:
    """The LogFile at ``config.path`` (made mode 0640 if new) and the mode its rotated successors get."""
    path = os.path.abspath(config.path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, NEW_FILE_MODE))
        mode = stat.S_IMODE(os.stat(path).st_mode)
        opened = logfile.LogFile(os.path.basename(path), os.path.dirname(path),
                                 rotateLength=config.maxBytes, maxRotatedFiles=config.keep)
    except OSError as e:
        raise ConfigError("auditLog.path", f"cannot open {path}: {e.strerror}") from None
    # No defaultMode: LogFile would switch the process umask to make each new file (see the module).
    opened.defaultMode = None
    return opened, mode
