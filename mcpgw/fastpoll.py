"""I/O dispatch without a log context per event, for the epoll reactor twistd runs mcpgw on.

Twisted's ``EPollReactor.doPoll`` wraps every ready descriptor's ``doRead``/``doWrite`` in
``log.callWithLogger``, which asks the selectable for its ``logPrefix()`` and pushes a
``{"system": prefix}`` context for the legacy ``twisted.python.log``: about 2 µs per event on this
machine, and a relayed call is three to four events (the client's bytes, the child's line, the
writes Twisted buffered). mcpgw logs through ``twisted.logger.Logger`` with its own fields and never
reads ``system``; errors are still caught and logged by ``_doReadOrWrite`` itself, which also drops
the connection, exactly as before. Only the log context goes (docs/performance.md).

``install`` is called by the twistd plugin (``mcpgw.tap``), never for an embedding application's own
reactor, and only when the reactor is exactly Twisted's ``EPollReactor`` with the attributes this
copy of ``doPoll`` uses; otherwise it changes nothing.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

from mcpgw import logs

_log = Logger(observer=logs.observer)

_NEEDS = ("_poller", "_selectables", "_doReadOrWrite", "doIteration")


def install(reactor: Any) -> bool:
    """Replace ``reactor.doIteration`` with ``doPoll`` minus ``callWithLogger``; True if done."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor or not all(hasattr(reactor, name) for name in _NEEDS):
        return False
    if getattr(reactor, "_mcpgw_fastpoll", False):
        return True
    poller = reactor._poller
    selectables: dict[int, Any] = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    do_read_or_write(selectable, fd, event)  # catches, logs and disconnects on errors itself
                except Exception:  # noqa: BLE001 - what callWithLogger did for the rest: log, next event
                    _log.failure("error dispatching an I/O event on {selectable!r}", selectable=selectable)

    reactor.doIteration = doPoll
    reactor._mcpgw_fastpoll = True
    return True
