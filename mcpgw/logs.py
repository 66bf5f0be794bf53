"""The gateway's log level (``logLevel`` / ``LOG_LEVEL``), applied to mcpgw's own events.

Every mcpgw Logger publishes through ``observer``, which drops events below
the configured level before they reach twistd's log file or stdout.
"""

from __future__ import annotations

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [level_filter])


def set_level(name: str) -> None:
    """``name`` is one of mcpgw.config.LOG_LEVELS."""
    level_filter.defaultLogLevel = LogLevel.levelWithName(name)
