"""The whole configuration: GatewayConfig, made by ``parse`` (a decoded document) or ``load`` (a file).

``parse`` is a composition of the sections' parsers, in the order their errors are reported; the
checks that span sections (auth.oauth's server names) run once every section is known.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import attrs

from mcpgw.config.auth import AuthConfig, parse_auth
from mcpgw.config.checks import DEFAULT_MAX_MESSAGE_BYTES, ConfigError, boolean, check_object, expect, port, positive
from mcpgw.config.environment import with_environment
from mcpgw.config.limits import LimitsConfig, parse_limits
from mcpgw.config.oauth import check_servers
from mcpgw.config.observability import AuditConfig, TracingConfig, parse_audit, parse_tracing
from mcpgw.config.sections import (
    AdminConfig,
    CorsConfig,
    MetricsConfig,
    RateLimitConfig,
    RedisConfig,
    SessionConfig,
    SseConfig,
    WebSocketConfig,
    parse_admin,
    parse_allowed_hosts,
    parse_cors,
    parse_metrics,
    parse_rate_limit,
    parse_redis,
    parse_session,
    parse_sse,
    parse_trusted_proxies,
    parse_websocket,
)
from mcpgw.config.servers import ServerConfig, parse_servers

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
EXAMPLE_SECRET = "change-this-secret"
#: Example values from the docs and .env.example: refused unless --insecure-dev or a loopback bind.
EXAMPLE_SECRETS = frozenset({EXAMPLE_SECRET, "change-this-session-secret"})
TOP_LEVEL_KEYS = frozenset({
    "port", "host", "logLevel", "logFormat", "cors", "rateLimit", "session", "sse", "websocket", "redis",
    "metrics", "auth", "mcpServers", "maxBodyBytes", "limits", "trustedProxies", "aggregate",
    "admin", "allowedHosts", "fastPaths", "tracing", "auditLog",
})


@attrs.frozen
class GatewayConfig:
    servers: Mapping[str, ServerConfig]
    port: int = 3000
    #: Loopback unless opened deliberately (MCP security guidance for local servers).
    host: str = "127.0.0.1"
    logLevel: str = "info"
    #: "text" (twistd's lines) or "json" (one JSON object per line, mcpgw.logs).
    logFormat: str = "text"
    cors: CorsConfig = CorsConfig()
    rateLimit: RateLimitConfig = RateLimitConfig()
    session: SessionConfig = SessionConfig()
    sse: SseConfig = SseConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    redis: RedisConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    auth: AuthConfig = AuthConfig()
    #: Largest client request body accepted (413 above it).
    maxBodyBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    limits: LimitsConfig = LimitsConfig()
    #: Proxies (addresses or networks) whose X-Forwarded-For / X-Real-IP are believed.
    trustedProxies: tuple[str, ...] = ()
    admin: AdminConfig = AdminConfig()
    #: Host names (or ``*.domain``) the MCP endpoints answer to besides those of the listen
    #: interfaces; when set, every other Host is 403 (DNS rebinding, mcpgw.origin).
    allowedHosts: tuple[str, ...] = ()
    #: Shortcuts past Twisted's and Autobahn's public APIs (mcpgw._fast); false, or the environment's
    #: MCPGW_FAST_PATHS=0, serves everything through the public paths.
    fastPaths: bool = True
    #: Spans of client requests exported over OTLP/HTTP (mcpgw.tracing); off unless the section says otherwise.
    tracing: TracingConfig = TracingConfig()
    #: The audit trail's file (mcpgw.audit); None: no audit trail.
    auditLog: AuditConfig | None = None

    @property
    def default_server(self) -> ServerConfig:
        for server in self.servers.values():
            if server.default:
                return server
        return next(iter(self.servers.values()))


def parse(raw: Any, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Check a decoded config document and apply environment overrides."""
    environ = os.environ if environ is None else environ
    check_object(raw, "", TOP_LEVEL_KEYS)
    raw = with_environment(raw, environ)
    host = expect(raw.get("host", "127.0.0.1"), str, "host", "a string")
    config = GatewayConfig(
        logLevel=_log_level(raw.get("logLevel", "info")),
        logFormat=_log_format(raw.get("logFormat", "text")),
        cors=parse_cors(raw.get("cors", {})),
        rateLimit=parse_rate_limit(raw.get("rateLimit", {})),
        session=parse_session(raw.get("session", {})),
        sse=parse_sse(raw.get("sse", {})),
        websocket=parse_websocket(raw.get("websocket", {})),
        redis=parse_redis(raw.get("redis")),
        host=host,
        metrics=parse_metrics(raw.get("metrics", {}), host),
        auth=parse_auth(raw.get("auth", {}), environ),
        limits=parse_limits(raw.get("limits", {})),
        trustedProxies=parse_trusted_proxies(raw.get("trustedProxies", [])),
        admin=parse_admin(raw.get("admin", {}), environ),
        allowedHosts=parse_allowed_hosts(raw.get("allowedHosts", [])),
        servers=parse_servers(raw.get("mcpServers"), raw.get("aggregate"), environ),
        port=port(raw.get("port", 3000), "port"),
        maxBodyBytes=positive(raw.get("maxBodyBytes", DEFAULT_MAX_MESSAGE_BYTES), "maxBodyBytes"),
        fastPaths=boolean(raw.get("fastPaths", True), "fastPaths"),
        tracing=parse_tracing(raw.get("tracing"), "tracing", environ),
        auditLog=parse_audit(raw.get("auditLog")),
    )
    if config.auth.oauth is not None:
        # Per-server scopes naming no server would leave the server they were meant for open to any scope.
        check_servers(config.auth.oauth, config.servers.keys())
    return config


def load(path: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and check the config file at ``path``."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ConfigError("--config", f"{path} is not valid JSON: {e}") from None
    return parse(raw, environ)


def _log_level(value: Any) -> str:
    """One of LOG_LEVELS, any case; ``warning`` is ``warn``."""
    level = expect(value, str, "logLevel", "a string").lower()
    level = {"warning": "warn"}.get(level, level)
    if level not in LOG_LEVELS:
        raise ConfigError("logLevel", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return level


def _log_format(value: Any) -> str:
    log_format = expect(value, str, "logFormat", "a string")
    if log_format not in LOG_FORMATS:
        raise ConfigError("logFormat", f"must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return log_format
