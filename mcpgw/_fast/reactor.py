"""Twisted's epoll reactor, dispatching I/O events without a log context per event.

``EPollReactor.doPoll`` wraps every ready descriptor's ``doRead``/``doWrite`` in
``log.callWithLogger``, which asks the selectable for its ``logPrefix()`` and pushes a
``{"system": prefix}`` context for the legacy ``twisted.python.log``, for every event, and a
relayed call is several events (the client's bytes, the child's line, the writes Twisted
buffered; docs/performance.md). mcpgw logs through ``twisted.logger.Logger`` with its own
fields and never reads ``system``. Errors are still caught, logged and the descriptor dropped by
``_doReadOrWrite`` itself; what escapes it is logged here and the next event is served, as
``callWithLogger`` does. Only the log context goes.

:class:`EPollReactor` is Twisted's with that ``doPoll``: ``twistd --reactor mcpgw-epoll``
(twisted/plugins/mcpgw_reactor.py), and ``twistd mcpgw``'s reactor when the user names none
(mcpgw.tap.install_default_reactor). It reads Twisted's private ``_poller`` and ``_selectables``
(set by ``EPollReactor.__init__``) and ``_doReadOrWrite(selectable, fd, event)``; :func:`probe`
checks them and ``doPoll(self, timeout)`` against the installed Twisted when this module is
imported (mcpgw._fast.probe). When the probe fails (one warning line) or the fast paths are off (mcpgw._fast), every
poll is Twisted's own ``EPollReactor.doPoll``.

Linux only: importing this module elsewhere raises ImportError, as ``twisted.internet.epollreactor`` does.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

from mcpgw import _fast, logs
from mcpgw._fast.probe import Need, first_missing, params, uses

_log = Logger(observer=logs.observer, namespace="mcpgw.fast")

#: Whether the installed Twisted has what the fast doPoll reads (probe).
usable = False


def _needs(cls: Any) -> list[Need]:
    """What the fast doPoll reads of ``cls`` (Twisted's EPollReactor); ``_poller`` and
    ``_selectables`` are set on the instance by its own ``__init__``, read from its code."""
    return [
        Need(cls, "doPoll", "EPollReactor.doPoll(self, timeout)", params("self", "timeout")),
        Need(cls, "_doReadOrWrite", "EPollReactor._doReadOrWrite(self, selectable, fd, event)",
             params("self", "selectable", "fd", "event")),
        Need(cls, "__init__", "EPollReactor._poller", uses("_poller")),
        Need(cls, "__init__", "EPollReactor._selectables", uses("_selectables")),
    ]


def missing(cls: Any = None) -> str | None:
    """The first thing the fast doPoll reads that ``cls`` (Twisted's EPollReactor) lacks, or None."""
    return first_missing(_needs(epollreactor.EPollReactor if cls is None else cls))


def probe() -> bool:
    """Check the installed Twisted; one warning line when the fast doPoll cannot be used."""
    global usable
    gone = missing()
    usable = gone is None
    if gone is not None:
        _fast.probe_failed("Twisted", "the epoll reactor's I/O dispatch", gone)
    return usable


class EPollReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor; its ``doPoll`` pushes no log context per I/O event when it may."""

    def doPoll(self, timeout: float | None) -> None:
        if not (usable and _fast._enabled):  # (the flag, not enabled(): a call per reactor turn)
            super().doPoll(timeout)
            return
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)  # catches, logs and disconnects on errors itself
                except Exception:  # noqa: BLE001 - what callWithLogger does for the rest: log, next event
                    _log.failure("error dispatching an I/O event on {selectable!r}", selectable=selectable)

    doIteration = doPoll


def install() -> None:
    """Install :class:`EPollReactor` as the global reactor (like ``twisted.internet.epollreactor.install``)."""
    installReactor(EPollReactor())


probe()
