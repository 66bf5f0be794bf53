"""The gateway's log level (``logLevel`` / ``LOG_LEVEL``) and its JSON log format.

Every mcpgw Logger publishes through ``observer``, which drops events below
the configured level before they reach twistd's log file or stdout.

``logFormat: "json"`` (``--log-format json``, ``LOG_FORMAT``) replaces twistd's
text observer with ``JsonLinesObserver``: one JSON object per line with
``time``, ``level``, ``event`` (the formatted text), ``namespace`` and the
event's own fields (``session``, ``server``, ``transport``, ``pid``, ...).
twistd takes the observer from the application's ``ILogObserver`` component,
which ``mcpgw.tap.GatewayService`` sets when twistd makes it the
application's service (``setServiceParent``); a ``--logger`` given to twistd
still wins.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import logfile
from twisted.python.reflect import qual
from zope.interface import implementer

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [level_filter])

#: Keys of legacy (twisted.python.log) events that are not fields worth a JSON key.
_SKIP = frozenset({"message", "isError", "format", "why", "failure", "time"})
_PLAIN = (str, int, float, bool, type(None))
#: Longest text kept for a field whose value is not a plain JSON value.
_MAX_REPR = 200


def set_level(name: str) -> None:
    """``name`` is one of mcpgw.config.LOG_LEVELS."""
    level = LogLevel.levelWithName(name)
    level_filter.defaultLogLevel = level
    # The predicate reads the default from its namespace table, set only at construction.
    level_filter.setLogLevelForNamespace("", level)


def json_event(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object for one log event."""
    level = event.get("log_level")
    if level is None:
        level = LogLevel.error if event.get("isError") else LogLevel.info
    when = event.get("log_time") or time.time()
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z",
        "level": level.name,
        "event": formatEvent(event),
        "namespace": event.get("log_namespace") or event.get("system") or "",
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in out:
            continue
        out[key] = value if isinstance(value, _PLAIN) else _text(value)
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["error_type"] = qual(failure.type)
        out["traceback"] = failure.getTraceback()
    return out


def _text(value: Any) -> str:
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one line of JSON to ``out`` (a text or binary file)."""

    def __init__(self, out: IO[Any]):
        self._out = out
        self._binary = "b" in getattr(out, "mode", "") or not hasattr(out, "encoding")

    def __call__(self, event: dict[str, Any]) -> None:
        line = orjson.dumps(json_event(event), default=_text) + b"\n"
        try:
            if self._binary:
                self._out.write(line)
            else:
                self._out.write(line.decode("utf-8"))
            self._out.flush()
        except Exception:
            pass  # a log line must never raise into the code that logged


def json_observer_for(twistd_options: Any) -> JsonLinesObserver:
    """A JSON observer writing where twistd would have written text.

    stdout for ``--logfile -`` or ``-n`` without ``--logfile``; otherwise the
    (rotated) log file twistd would have opened, ``twistd.log`` by default.
    ``sys.stdout`` is taken now, before twistd redirects it into the log.
    """
    options = twistd_options if twistd_options is not None else {}
    name = _option(options, "logfile")
    if name == "-" or (not name and _option(options, "nodaemon")) or twistd_options is None:
        return JsonLinesObserver(sys.stdout)
    return JsonLinesObserver(logfile.LogFile.fromFullPath(name or "twistd.log"))


def _option(options: Any, key: str) -> Any:
    try:
        return options[key]
    except (KeyError, TypeError):
        return None
