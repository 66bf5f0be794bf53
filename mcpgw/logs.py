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

Two rules hold for every line, in both formats, whoever logged it (an mcpgw Logger,
twistd, twisted.web): the level (``logLevel``) is applied by ``GatewayObserver``,
the observer twistd is handed, so Twisted's own ``starting up`` and ``Starting
factory`` lines go at ``warn`` too; and every text field is made safe to write
(``clean_event``): control characters (C0, DEL, C1, line and bidi separators) become
``\\uXXXX``, a field is cut at ``MAX_FIELD`` characters, and a session id (the
``session`` field) is shortened to a prefix and a hash (``short_session``), because
a session id is half a credential. Request ids, methods, user agents and a child's
stderr are client- or child-controlled: without this, a request id holding ``\\n``
or an ESC sequence forges log lines or drives the terminal that reads the log.
mcpgw's events are cleaned once, where they are published (``observer``), so an
application that embeds the gateway gets them clean as well.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python import logfile
from twisted.python.reflect import qual
from zope.interface import implementer

#: Longest text kept of one field of an event (a request id, a reason, a stderr line).
MAX_FIELD = 512
#: What ``clean()`` escapes: C0 controls, DEL, C1 controls (U+009B is a CSI to some terminals),
#: the Unicode line and paragraph separators, and the bidi marks, embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: Fields that hold a session id (ours, or a remote server's): written shortened (``short_session``).
SESSION_FIELDS = frozenset({"session", "upstream_session"})
#: Set on an event once ``clean_event`` has made it safe, so a second observer does not redo it.
_CLEANED = "log_mcpgw_clean"
#: Keys of a legacy (twisted.python.log) event that are not fields (its text is ``log_text``: cleaned).
_LEGACY_KEYS = frozenset({"format", "message", "isError", "failure", "why", "system", "time"})
_RANK = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
#: The rank of the configured level: events below it are not written (``GatewayObserver``).
_threshold = _RANK[LogLevel.info]


def short_session(session_id: str) -> str:
    """How a session id is written in logs: its first 4 characters and 4 of its SHA-256.

    Enough to follow one session through the log (and to find it among the admin API's
    full ids), not enough to use it: the id is 128 random bits plus a tag."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(session_id.encode("utf-8", "replace")).digest()[:3]).decode()
    return f"{clean(session_id[:4])}\u2026{digest}"


def clean(text: str) -> str:
    """``text`` safe to write on one log line: control characters as ``\\uXXXX``, at most
    MAX_FIELD characters (one cut short ends with ``…(N chars)``, N its original length).
    Cleaning a cleaned text changes nothing."""
    head = text[:MAX_FIELD]
    if _UNSAFE.search(head) is not None:
        head = _UNSAFE.sub(_escape, head)
    elif len(text) <= MAX_FIELD:
        return text
    if len(head) <= MAX_FIELD and len(text) <= MAX_FIELD:
        return head
    marker = f"\u2026({len(text)} chars)"
    room = MAX_FIELD - len(marker)
    head = head[:room]
    partial = head.rfind("\\u", room - 5)
    if partial != -1:
        head = head[:partial]  # not half an escape
    return head + marker


def _escape(match: re.Match[str]) -> str:
    return "\\u%04x" % ord(match.group())


def _cleaned_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return short_session(value) if key in SESSION_FIELDS else clean(value)
    if isinstance(value, (int, float, bool, type(None))):
        return value
    text = _text(value)
    safe = clean(text)
    # An object whose text is already safe stays itself (a format may ask for its repr).
    return value if safe is text and key not in SESSION_FIELDS else safe


def clean_event(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with every text field made safe (``clean``) and session ids shortened.

    Changes ``event`` itself (an mcpgw Logger's event is its own); ``clean_copy`` for an
    event that other observers share."""
    if _CLEANED in event:
        return event
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        if isinstance(value, (int, float, bool, type(None))) and key not in SESSION_FIELDS:
            continue
        event[key] = _cleaned_value(key, value)
    text = event.get("log_text")
    if isinstance(text, str) and "log_failure" not in event and not event.get("isError"):
        event["log_text"] = clean(text)  # a legacy event's text (its traceback, if any, stays whole)
    event[_CLEANED] = True
    return event


