"""The tracer and the audit trail of one gateway, as a service that flushes both when it stops.

``tap.build_service`` makes it first among the gateway's services, so that it stops last: the
sessions' shutdown answers what was still pending (each answer ends its spans and writes its audit
line), then the tracer exports what it holds (mcpgw.tracing) and the audit file is written out and
closed (mcpgw.audit). Its ``tracer`` and ``audit`` go on the GatewayContext, where the request path
(mcpgw.dispatch) finds them.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer

from mcpgw import audit, tracing
from mcpgw.config import GatewayConfig


class Observability(Service):
    """``tracer`` (mcpgw.tracing.NOOP unless ``tracing`` is on) and ``audit`` (NOOP_AUDIT without ``auditLog``)."""

    def __init__(self, config: GatewayConfig, reactor: Any):
        self.tracer = tracing.build(config.tracing, reactor)
        self.audit = audit.build(config.auditLog, reactor)

    def stopService(self) -> defer.Deferred[None]:
        """Export the spans and write the audit lines still held; fires when both are done."""
        super().stopService()
        done = defer.DeferredList([self.tracer.shutdown(), self.audit.close()], consumeErrors=True)
        return done.addCallback(lambda _: None)
