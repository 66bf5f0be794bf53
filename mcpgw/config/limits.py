"""``limits``: the bounds on what one client, one connection and the whole gateway may hold or wait for."""

from __future__ import annotations

from typing import Any

import attrs

from mcpgw.config.checks import ConfigError, check_object, not_negative, optional_positive, positive


@attrs.frozen
class LimitsConfig:
    #: Request line plus all headers, bytes (431 above it).
    maxHeaderBytes: int = 16384
    #: Messages in one JSON-RPC batch POST (413 above it).
    maxBatchMessages: int = 100
    #: Requests in flight per session (a JSON-RPC error for the one over it).
    maxPendingRequests: int = 128
    #: Seconds a request may wait for its response (None: forever).
    requestTimeout: float | None = 300.0
    #: Concurrent sessions (children) of the whole gateway (None: no cap).
    maxSessions: int | None = None
    #: Concurrent sessions of one identity; anonymous clients by address (None: no cap).
    maxSessionsPerIdentity: int | None = None
    #: Seconds for a whole request head, from the connection (or its first byte); 408 and close.
    headerTimeout: float = 10.0
    #: Seconds for a whole request body once its head is in; 408 and close.
    bodyTimeout: float = 60.0
    #: Pipelined requests answered in a row before reading waits for the answers to go out.
    maxPipelined: int = 16
    #: Open HTTP connections of the gateway (0: no cap); 503 and close over it.
    maxConnections: int = 0
    #: Open HTTP connections per peer address (0: no cap; keep 0 behind a proxy).
    maxConnectionsPerIp: int = 0


_KEYS = {"maxHeaderBytes", "maxBatchMessages", "maxPendingRequests", "requestTimeout", "maxSessions",
         "maxSessionsPerIdentity", "headerTimeout", "bodyTimeout", "maxPipelined", "maxConnections", "maxConnectionsPerIp"}


def parse_limits(value: Any) -> LimitsConfig:
    raw = check_object(value, "limits", _KEYS)
    header = positive(raw.get("maxHeaderBytes", 16384), "limits.maxHeaderBytes")
    if header < 1024:
        raise ConfigError("limits.maxHeaderBytes", f"must be at least 1024, not {header}")
    return LimitsConfig(
        maxHeaderBytes=header,
        maxBatchMessages=positive(raw.get("maxBatchMessages", 100), "limits.maxBatchMessages"),
        maxPendingRequests=positive(raw.get("maxPendingRequests", 128), "limits.maxPendingRequests"),
        requestTimeout=optional_positive(raw.get("requestTimeout", 300.0), "limits.requestTimeout", (int, float)),
        maxSessions=optional_positive(raw.get("maxSessions"), "limits.maxSessions"),
        maxSessionsPerIdentity=optional_positive(raw.get("maxSessionsPerIdentity"), "limits.maxSessionsPerIdentity"),
        headerTimeout=positive(raw.get("headerTimeout", 10.0), "limits.headerTimeout", (int, float)),
        bodyTimeout=positive(raw.get("bodyTimeout", 60.0), "limits.bodyTimeout", (int, float)),
        maxPipelined=positive(raw.get("maxPipelined", 16), "limits.maxPipelined"),
        maxConnections=not_negative(raw.get("maxConnections", 0), "limits.maxConnections"),
        maxConnectionsPerIp=not_negative(raw.get("maxConnectionsPerIp", 0), "limits.maxConnectionsPerIp"),
    )
