"""A child's stdin pipe as a consumer with a high-water mark: :class:`StdinGate`.

Twisted's pipe writer (``ProcessWriter``) only buffers what the pipe does not take, without end:
a child that stops reading its stdin while a client keeps sending it notifications (which nobody
answers, so nothing else holds the client back) would make the gateway queue them in memory for
as long as the client sends. The gate is registered on the pipe as its streaming producer, so
Twisted tells it when the buffer goes over the pipe's high-water mark (``bufferSize``, 64 KiB) and
when it has drained; those that feed the child (mcpgw.transports.websocket) stop reading their
client while it is ``full`` and start again when it calls them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class StdinGate:
    """Whether a child's stdin holds more than its high-water mark, and who waits for it to drain."""

    #: Twisted paused it: the pipe's buffer is over its high-water mark.
    full = False

    def __init__(self) -> None:
        self._drained: list[Callable[[], None]] = []

    def register(self, transport: Any) -> None:
        """On the started child's stdin (Twisted's Process; a test's stand-in may have no pipes)."""
        register = getattr(transport, "registerProducer", None)
        if register is not None:
            register(self, True)

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the buffer has drained or the pipe has closed."""
        self._drained.append(callback)

    def pauseProducing(self) -> None:
        self.full = True

    def resumeProducing(self) -> None:
        self.full = False
        waiting, self._drained = self._drained, []
        for callback in waiting:
            callback()

    def stopProducing(self) -> None:
        """The pipe closed (the child is gone or going): nothing more to wait for."""
        self.resumeProducing()
