"""One timer for many deadlines that all lie the same ``timeout`` after their entry's start.

limits.requestTimeout runs from each request's arrival. A timer per request would cost a heap insert
and a cancel on every call; the requests' own table already keeps arrival order, so its first entry
has the earliest deadline, and one timer at that deadline suffices: when it fires, every entry past
its deadline expires and the timer moves on to the next one's. An entry answered in the meantime is
simply no longer in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

K = TypeVar("K")


class DeadlineQueue(Generic[K]):
    """Expires ``(key, start)`` entries ``timeout`` seconds after their start, on one reactor timer.

    ``entries()`` lists the live entries in start order (the owner's table); ``expired(key)`` is
    called for each that outlives its deadline (it removes it from the table). ``timeout`` None: off.
    """

    def __init__(self, reactor: Any, timeout: float | None, entries: Callable[[], Iterable[tuple[K, float]]],
                 expired: Callable[[K], None]):
        self.timeout = timeout
        self._reactor = reactor
        self._entries = entries
        self._expired = expired
        self._timer: Any = None

    def added(self) -> None:
        """An entry has joined the table: if no timer runs, the new one's deadline is the earliest."""
        if self.timeout is not None and self._timer is None:
            self._timer = self._reactor.callLater(self.timeout, self._expire)

    @property
    def timer(self) -> Any:
        """The reactor's DelayedCall at the earliest deadline, or None while nothing waits."""
        return self._timer

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def stop(self) -> None:
        """No more expiries (the owner is ending); ``added`` arms it again."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expire(self) -> None:
        self._timer = None
        timeout = self.timeout
        if timeout is None:
            return
        now = self._reactor.seconds()
        for key, start in list(self._entries()):
            if start + timeout > now:
                self._timer = self._reactor.callLater(start + timeout - now, self._expire)
                return
            self._expired(key)
