"""The read gate of a gateway HTTP connection: reading runs only while no reason holds it."""

from __future__ import annotations

from typing import Any

from twisted.internet import interfaces
from zope.interface import implementer

# Why reading is paused (bits of ReadGate._holds).
TRANSPORT = 1  # the transport's write buffer is full
BUFFERED = 2  # a request is being answered and the next one's bytes are already buffered
PIPELINE = 4  # pipelined requests wait until earlier answers have gone out
VERDICT = 8  # the Guard's rate limiter has not answered yet


@implementer(interfaces.IPushProducer)
class NoProducer:
    """A transport that cannot pause reading (as twisted.web treats one)."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class ReadGate:
    """Reading from the transport runs only while nobody holds it.

    HTTPChannel pauses and resumes its transport from several places with no memory of why
    (twisted.web lets a client that never reads pipeline without bound); each reason here is a
    bit, the transport reads again once every reason is released, and ``reassert`` pauses it
    again after HTTPChannel resumed it while a reason still holds.
    """

    __slots__ = ("_producer", "_holds")

    def __init__(self, producer: Any):
        self._producer = producer
        self._holds = 0

    def hold(self, reason: int) -> None:
        if not self._holds:
            self._producer.pauseProducing()
        self._holds |= reason

    def release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds:
                self._producer.resumeProducing()

    def release_all(self) -> None:
        if self._holds:
            self._holds = 0
            self._producer.resumeProducing()

    def reassert(self) -> None:
        if self._holds:
            self._producer.pauseProducing()

    @property
    def held(self) -> int:
        return self._holds

    def unregisterProducer(self) -> None:
        """The channel stops being the transport's producer (HTTPChannel.loseConnection does the same)."""
        self._producer.unregisterProducer()