def clean_copy(event: dict[str, Any]) -> dict[str, Any]:
    return event if _CLEANED in event else clean_event(dict(event))


def _publish_clean(event: dict[str, Any]) -> None:
    globalLogPublisher(clean_event(event))


level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
#: Every mcpgw Logger's observer: below the level, nothing is built or published; the rest is cleaned.
#: (A plain function taking an event is an ILogObserver to Twisted; the cast says so to mypy.)
observer = FilteringLogObserver(cast(ILogObserver, _publish_clean), [level_filter])

#: Keys of legacy (twisted.python.log) events that are not fields worth a JSON key.
_SKIP = frozenset({"message", "isError", "format", "why", "failure", "time"})
_PLAIN = (str, int, float, bool, type(None))
#: Longest text kept for a field whose value is not a plain JSON value.
_MAX_REPR = 200


def set_level(name: str) -> None:
    """``name`` is one of mcpgw.config.LOG_LEVELS."""
    global _threshold
    level = LogLevel.levelWithName(name)
    level_filter.defaultLogLevel = level
    # The predicate reads the default from its namespace table, set only at construction.
    level_filter.setLogLevelForNamespace("", level)
    _threshold = _RANK[level]


def _level_of(event: dict[str, Any]) -> LogLevel:
    level = event.get("log_level")
    if level is None:
        level = LogLevel.error if event.get("isError") else LogLevel.info
    return level


@implementer(ILogObserver)
class GatewayObserver:
    """The observer twistd writes with (text or JSON): the level and ``clean_event`` for every
    event, Twisted's own included, then ``inner``."""

    def __init__(self, inner: Callable[[dict[str, Any]], None]):
        self.inner = inner

    def __call__(self, event: dict[str, Any]) -> None:
        if _RANK.get(_level_of(event), 1) < _threshold:
            return
        self.inner(clean_copy(event))


def json_event(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object for one log event."""
    level = _level_of(event)
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
        out["error"] = clean(failure.getErrorMessage())
        out["error_type"] = qual(failure.type)
        out["traceback"] = failure.getTraceback()
    return out


def _text(value: Any) -> str:
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - any object's __str__ may raise anything; the log line still gets written
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one line of JSON to ``out``: str to a text stream (``io.TextIOBase``:
    stdout, a StringIO), bytes to anything else (a binary file, twistd's LogFile)."""

    def __init__(self, out: IO[Any]):
        self._out = out
        self._binary = not isinstance(out, io.TextIOBase)

    def __call__(self, event: dict[str, Any]) -> None:
        line = orjson.dumps(json_event(event), default=_text) + b"\n"
        try:
            if self._binary:
                self._out.write(line)
            else:
                self._out.write(line.decode("utf-8"))
            self._out.flush()
        except Exception:  # noqa: BLE001 - a log line must never raise into the code that logged
            pass


def observer_for(twistd_options: Any, log_format: str) -> GatewayObserver:
    """The observer for twistd to write with: JSON lines or twistd's own text, where twistd
    would have written, behind the level and the cleaning (``GatewayObserver``)."""
    inner = json_observer_for(twistd_options) if log_format == "json" else text_observer_for(twistd_options)
    return GatewayObserver(inner)


def text_observer_for(twistd_options: Any) -> Callable[[dict[str, Any]], None]:
    """The text observer twistd would have made from its own options (file, stdout, syslog)."""
    if twistd_options is None:
        return textFileLogObserver(sys.stdout)
    from twisted.application.app import AppLogger

    logger: type[AppLogger]
    try:
        from twisted.scripts._twistd_unix import UnixAppLogger

        logger = UnixAppLogger
    except ImportError:  # not POSIX
        logger = AppLogger
    made = logger(twistd_options)._getLogObserver()
    return made if ILogObserver.providedBy(made) else LegacyLogObserverWrapper(made)


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
