"""The last failed calls, with their trace ids: what the console shows an operator who is asked
"why did my call fail?" (the admin API's ``GET /admin/failures``).

Kept in memory, bounded, per instance; filled as traced or audited calls end (mcpgw.dispatch
ObservedRoute), with the same record the audit trail writes (mcpgw.audit.AuditEvent), so a trace id
is there whenever tracing is on. Never arguments or results.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from mcpgw.audit import AuditEvent

#: How many are kept: enough for a screen, never a memory concern.
KEPT = 50


class RecentFailures:
    """The newest ``KEPT`` failed calls, newest first when described."""

    def __init__(self, kept: int = KEPT):
        self._items: deque[AuditEvent] = deque(maxlen=kept)

    def add(self, event: AuditEvent) -> None:
        self._items.append(event)

    def describe(self) -> list[dict[str, Any]]:
        return [{"time": e.time, "server": e.server, "method": e.method, "target": e.target, "outcome": e.outcome,
                 "errorCode": e.error_code, "traceId": e.trace_id, "identity": e.identity}
                for e in reversed(self._items)]
