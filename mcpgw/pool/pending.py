"""A client request in a pool, and the settings every part of the pool shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from mcpgw.versions import CAPABILITY_OF

#: The version the gateway offers its pooled children (the newest handshake version).
CHILD_VERSION = "2025-11-25"
#: What the gateway tells its pooled children it can do: sampling, elicitation and roots are
#: bridged to 2026-07-28 callers as InputRequiredResult (mcpgw.pool.inputs).
CLIENT_CAPABILITIES: dict[str, Any] = {"sampling": {}, "elicitation": {"form": {}}, "roots": {}}
CLIENT_INFO = {"name": "mcpgw-pool", "version": "1"}
#: Backoff between replacements of a child that keeps dying (seconds): first, cap.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: Server-to-client methods that the 2026-07-28 InputRequiredResult flow can carry.
INPUT_METHODS = frozenset({"sampling/createMessage", "elicitation/create", "roots/list"})
#: A child's notifications that every pooled session hears (log lines and the like stay with one call, or nowhere).
SHARED_NOTIFICATIONS = frozenset({"notifications/tools/list_changed", "notifications/prompts/list_changed",
                                  "notifications/resources/list_changed"})
#: How long a parked call waits for the client's retry with inputResponses (seconds): the default of
#: ``mcpServers.NAME.poolInputWait``.
INPUT_WAIT = 60.0
#: How long further requests of a call that asked its client something are gathered into the same
#: InputRequiredResult (seconds): a child that asks several things at once sends them back to back.
INPUT_GATHER = 0.05
#: A child's own name for the inputRequests key of its request: ``params._meta["mcpgw/inputKey"]`` (taken out).
INPUT_KEY_META = "mcpgw/inputKey"
#: The inputRequests key of a child's request that names none.
INPUT_KEYS = CAPABILITY_OF


class PoolFull(Exception):
    """No child can take the request now: answer 503 with ``Retry-After``."""

    def __init__(self, reason: str, retry_after: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@attrs.define(eq=False)
class Pending:
    """One client request in a child: whom to answer, under which id."""

    route: Any
    id: Any
    gid: str
    method: str
    token: Any = None
    #: The PooledChild it was sent to (None: waiting for a ready child).
    child: Any = None
    #: ``reactor.seconds()`` when it came (limits.requestTimeout runs from here: ``ChildPool._deadlines``).
    started: float = 0.0
    #: The caller's hook for a child's request during this call (mcpgw.transports.modern), or None.
    on_input: Callable[[Pending, dict[str, Any]], bool] | None = None
    #: The rewritten request as sent to the child.
    raw: bytes = b""
    #: The child's requests to the client during this call not answered yet: inputRequests key -> the child's id.
    asked: dict[str, Any] = attrs.Factory(dict)
    #: The same: key -> {method, params} as the client sees it.
    inputs: dict[str, Any] = attrs.Factory(dict)
    #: The nonce of the requestState of an InputRequiredResult the call waits on (None: not waiting).
    state: str | None = None
    #: The gathering timer (INPUT_GATHER), then the waiting one (poolInputWait).
    input_timer: Any = None
    #: The identity that sent the call (mcpgw.auth; None while auth is off): its requestState is bound to it.
    owner: str | None = None
    #: The call's name (tool / prompt name, resource URI): its requestState is bound to it too.
    name: Any = None
    #: Answers the client sent with the call itself (``inputResponses`` without ``requestState``): a child's
    #: request whose key is among them is answered from them at once (2026-07-28 mrtr Error Handling).
    offered: dict[str, Any] | None = None
