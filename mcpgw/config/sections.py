"""The small sections of the configuration, each a record and its parser: ``cors``, ``rateLimit``,
``session``, ``sse``, ``websocket``, ``redis``, ``admin``, ``metrics``, ``trustedProxies``, ``allowedHosts``.

Every duration a record holds is in seconds, whatever unit the file writes it in (``session.maxAge``
is milliseconds there). ``RateLimitConfig.window`` keeps the file's text ("15m") and gives its length
as ``window_seconds``; ``SseConfig.retry`` goes out to clients as written, in the milliseconds SSE defines.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

import attrs

from mcpgw.config.checks import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DURATION,
    ConfigError,
    boolean,
    check_object,
    duration_seconds,
    expect,
    optional_positive,
    port,
    positive,
    string_list,
)


@attrs.frozen
class CorsConfig:
    enabled: bool = True
    #: None listed: same-origin pages and non-browser clients only (a browser origin is opened deliberately).
    origins: tuple[str, ...] = ()


@attrs.frozen
class RateLimitConfig:
    enabled: bool = False
    #: Hits allowed per client per window.
    max: int = 100
    #: The window as the file writes it ("15m"); ``window_seconds`` is its length.
    window: str = "15m"
    #: Most clients tracked at once (memory bound); the oldest window is dropped beyond it.
    maxKeys: int = 100_000

    @property
    def window_seconds(self) -> float:
        return duration_seconds(self.window)


@attrs.frozen
class SessionConfig:
    secret: str | None = None
    #: Seconds a session may sit unused before it ends (``session.maxAge``, in milliseconds in the file).
    idleSeconds: float = 3600.0
    #: Seconds a session may live however busy (``session.maxLifetime``, milliseconds in the file); None: no cap.
    lifetimeSeconds: float | None = 86400.0


@attrs.frozen
class SseConfig:
    #: Seconds between ``: ping`` comments on idle SSE streams (under every
    #: common proxy idle timeout).
    keepalive: float = 15.0
    #: Events kept per stream for ``Last-Event-ID`` replay.
    replayEvents: int = 256
    #: Bytes of events a session keeps for ``Last-Event-ID`` replay, all its streams together.
    replayBytes: int = 4 * 1024 * 1024
    #: The ``retry:`` field of the priming event of resumable streams, in milliseconds: the SSE
    #: field's own unit, sent as it is.
    retry: int = 1000


@attrs.frozen
class WebSocketConfig:
    #: Seconds between WebSocket ping frames on an open connection.
    pingInterval: float = 30.0
    #: Seconds to wait for the pong before the peer counts as dead and is dropped.
    pingTimeout: float = 10.0
    #: Largest client message (1009 above it).
    maxMessageBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Invalid messages (not JSON, not JSON-RPC) in a row before the connection is closed 1008; None: no limit.
    maxErrors: int | None = 100


@attrs.frozen
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = attrs.field(default=None, repr=False)
    #: Seconds any one Redis operation may take (then it fails, and the connection is re-opened).
    timeout: float = 2.0
    #: Seconds between this instance's heartbeats; it counts as gone 3 heartbeats after the last.
    heartbeat: float = 1.0
    #: Prefix of every key and pub/sub channel (several gateways may share one Redis).
    keyPrefix: str = "mcpgw:"


@attrs.frozen
class AdminConfig:
    """The admin API (``/admin/``) and web console (``/console/``): off unless ``token`` is set."""

    token: str | None = attrs.field(default=None, repr=False)
    #: Seconds between the samples of the 15-minute stats ring (``/admin/stats``).
    statsInterval: float = 5.0

    @property
    def enabled(self) -> bool:
        return self.token is not None


@attrs.frozen
class MetricsConfig:
    enabled: bool = True
    port: int = 9091
    #: The metrics port's interface; parse() gives it the top-level ``host`` unless ``metrics.host`` is set.
    host: str = "127.0.0.1"


def parse_cors(value: Any) -> CorsConfig:
    raw = check_object(value, "cors", {"enabled", "origins"})
    return CorsConfig(
        enabled=boolean(raw.get("enabled", True), "cors.enabled"),
        origins=string_list(raw.get("origins", []), "cors.origins"),
    )


def parse_rate_limit(value: Any) -> RateLimitConfig:
    raw = check_object(value, "rateLimit", {"enabled", "max", "window", "maxKeys"})
    window = expect(raw.get("window", "15m"), str, "rateLimit.window", 'a duration like "15m"')
    if not DURATION.match(window):
        raise ConfigError("rateLimit.window", f'must be a duration like "900s", "15m" or "1h", not {window!r}')
    config = RateLimitConfig(
        enabled=boolean(raw.get("enabled", False), "rateLimit.enabled"),
        max=positive(raw.get("max", 100), "rateLimit.max"),
        window=window,
        maxKeys=positive(raw.get("maxKeys", 100_000), "rateLimit.maxKeys"),
    )
    if config.window_seconds <= 0:
        raise ConfigError("rateLimit.window", f"must be longer than zero, not {window!r}")
    return config


def parse_session(value: Any) -> SessionConfig:
    """``session``: ``maxAge`` and ``maxLifetime`` are milliseconds in the file, the unit of the stack
    the gateway replaces, so its files keep their meaning; the record holds seconds."""
    raw = check_object(value, "session", {"secret", "maxAge", "maxLifetime"})
    secret = raw.get("secret")
    if secret is not None:
        expect(secret, str, "session.secret", "a string")
    idle_ms = positive(raw.get("maxAge", 3_600_000), "session.maxAge")
    lifetime_ms = optional_positive(raw.get("maxLifetime", 86_400_000), "session.maxLifetime")
    return SessionConfig(
        secret=secret,
        idleSeconds=idle_ms / 1000.0,
        lifetimeSeconds=None if lifetime_ms is None else lifetime_ms / 1000.0,
    )


def parse_sse(value: Any) -> SseConfig:
    raw = check_object(value, "sse", {"keepalive", "replayEvents", "replayBytes", "retry"})
    return SseConfig(
        keepalive=positive(raw.get("keepalive", 15.0), "sse.keepalive", (int, float)),
        replayEvents=positive(raw.get("replayEvents", 256), "sse.replayEvents"),
        replayBytes=positive(raw.get("replayBytes", 4 * 1024 * 1024), "sse.replayBytes"),
        retry=positive(raw.get("retry", 1000), "sse.retry"),
    )


def parse_websocket(value: Any) -> WebSocketConfig:
    raw = check_object(value, "websocket", {"pingInterval", "pingTimeout", "maxMessageBytes", "maxErrors"})
    return WebSocketConfig(
        pingInterval=positive(raw.get("pingInterval", 30.0), "websocket.pingInterval", (int, float)),
        pingTimeout=positive(raw.get("pingTimeout", 10.0), "websocket.pingTimeout", (int, float)),
        maxMessageBytes=positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), "websocket.maxMessageBytes"),
        maxErrors=optional_positive(raw.get("maxErrors", 100), "websocket.maxErrors"),
    )


def parse_redis(value: Any) -> RedisConfig | None:
    """``redis`` (None: one instance, in memory)."""
    if value is None:
        return None
    raw = check_object(value, "redis", {"url", "password", "timeout", "heartbeat", "keyPrefix"})
    url = expect(raw.get("url", "redis://127.0.0.1:6379/0"), str, "redis.url", "a string")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url", f"must start with redis://, rediss:// or unix://, not {url!r}")
    password = raw.get("password")
    if password is not None:
        expect(password, str, "redis.password", "a string")
    from mcpgw.store.redis_url import parse_url  # validation parses the URL: no Redis client

    try:
        parse_url(url, password)
    except ValueError as e:
        raise ConfigError("redis.url", str(e)) from None
    prefix = expect(raw.get("keyPrefix", "mcpgw:"), str, "redis.keyPrefix", "a string")
    if not re.fullmatch(r"[A-Za-z0-9_.:{}-]*", prefix):
        raise ConfigError("redis.keyPrefix", "may use letters, digits and _ . : { } - only")
    return RedisConfig(
        url=url, password=password,
        timeout=positive(raw.get("timeout", 2.0), "redis.timeout", (int, float)),
        heartbeat=positive(raw.get("heartbeat", 1.0), "redis.heartbeat", (int, float)),
        keyPrefix=prefix,
    )


def parse_admin(value: Any, environ: Mapping[str, str]) -> AdminConfig:
    """``admin``: ``{"token": ..., "statsInterval": 5}``; ``MCPGW_ADMIN_TOKEN`` overrides the token."""
    raw = check_object(value, "admin", {"token", "statsInterval"})
    token = environ.get("MCPGW_ADMIN_TOKEN") or raw.get("token")
    key = "MCPGW_ADMIN_TOKEN" if environ.get("MCPGW_ADMIN_TOKEN") else "admin.token"
    if token is not None:
        expect(token, str, key, "a string")
        if len(token) < 16 or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ConfigError(key, "must be at least 16 visible ASCII characters (openssl rand -hex 32)")
    interval = positive(raw.get("statsInterval", 5.0), "admin.statsInterval", (int, float))
    if interval > 60:
        raise ConfigError("admin.statsInterval", f"must be at most 60 seconds, not {interval}")
    return AdminConfig(token=token, statsInterval=float(interval))


def parse_metrics(value: Any, host: str) -> MetricsConfig:
    """``metrics``; its interface is ``host`` (the gateway's own) unless ``metrics.host`` is set."""
    raw = check_object(value, "metrics", {"enabled", "port", "host"})
    return MetricsConfig(
        enabled=boolean(raw.get("enabled", True), "metrics.enabled"),
        port=port(raw.get("port", 9091), "metrics.port"),
        # The gateway's own interface unless set: loopback by default; the image's MCPGW_HOST=0.0.0.0
        # opens both to its container network, where Prometheus scrapes.
        host=expect(raw.get("host", host), str, "metrics.host", "a string"),
    )


def parse_trusted_proxies(value: Any) -> tuple[str, ...]:
    proxies = string_list(value, "trustedProxies")
    for i, item in enumerate(proxies):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"trustedProxies[{i}]", f"{item!r} is not an IP address or network") from None
    return proxies


def parse_allowed_hosts(value: Any) -> tuple[str, ...]:
    """Host names as a Host header carries them, without port or scheme: ``mcp.example.com``,
    ``*.example.com``, ``10.0.0.5``, ``::1``."""
    from mcpgw.origin import HOST_ENTRY

    hosts = string_list(value, "allowedHosts")
    for i, item in enumerate(hosts):
        if HOST_ENTRY.fullmatch(item):
            continue
        try:
            ipaddress.ip_address(item[1:-1] if item.startswith("[") and item.endswith("]") else item)
        except ValueError:
            raise ConfigError(f"allowedHosts[{i}]", f"{item[:80]!r} is not a host name or IP address (like "
                                                    "\"mcp.example.com\", \"*.example.com\" or \"10.0.0.5\"; "
                                                    "no scheme, port or path)") from None
    return tuple(h.lower() for h in hosts)
