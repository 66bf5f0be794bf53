"""The checks every part of the configuration is written with: one ConfigError naming the key path.

A leaf module: the parsers of every section (mcpgw.config.*) import it, and it imports none of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

#: The default of every message and body size limit (a server's, a WebSocket client's, maxBodyBytes).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def expect(value: Any, kind: type | tuple[type, ...], key: str, what: str) -> Any:
    """``value`` if it is of ``kind`` (a bool is never a number), else ConfigError naming ``key``."""
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(key, f"must be {what}, not {json.dumps(value)}")
    if not isinstance(value, kind):
        raise ConfigError(key, f"must be {what}, not {json.dumps(value)[:60]}")
    return value


def check_object(value: Any, key: str, allowed: Collection[str]) -> dict[str, Any]:
    """``value`` if it is an object with no key outside ``allowed``, else ConfigError naming the key."""
    expect(value, dict, key, "an object")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}" if key else k, f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def boolean(value: Any, key: str) -> bool:
    """``true`` or ``false``."""
    return bool(expect(value, bool, key, "true or false"))


def string_list(value: Any, key: str) -> tuple[str, ...]:
    """A list of strings, as a tuple."""
    expect(value, list, key, "a list of strings")
    for i, item in enumerate(value):
        expect(item, str, f"{key}[{i}]", "a string")
    return tuple(value)


def positive(value: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    """A number above zero: an integer, or of ``kind`` (``(int, float)`` for seconds)."""
    expect(value, kind, key, "a positive number" if kind is not int else "a positive integer")
    if value <= 0:
        raise ConfigError(key, f"must be positive, not {value}")
    return value


def optional_positive(value: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    """``positive``, or None (``null`` in the file: no limit)."""
    return None if value is None else positive(value, key, kind)


def not_negative(value: Any, key: str) -> int:
    """A count where 0 means no cap."""
    expect(value, int, key, "an integer (0: no limit)")
    if value < 0:
        raise ConfigError(key, f"must be 0 (no limit) or more, not {value}")
    return int(value)


def port(value: Any, key: str) -> int:
    """A TCP port number (0: any free port)."""
    expect(value, int, key, "an integer port")
    if not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a port between 0 and 65535, not {value}")
    return int(value)


#: A duration written with its unit, like ``rateLimit.window``: ``"900s"``, ``"15m"``, ``"1h"``.
DURATION = re.compile(r"^\d+(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: str) -> float:
    """``"15m"`` -> 900.0 (a string DURATION has matched)."""
    unit = value.lstrip("0123456789")
    return int(value[: len(value) - len(unit)]) * _UNIT_SECONDS[unit]
