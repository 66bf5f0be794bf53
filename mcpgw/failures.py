"""The last failed calls, with their trace ids: what the console shows an operator who is asked
"why did my call fail?" (the admin API's ``GET /admin/failures``).

Kept in memory, bounded, per instance; filled as traced or audited calls end (mcpgw.dispatch
ObservedRoute), so a trace id is there whenever tracing is on. Never arguments or results.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

#: How many are kept: enough for a screen, never a memory concern.
KEPT = 50


@attrs.frozen
class Failure:
    time: float
    server: str | None
    method: str
    target: str | None
    outcome: str
    error_code: int | None
    trace_id: str | None
    identity: str | None

    def describe(self) -> dict[str, Any]:
        return {"time": self.time, "server": self.server, "method": self.method, "target": self.target,
                "outcome": self.outcome, "errorCode": self.error_code, "traceId": self.trace_id,
                "identity": self.identity}


class RecentFailures:
    """The newest ``KEPT`` failed calls, newest first when described."""

    def __init__(self, kept: int = KEPT):
        self._items: deque[Failure] = deque(maxlen=kept)

    def add(self, failure: Failure) -> None:
        self._items.append(failure)

    def describe(self) -> list[dict[str, Any]]:
        return [f.describe() for f in reversed(self._items)]
