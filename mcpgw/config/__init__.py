"""The gateway's configuration: one JSON file, environment overrides, strict checks.

Every problem is a ConfigError naming the key path (``mcpServers.time.command``) so that startup can
stop with one clear line before anything listens. Each part of the file has its own module:

- ``checks``: ConfigError and the checks every parser is written with;
- ``servers``: ``mcpServers`` and ``aggregate`` (StdioServer, RemoteServer, AggregateServer);
- ``auth``: ``auth`` (static tokens, JWT); ``oauth``: ``auth.oauth``;
- ``sections``: the small sections (cors, rateLimit, session, sse, websocket, redis, admin, metrics, ...);
- ``limits``: ``limits``;
- ``observability``: ``tracing`` (OpenTelemetry export, with the ``OTEL_*`` variables) and ``auditLog``;
- ``environment``: the environment's overrides, and PRIVATE_ENV, which no child sees;
- ``gateway``: GatewayConfig, ``parse`` and ``load``.

The names below are the package's public API; import them from ``mcpgw.config``.
"""

from mcpgw.config.auth import AuthConfig, JwtConfig, StaticToken, load_jwks, parse_auth
from mcpgw.config.checks import DEFAULT_MAX_MESSAGE_BYTES, ConfigError, check_object, duration_seconds, expect
from mcpgw.config.environment import PRIVATE_ENV
from mcpgw.config.gateway import (
    EXAMPLE_SECRET,
    EXAMPLE_SECRETS,
    LOG_FORMATS,
    LOG_LEVELS,
    GatewayConfig,
    load,
    parse,
)
from mcpgw.config.limits import LimitsConfig
from mcpgw.config.oauth import (
    CLIENT_SECRET_ENV,
    IntrospectionConfig,
    OAuthConfig,
    canonical_uri,
    check_servers,
    parse_oauth,
)
from mcpgw.config.observability import AuditConfig, TracingConfig
from mcpgw.config.sections import (
    AdminConfig,
    CorsConfig,
    MetricsConfig,
    RateLimitConfig,
    RedisConfig,
    SessionConfig,
    SseConfig,
    WebSocketConfig,
)
from mcpgw.config.servers import (
    REMOTE_TRANSPORTS,
    SERVER_NAME,
    SESSION_MODES,
    AggregateServer,
    RemoteServer,
    ServerBase,
    ServerConfig,
    StdioServer,
    ToolFilter,
    check_server_name,
    parse_server,
)

__all__ = [
    "CLIENT_SECRET_ENV", "DEFAULT_MAX_MESSAGE_BYTES", "EXAMPLE_SECRET", "EXAMPLE_SECRETS", "LOG_FORMATS", "LOG_LEVELS",
    "PRIVATE_ENV", "REMOTE_TRANSPORTS", "SERVER_NAME", "SESSION_MODES",
    "AdminConfig", "AggregateServer", "AuditConfig", "AuthConfig", "ConfigError", "CorsConfig", "GatewayConfig", "IntrospectionConfig",
    "JwtConfig", "LimitsConfig", "MetricsConfig", "OAuthConfig", "RateLimitConfig", "RedisConfig", "RemoteServer",
    "ServerBase", "ServerConfig", "SessionConfig", "SseConfig", "StaticToken", "StdioServer", "ToolFilter", "TracingConfig",
    "WebSocketConfig",
    "canonical_uri", "check_object", "check_server_name", "check_servers", "duration_seconds", "expect", "load",
    "load_jwks", "parse", "parse_auth", "parse_oauth", "parse_server",
]
