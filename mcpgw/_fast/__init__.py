"""Every shortcut mcpgw takes past a library's public API, quarantined here.

One module per library: ``reactor`` (Twisted's epoll reactor), ``process`` (Twisted's process
spawning and pipes), ``websocket`` (Autobahn's frame handling), ``web`` (twisted.web's channel and
request). Each probes, when imported, the exact private attributes and signatures it reads, listed
as data and checked against the installed version by ``probe`` (the one place that looks them up);
when a probe fails the module says so in one warning line and the gateway takes the public path
instead. Nothing outside this package reads a library's private names.

Two switches turn every fast path off at once: ``MCPGW_FAST_PATHS=0`` in the environment (read when
this package is imported, so it also covers what runs before the config is read) and ``"fastPaths":
false`` in the config file (``tap`` calls :func:`configure` before it builds the service). The
public paths are always correct; the fast ones only cost less (docs/performance.md says how much).
"""

from __future__ import annotations

import os

from twisted.logger import Logger

from mcpgw import logs

_log = Logger(observer=logs.observer, namespace="mcpgw.fast")

#: False when the environment or the config turned the fast paths off.
_enabled = os.environ.get("MCPGW_FAST_PATHS", "1") != "0"


def enabled() -> bool:
    """Whether fast paths may be used at all (each one also needs its own probe to pass)."""
    return _enabled


def configure(fast_paths: bool) -> None:
    """Apply the config's ``fastPaths``; the environment's ``MCPGW_FAST_PATHS=0`` always wins."""
    global _enabled
    _enabled = bool(fast_paths) and os.environ.get("MCPGW_FAST_PATHS", "1") != "0"


def probe_failed(library: str, what: str, missing: str) -> None:
    """The one warning line a failed probe writes: the public path serves ``what`` from now on."""
    _log.warn(
        "fast path off: {what} uses {library}'s public API ({missing} not found in the installed version)",
        library=library, what=what, missing=missing,
    )
