"""The gateway's configuration: one JSON file, environment overrides, strict checks.

Every problem is a ConfigError naming the key path (``mcpServers.time.command``)
so that startup can stop with one clear line before anything listens.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import attrs
import jwt

from mcpgw.config.checks import (
    _WINDOW,
    ConfigError,
    _port,
    _positive,
    _string_list,
    check_object,
    duration_seconds,
    expect,
)

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
EXAMPLE_SECRET = "change-this-secret"
#: Example values from the docs and .env.example: refused unless --insecure-dev or a loopback bind.
EXAMPLE_SECRETS = frozenset({EXAMPLE_SECRET, "change-this-session-secret"})
#: Environment variables the gateway reads for itself; a child never sees them.
PRIVATE_ENV = frozenset({
    "SESSION_SECRET", "REDIS_PASSWORD", "REDIS_URL", "MCPGW_PORT", "MCPGW_HOST",
    "MCPGW_AUTH_TOKENS", "MCPGW_JWT_SECRET", "MCPGW_ADMIN_TOKEN",
})
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@attrs.frozen
class ServerConfig:
    """One stdio MCP server (Claude-desktop shape plus gateway options)."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    #: The account the child runs as (a name or a uid, and a group: default the user's own) when
    #: the gateway runs as root; None: the gateway's own (mcpgw.procsec.account).
    user: str | None = None
    group: str | None = None
    default: bool = False
    #: Longest newline-delimited message accepted from the child.
    maxMessageBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds between stdin EOF and SIGTERM, and again between SIGTERM and SIGKILL.
    stopGrace: float = 0.5
    #: The absolute path ``command`` resolved to at load time (spawning a
    #: PATH-searched shim costs tens of ms per session).
    executable: str = ""
    #: Most concurrent sessions (children) of this server; None: only the global cap.
    maxSessions: int | None = None
    #: Variables copied from the gateway's environment into the child's (never PRIVATE_ENV).
    inheritEnv: tuple[str, ...] = ()
    #: A remote server (``url`` instead of ``command``): its endpoint, "streamable-http" or "sse".
    url: str | None = None
    transport: str = "stdio"
    #: Headers sent upstream (``${VAR}`` already resolved from the environment); never logged.
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Seconds to connect to a remote server / for one HTTP exchange with it (not the SSE streams).
    connectTimeout: float = 10.0
    requestTimeout: float = 300.0
    #: Tool filtering (``tools.allow`` / ``tools.deny``); None: every tool.
    tools: ToolFilter | None = None
    #: "per-client" (one child per client session) or "pooled" (mcpgw.pool: poolSize shared children).
    sessions: str = "per-client"
    #: Children of a pooled server, and the most requests in flight on each (more: 503 + Retry-After).
    poolSize: int = 4
    poolQueue: int = 256
    #: Seconds a pooled call that answered a 2026-07-28 client with an InputRequiredResult waits for its retry.
    poolInputWait: float = 60.0
    #: Pre-spawned children of a per-client stdio server that new sessions take (mcpgw.upstream.warm); 0: off.
    warmPool: int = 0
    #: The aggregated server (top-level ``aggregate``): its member servers.
    aggregate: AggregateConfig | None = None

    @property
    def kind(self) -> str:
        """"stdio", "remote" or "aggregate"."""
        return "aggregate" if self.aggregate is not None else "remote" if self.url is not None else "stdio"


@attrs.frozen
class ToolFilter:
    """``tools.allow`` (None: all) and ``tools.deny`` names of one server."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()

    def permits(self, name: Any) -> bool:
        return isinstance(name, str) and (self.allow is None or name in self.allow) and name not in self.deny


@attrs.frozen
class AggregateConfig:
    """One endpoint over several servers (mcpgw.aggregate)."""

    members: tuple[ServerConfig, ...]
    separator: str = "__"
    #: "always": every name is ``server<sep>name``; "on-collision": only names two members share.
    prefix: str = "always"


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
    window: str = "15m"
    #: Most clients tracked at once (memory bound); the oldest window is dropped beyond it.
    maxKeys: int = 100_000

    @property
    def window_seconds(self) -> float:
        return duration_seconds(self.window)


@attrs.frozen
class SessionConfig:
    secret: str | None = None
    #: Idle lifetime of a session in milliseconds.
    maxAge: int = 3_600_000
    #: Absolute lifetime of a session in milliseconds, however busy (None: no cap).
    maxLifetime: int | None = 86_400_000


@attrs.frozen
class SseConfig:
    #: Seconds between ``: ping`` comments on idle SSE streams (under every
    #: common proxy idle timeout).
    keepalive: float = 15.0
    #: Events kept per stream for ``Last-Event-ID`` replay.
    replayEvents: int = 256
    #: Bytes of events a session keeps for ``Last-Event-ID`` replay, all its streams together.
    replayBytes: int = 4 * 1024 * 1024
    #: ``retry:`` hint (ms) sent in the priming event of resumable streams.
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


@attrs.frozen
class StaticToken:
    """A configured bearer token / API key; ``name`` is the identity it authenticates."""

    name: str
    token: str = attrs.field(repr=False)


@attrs.frozen
class JwtConfig:
    """JWT bearer tokens: HS256 with ``secret``, or the keys of a JWKS file."""

    issuer: str
    audience: tuple[str, ...]
    secret: str | None = attrs.field(default=None, repr=False)
    jwksFile: str | None = None
    #: Seconds of clock skew allowed on exp/nbf.
    leeway: float = 0.0


@attrs.frozen
class AuthConfig:
    enabled: bool = False
    bearerTokens: tuple[StaticToken, ...] = ()
    #: A header that may carry a static token instead of ``Authorization: Bearer`` (None: off).
    apiKeyHeader: str | None = "X-API-Key"
    jwt: JwtConfig | None = None
    realm: str = "mcpgw"


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

    @property
    def default_server(self) -> ServerConfig:
        for server in self.servers.values():
            if server.default:
                return server
        return next(iter(self.servers.values()))


def _optional_positive(value: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    return None if value is None else _positive(value, key, kind)


def _static_tokens(value: Any, key: str) -> list[StaticToken]:
    expect(value, list, key, "a list of tokens (strings or {\"name\", \"token\"} objects)")
    tokens = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(item, dict):
            check_object(item, k, {"name", "token"})
            name = expect(item.get("name"), str, f"{k}.name", "a string")
            token = expect(item.get("token"), str, f"{k}.token", "a string")
        else:
            token = expect(item, str, k, "a string or a {\"name\", \"token\"} object")
            name = "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        if len(token) < 16:
            raise ConfigError(k, "a token must be at least 16 characters")
        tokens.append(StaticToken(name, token))
    return tokens


def load_jwks(path: str) -> dict[str | None, Any]:
    """The signing keys of a JWKS file by ``kid`` (ConfigError naming auth.jwt.jwksFile)."""
    key = "auth.jwt.jwksFile"
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None
    keys: dict[str | None, Any] = {}
    for i, data in enumerate(doc.get("keys", []) if isinstance(doc, dict) else []):
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(data)
        except jwt.PyJWTError as e:
            raise ConfigError(key, f"{path}: key {i} is not usable: {e}") from None
        if jwk.algorithm_name == "none":
            raise ConfigError(key, f"{path}: key {i} names algorithm none")
        keys[data.get("kid")] = jwk
    if not keys:
        raise ConfigError(key, f"{path} has no signing keys")
    return keys


def _jwt(value: Any, environ: Mapping[str, str]) -> JwtConfig:
    key = "auth.jwt"
    raw = dict(check_object(value, key, {"secret", "jwksFile", "issuer", "audience", "leeway"}))
    if "MCPGW_JWT_SECRET" in environ:
        raw["secret"] = environ["MCPGW_JWT_SECRET"]
    secret = raw.get("secret")
    jwks = raw.get("jwksFile")
    if secret is not None:
        expect(secret, str, f"{key}.secret", "a string")
        if len(secret.encode()) < 32:
            raise ConfigError(f"{key}.secret", "an HS256 secret must be at least 32 bytes (openssl rand -hex 32)")
    if jwks is not None:
        expect(jwks, str, f"{key}.jwksFile", "a path")
        load_jwks(jwks)
    if (secret is None) == (jwks is None):
        raise ConfigError(key, "needs exactly one of secret (HS256) and jwksFile")
    if "issuer" not in raw:
        raise ConfigError(f"{key}.issuer", "is required")
    if "audience" not in raw:
        raise ConfigError(f"{key}.audience", "is required")
    audience = raw["audience"]
    audiences = (expect(audience, str, f"{key}.audience", "a string or a list of strings"),) if not isinstance(audience, list) \
        else _string_list(audience, f"{key}.audience")
    if not audiences:
        raise ConfigError(f"{key}.audience", "must name at least one audience")
    leeway = raw.get("leeway", 0)
    expect(leeway, (int, float), f"{key}.leeway", "a number of seconds")
    if leeway < 0:
        raise ConfigError(f"{key}.leeway", f"must not be negative, not {leeway}")
    return JwtConfig(
        issuer=expect(raw["issuer"], str, f"{key}.issuer", "a string"),
        audience=audiences, secret=secret, jwksFile=jwks, leeway=float(leeway),
    )


def _auth(value: Any, environ: Mapping[str, str]) -> AuthConfig:
    raw = check_object(value, "auth", {"enabled", "bearerTokens", "apiKeyHeader", "jwt", "realm"})
    tokens = _static_tokens(raw.get("bearerTokens", []), "auth.bearerTokens")
    if environ.get("MCPGW_AUTH_TOKENS"):
        extra = [t.strip() for t in environ["MCPGW_AUTH_TOKENS"].split(",") if t.strip()]
        tokens += _static_tokens(extra, "MCPGW_AUTH_TOKENS")
    names = [t.name for t in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("auth.bearerTokens", f"two tokens share the name {name!r}")
    jwt_config = _jwt(raw["jwt"], environ) if raw.get("jwt") is not None else None
    configured = bool(tokens) or jwt_config is not None
    enabled = expect(raw.get("enabled", configured), bool, "auth.enabled", "true or false")
    if enabled and not configured:
        raise ConfigError("auth.enabled", "is true but no bearerTokens, MCPGW_AUTH_TOKENS or jwt are configured")
    header = raw.get("apiKeyHeader", "X-API-Key")
    if header is not None:
        expect(header, str, "auth.apiKeyHeader", "a header name or null")
        if not re.fullmatch(r"[A-Za-z0-9-]+", header) or header.lower() == "authorization":
            raise ConfigError("auth.apiKeyHeader", f"{header!r} is not a usable header name")
    realm = expect(raw.get("realm", "mcpgw"), str, "auth.realm", "a string")
    if not re.fullmatch(r"[\x20-\x7e]*", realm) or '"' in realm or "\\" in realm:
        raise ConfigError("auth.realm", "must be printable ASCII without quotes or backslashes")
    return AuthConfig(enabled=enabled, bearerTokens=tuple(tokens), apiKeyHeader=header, jwt=jwt_config, realm=realm)


def _limits(value: Any) -> LimitsConfig:
    raw = check_object(value, "limits", {"maxHeaderBytes", "maxBatchMessages", "maxPendingRequests", "requestTimeout", "maxSessions",
                                  "maxSessionsPerIdentity", "headerTimeout", "bodyTimeout", "maxPipelined",
                                  "maxConnections", "maxConnectionsPerIp"})
    header = _positive(raw.get("maxHeaderBytes", 16384), "limits.maxHeaderBytes")
    if header < 1024:
        raise ConfigError("limits.maxHeaderBytes", f"must be at least 1024, not {header}")
    return LimitsConfig(
        maxHeaderBytes=header,
        maxBatchMessages=_positive(raw.get("maxBatchMessages", 100), "limits.maxBatchMessages"),
        maxPendingRequests=_positive(raw.get("maxPendingRequests", 128), "limits.maxPendingRequests"),
        requestTimeout=_optional_positive(raw.get("requestTimeout", 300.0), "limits.requestTimeout", (int, float)),
        maxSessions=_optional_positive(raw.get("maxSessions"), "limits.maxSessions"),
        maxSessionsPerIdentity=_optional_positive(raw.get("maxSessionsPerIdentity"), "limits.maxSessionsPerIdentity"),
        headerTimeout=_positive(raw.get("headerTimeout", 10.0), "limits.headerTimeout", (int, float)),
        bodyTimeout=_positive(raw.get("bodyTimeout", 60.0), "limits.bodyTimeout", (int, float)),
        maxPipelined=_positive(raw.get("maxPipelined", 16), "limits.maxPipelined"),
        maxConnections=_not_negative(raw.get("maxConnections", 0), "limits.maxConnections"),
        maxConnectionsPerIp=_not_negative(raw.get("maxConnectionsPerIp", 0), "limits.maxConnectionsPerIp"),
    )


def _not_negative(value: Any, key: str) -> int:
    """A count where 0 means no cap."""
    expect(value, int, key, "an integer (0: no limit)")
    if value < 0:
        raise ConfigError(key, f"must be 0 (no limit) or more, not {value}")
    return value


def _admin(value: Any, environ: Mapping[str, str]) -> AdminConfig:
    """``admin``: ``{"token": ..., "statsInterval": 5}``; ``MCPGW_ADMIN_TOKEN`` overrides the token."""
    raw = check_object(value, "admin", {"token", "statsInterval"})
    token = environ.get("MCPGW_ADMIN_TOKEN") or raw.get("token")
    key = "MCPGW_ADMIN_TOKEN" if environ.get("MCPGW_ADMIN_TOKEN") else "admin.token"
    if token is not None:
        expect(token, str, key, "a string")
        if len(token) < 16 or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ConfigError(key, "must be at least 16 visible ASCII characters (openssl rand -hex 32)")
    interval = _positive(raw.get("statsInterval", 5.0), "admin.statsInterval", (int, float))
    if interval > 60:
        raise ConfigError("admin.statsInterval", f"must be at most 60 seconds, not {interval}")
    return AdminConfig(token=token, statsInterval=float(interval))


def parse_server(name: str, raw: Any, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Check one ``mcpServers`` entry (as the file would give it) and resolve its command."""
    return _server(name, raw, os.environ if environ is None else environ)


def _trusted_proxies(value: Any) -> tuple[str, ...]:
    proxies = _string_list(value, "trustedProxies")
    for i, item in enumerate(proxies):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"trustedProxies[{i}]", f"{item!r} is not an IP address or network") from None
    return proxies


def _allowed_hosts(value: Any) -> tuple[str, ...]:
    """Host names as a Host header carries them, without port or scheme: ``mcp.example.com``,
    ``*.example.com``, ``10.0.0.5``, ``::1``."""
    from mcpgw.origin import HOST_ENTRY

    hosts = _string_list(value, "allowedHosts")
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


SESSION_MODES = ("per-client", "pooled")


def _pooling(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """``sessions``, ``poolSize``, ``poolQueue`` of one stdio server (mcpgw.pool)."""
    mode = expect(raw.get("sessions", "per-client"), str, f"{key}.sessions", '"per-client" or "pooled"')
    if mode not in SESSION_MODES:
        raise ConfigError(f"{key}.sessions", f'must be "per-client" or "pooled", not {json.dumps(mode)}')
    for option in ("poolSize", "poolQueue", "poolInputWait"):
        if option in raw and mode != "pooled":
            raise ConfigError(f"{key}.{option}", 'only applies to a server with "sessions": "pooled"')
    size = _positive(raw.get("poolSize", 4), f"{key}.poolSize")
    if size > 256:
        raise ConfigError(f"{key}.poolSize", f"must be at most 256, not {size}")
    queue = _positive(raw.get("poolQueue", 256), f"{key}.poolQueue")
    wait = float(_positive(raw.get("poolInputWait", 60.0), f"{key}.poolInputWait", (int, float)))
    warm = expect(raw.get("warmPool", 0), int, f"{key}.warmPool", "a whole number from 0 to 64")
    if not 0 <= warm <= 64:
        raise ConfigError(f"{key}.warmPool", f"must be a whole number from 0 to 64, not {json.dumps(warm)}")
    if warm and mode != "per-client":
        raise ConfigError(f"{key}.warmPool", 'only applies to a server with "sessions": "per-client"')
    return {"sessions": mode, "poolSize": size, "poolQueue": queue, "poolInputWait": wait, "warmPool": warm}


#: A server's name is a path segment (/servers/NAME/mcp) and a metric label: no '.', '/' or space,
#: so no client that normalises paths ('..') reaches another server.
SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_server_name(name: Any, key: str) -> str:
    """``name`` if it is a usable server name, else ConfigError(key) quoting it (cut short)."""
    if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
        raise ConfigError(key, f"{str(name)[:80]!r} is not a usable server name: 1 to 64 letters, digits, "
                               "'_' and '-' only")
    return name


def _server(name: str, raw: Any, environ: Mapping[str, str]) -> ServerConfig:
    key = f"mcpServers.{name}"
    if not SERVER_NAME.fullmatch(name):
        check_server_name(name, "mcpServers." + repr(name[:80])[1:-1])  # the key on one line, however named
    allowed = {"command", "args", "env", "cwd", "default", "maxMessageBytes", "stopGrace", "disabled", "maxSessions", "inheritEnv",
               "tools", "sessions", "poolSize", "poolQueue", "poolInputWait", "warmPool", "user", "group"}
    if isinstance(raw, dict) and "url" in raw:
        return _remote_server(name, raw, environ)
    check_object(raw, key, allowed)
    if "command" not in raw:
        raise ConfigError(f"{key}.command", "is required")
    command = expect(raw["command"], str, f"{key}.command", "a string")
    args = _string_list(raw.get("args", []), f"{key}.args")
    env = expect(raw.get("env", {}), dict, f"{key}.env", "an object of strings")
    for k, v in env.items():
        expect(v, str, f"{key}.env.{k}", "a string")
    cwd = raw.get("cwd")
    if cwd is not None:
        expect(cwd, str, f"{key}.cwd", "a string")
        if not os.path.isdir(cwd):
            raise ConfigError(f"{key}.cwd", f"{cwd!r} is not a directory")
    default = expect(raw.get("default", False), bool, f"{key}.default", "true or false")
    inherit = _string_list(raw.get("inheritEnv", []), f"{key}.inheritEnv")
    for i, variable in enumerate(inherit):
        if variable in PRIVATE_ENV:
            raise ConfigError(f"{key}.inheritEnv[{i}]", f"{variable} is the gateway's own secret or setting and is never passed to a child")
    expect(raw.get("disabled", False), bool, f"{key}.disabled", "true or false")
    path = env.get("PATH", environ.get("PATH", os.defpath))
    if os.sep in command:
        base = os.path.join(cwd, command) if cwd and not os.path.isabs(command) else command
        executable = base if os.path.isfile(base) and os.access(base, os.X_OK) else None
    else:
        executable = _which(command, path)
    if executable is None:
        where = "" if os.sep in command else f" on PATH or in {_interpreter_dir()} (beside the running Python),"
        raise ConfigError(f"{key}.command", f"{command!r} was not found{where} or is not executable")
    user, group = _child_account(raw, key)
    return ServerConfig(
        name=name,
        command=command,
        args=args,
        env=dict(env),
        cwd=cwd,
        user=user,
        group=group,
        default=default,
        maxMessageBytes=_positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), f"{key}.maxMessageBytes"),
        stopGrace=_positive(raw.get("stopGrace", 0.5), f"{key}.stopGrace", (int, float)),
        executable=os.path.abspath(executable),
        maxSessions=_optional_positive(raw.get("maxSessions"), f"{key}.maxSessions"),
        inheritEnv=inherit,
        tools=_tool_filter(raw.get("tools"), f"{key}.tools"),
        **_pooling(raw, key),
    )


def _child_account(raw: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    """``(user, group)`` of a stdio server: names or numeric ids that exist, and a gateway that
    can switch to them (root), or that already runs as them."""
    out: dict[str, str | None] = {}
    for option in ("user", "group"):
        value = raw.get(option)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{key}.{option}", f"must be an account name or a numeric id, not {json.dumps(value)}")
        out[option] = value
    if out["user"] is None:
        if out["group"] is not None:
            raise ConfigError(f"{key}.group", "only applies together with user")
        return None, None
    from mcpgw.procsec import account

    try:
        uid, gid, _ = account(out["user"], out["group"])
    except KeyError as e:
        option = "group" if out["group"] is not None and "group" in str(e) else "user"
        raise ConfigError(f"{key}.{option}", f"no such account: {e.args[0] if e.args else out[option]}") from None
    if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        raise ConfigError(f"{key}.user", f"running a child as uid {uid} gid {gid} needs the gateway to start as root "
                                         f"(it runs as uid {os.geteuid()})")
    return out["user"], out["group"]


def _interpreter_dir() -> str:
    """The running interpreter's directory (a venv's bin/, not resolved through its symlink)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def _which(command: str, path: str) -> str | None:
    """A bare command on PATH, then beside the running interpreter: the ``pip install`` that brought
    the gateway puts a server's console script there, and a unit or cron job runs ``/venv/bin/twistd``
    without the venv on PATH."""
    return shutil.which(command, path=path) or shutil.which(command, path=_interpreter_dir())


REMOTE_TRANSPORTS = ("streamable-http", "sse")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _tool_filter(value: Any, key: str) -> ToolFilter | None:
    if value is None:
        return None
    raw = check_object(value, key, {"allow", "deny"})
    allow = _string_list(raw["allow"], f"{key}.allow") if "allow" in raw else None
    return ToolFilter(allow=allow, deny=_string_list(raw.get("deny", []), f"{key}.deny"))


def _remote_server(name: str, raw: dict[str, Any], environ: Mapping[str, str]) -> ServerConfig:
    """``{"url": ..., "transport": "streamable-http" | "sse", "headers": {...}, ...}``."""
    key = f"mcpServers.{name}"
    check_object(raw, key, {"url", "transport", "headers", "connectTimeout", "requestTimeout", "default", "disabled",
                       "maxSessions", "maxMessageBytes", "tools"})
    url = expect(raw["url"], str, f"{key}.url", "a string")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{key}.url", f"must be an http:// or https:// URL, not {url!r}")
    if "@" in url.split("/", 3)[2]:
        raise ConfigError(f"{key}.url", "must not carry credentials (user:password@): put them in headers")
    transport = expect(raw.get("transport", "streamable-http"), str, f"{key}.transport", "a string")
    if transport not in REMOTE_TRANSPORTS:
        raise ConfigError(f"{key}.transport", f"must be one of {', '.join(REMOTE_TRANSPORTS)}, not {transport!r}")
    headers_raw = expect(raw.get("headers", {}), dict, f"{key}.headers", "an object of strings")
    headers = {}
    for header, value in headers_raw.items():
        expect(value, str, f"{key}.headers.{header}", "a string")
        if not re.fullmatch(r"[A-Za-z0-9-]+", header):
            raise ConfigError(f"{key}.headers.{header}", "is not a usable header name")

        def resolve(m: re.Match[str], header: str = header) -> str:
            if m.group(1) not in environ:
                raise ConfigError(f"{key}.headers.{header}", f"refers to ${{{m.group(1)}}}, which is not set")
            return environ[m.group(1)]

        headers[header] = _ENV_REF.sub(resolve, value)
        if "\r" in headers[header] or "\n" in headers[header]:
            raise ConfigError(f"{key}.headers.{header}", "must not contain line breaks")
    return ServerConfig(
        name=name,
        command="",
        default=expect(raw.get("default", False), bool, f"{key}.default", "true or false"),
        maxMessageBytes=_positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), f"{key}.maxMessageBytes"),
        maxSessions=_optional_positive(raw.get("maxSessions"), f"{key}.maxSessions"),
        url=url,
        transport=transport,
        headers=headers,
        connectTimeout=_positive(raw.get("connectTimeout", 10.0), f"{key}.connectTimeout", (int, float)),
        requestTimeout=_positive(raw.get("requestTimeout", 300.0), f"{key}.requestTimeout", (int, float)),
        tools=_tool_filter(raw.get("tools"), f"{key}.tools"),
    )


def _aggregate(value: Any, servers: Mapping[str, ServerConfig]) -> ServerConfig:
    """Top-level ``aggregate``: a server made of other servers (mcpgw.aggregate)."""
    raw = check_object(value, "aggregate", {"name", "servers", "separator", "prefix", "default", "maxSessions"})
    name = expect(raw.get("name", "all"), str, "aggregate.name", "a string")
    check_server_name(name, "aggregate.name")
    if name in servers:
        raise ConfigError("aggregate.name", f"{name!r} is also the name of a server in mcpServers")
    names = _string_list(raw.get("servers", list(servers)), "aggregate.servers")
    if not names:
        raise ConfigError("aggregate.servers", "must name at least one server")
    for i, member in enumerate(names):
        if member not in servers:
            raise ConfigError(f"aggregate.servers[{i}]", f"{member!r} is not an enabled server in mcpServers")
        if names.count(member) > 1:
            raise ConfigError(f"aggregate.servers[{i}]", f"{member!r} is listed twice")
    separator = expect(raw.get("separator", "__"), str, "aggregate.separator", "a string")
    if not separator or not re.fullmatch(r"[A-Za-z0-9_.:/-]+", separator):
        raise ConfigError("aggregate.separator", "must be one or more of letters, digits and _ . : / -")
    prefix = expect(raw.get("prefix", "always"), str, "aggregate.prefix", "a string")
    if prefix not in ("always", "on-collision"):
        raise ConfigError("aggregate.prefix", f'must be "always" or "on-collision", not {prefix!r}')
    return ServerConfig(
        name=name, command="",
        default=expect(raw.get("default", False), bool, "aggregate.default", "true or false"),
        maxSessions=_optional_positive(raw.get("maxSessions"), "aggregate.maxSessions"),
        aggregate=AggregateConfig(members=tuple(servers[m] for m in names), separator=separator, prefix=prefix),
    )


def parse(raw: Any, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Check a decoded config document and apply environment overrides."""
    environ = os.environ if environ is None else environ
    top = {
        "port", "host", "logLevel", "logFormat", "cors", "rateLimit", "session", "sse", "websocket", "redis",
        "metrics", "auth", "mcpServers", "maxBodyBytes", "limits", "trustedProxies", "aggregate",
        "admin", "allowedHosts", "fastPaths",
    }
    check_object(raw, "", top)
    raw = dict(raw)
    # Environment overrides the file.
    if "MCPGW_PORT" in environ:
        try:
            raw["port"] = int(environ["MCPGW_PORT"])
        except ValueError:
            raise ConfigError("MCPGW_PORT", f"must be an integer, not {environ['MCPGW_PORT']!r}") from None
    if "MCPGW_HOST" in environ:
        raw["host"] = environ["MCPGW_HOST"]
    if "LOG_LEVEL" in environ:
        raw["logLevel"] = environ["LOG_LEVEL"].lower()
    if "LOG_FORMAT" in environ:
        raw["logFormat"] = environ["LOG_FORMAT"].lower()
    # (A section of the wrong type is left as it is for its own check to name.)
    if "SESSION_SECRET" in environ and isinstance(raw.get("session", {}), dict):
        raw["session"] = {**raw.get("session", {}), "secret": environ["SESSION_SECRET"]}
    if "REDIS_PASSWORD" in environ and "REDIS_URL" not in environ and raw.get("redis") is None:
        # A password alone says nothing about where Redis is: turning cluster mode on at a default
        # address would make a single gateway depend on a Redis it was never told about.
        raise ConfigError("REDIS_PASSWORD", "is set but neither redis (in the config file) nor REDIS_URL is: "
                                            "set one of them to use Redis, or unset REDIS_PASSWORD")
    if ("REDIS_URL" in environ or "REDIS_PASSWORD" in environ) and isinstance(raw.get("redis") or {}, dict):
        redis_raw = dict(raw.get("redis") or {})
        if "REDIS_URL" in environ:
            redis_raw["url"] = environ["REDIS_URL"]
        if "REDIS_PASSWORD" in environ:
            redis_raw["password"] = environ["REDIS_PASSWORD"]
        raw["redis"] = redis_raw

    level = expect(raw.get("logLevel", "info"), str, "logLevel", "a string")
    level = {"warning": "warn"}.get(level.lower(), level.lower())
    if level not in LOG_LEVELS:
        raise ConfigError("logLevel", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    log_format = expect(raw.get("logFormat", "text"), str, "logFormat", "a string")
    if log_format not in LOG_FORMATS:
        raise ConfigError("logFormat", f"must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")

    cors_raw = check_object(raw.get("cors", {}), "cors", {"enabled", "origins"})
    cors = CorsConfig(
        enabled=expect(cors_raw.get("enabled", True), bool, "cors.enabled", "true or false"),
        origins=_string_list(cors_raw.get("origins", []), "cors.origins"),
    )
    rl_raw = check_object(raw.get("rateLimit", {}), "rateLimit", {"enabled", "max", "window", "maxKeys"})
    window = expect(rl_raw.get("window", "15m"), str, "rateLimit.window", 'a duration like "15m"')
    if not _WINDOW.match(window):
        raise ConfigError("rateLimit.window", f'must be a duration like "900s", "15m" or "1h", not {window!r}')
    rate_limit = RateLimitConfig(
        enabled=expect(rl_raw.get("enabled", False), bool, "rateLimit.enabled", "true or false"),
        max=_positive(rl_raw.get("max", 100), "rateLimit.max"),
        window=window,
        maxKeys=_positive(rl_raw.get("maxKeys", 100_000), "rateLimit.maxKeys"),
    )
    if duration_seconds(window) <= 0:
        raise ConfigError("rateLimit.window", f"must be longer than zero, not {window!r}")
    s_raw = check_object(raw.get("session", {}), "session", {"secret", "maxAge", "maxLifetime"})
    secret = s_raw.get("secret")
    if secret is not None:
        expect(secret, str, "session.secret", "a string")
    session = SessionConfig(
        secret=secret,
        maxAge=_positive(s_raw.get("maxAge", 3_600_000), "session.maxAge"),
        maxLifetime=_optional_positive(s_raw.get("maxLifetime", 86_400_000), "session.maxLifetime"),
    )
    sse_raw = check_object(raw.get("sse", {}), "sse", {"keepalive", "replayEvents", "replayBytes", "retry"})
    sse = SseConfig(
        keepalive=_positive(sse_raw.get("keepalive", 15.0), "sse.keepalive", (int, float)),
        replayEvents=_positive(sse_raw.get("replayEvents", 256), "sse.replayEvents"),
        replayBytes=_positive(sse_raw.get("replayBytes", 4 * 1024 * 1024), "sse.replayBytes"),
        retry=_positive(sse_raw.get("retry", 1000), "sse.retry"),
    )
    ws_raw = check_object(raw.get("websocket", {}), "websocket", {"pingInterval", "pingTimeout", "maxMessageBytes", "maxErrors"})
    websocket = WebSocketConfig(
        pingInterval=_positive(ws_raw.get("pingInterval", 30.0), "websocket.pingInterval", (int, float)),
        pingTimeout=_positive(ws_raw.get("pingTimeout", 10.0), "websocket.pingTimeout", (int, float)),
        maxMessageBytes=_positive(ws_raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), "websocket.maxMessageBytes"),
        maxErrors=_optional_positive(ws_raw.get("maxErrors", 100), "websocket.maxErrors"),
    )
    redis: RedisConfig | None = None
    if raw.get("redis") is not None:
        r_raw = check_object(raw["redis"], "redis", {"url", "password", "timeout", "heartbeat", "keyPrefix"})
        url = expect(r_raw.get("url", "redis://127.0.0.1:6379/0"), str, "redis.url", "a string")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis.url", f"must start with redis://, rediss:// or unix://, not {url!r}")
        password = r_raw.get("password")
        if password is not None:
            expect(password, str, "redis.password", "a string")
        from mcpgw.store.redis_url import parse_url  # validation parses the URL: no Redis client

        try:
            parse_url(url, password)
        except ValueError as e:
            raise ConfigError("redis.url", str(e)) from None
        prefix = expect(r_raw.get("keyPrefix", "mcpgw:"), str, "redis.keyPrefix", "a string")
        if not re.fullmatch(r"[A-Za-z0-9_.:{}-]*", prefix):
            raise ConfigError("redis.keyPrefix", "may use letters, digits and _ . : { } - only")
        redis = RedisConfig(
            url=url, password=password,
            timeout=_positive(r_raw.get("timeout", 2.0), "redis.timeout", (int, float)),
            heartbeat=_positive(r_raw.get("heartbeat", 1.0), "redis.heartbeat", (int, float)),
            keyPrefix=prefix,
        )
    host = expect(raw.get("host", "127.0.0.1"), str, "host", "a string")
    m_raw = check_object(raw.get("metrics", {}), "metrics", {"enabled", "port", "host"})
    metrics = MetricsConfig(
        enabled=expect(m_raw.get("enabled", True), bool, "metrics.enabled", "true or false"),
        port=_port(m_raw.get("port", 9091), "metrics.port"),
        # The gateway's own interface unless set: loopback by default; the image's MCPGW_HOST=0.0.0.0
        # opens both to its container network, where Prometheus scrapes.
        host=expect(m_raw.get("host", host), str, "metrics.host", "a string"),
    )
    auth = _auth(raw.get("auth", {}), environ)
    limits = _limits(raw.get("limits", {}))
    trusted = _trusted_proxies(raw.get("trustedProxies", []))
    admin = _admin(raw.get("admin", {}), environ)
    allowed_hosts = _allowed_hosts(raw.get("allowedHosts", []))

    servers_raw = raw.get("mcpServers")
    if servers_raw is None:
        raise ConfigError("mcpServers", "is required: configure at least one MCP server")
    expect(servers_raw, dict, "mcpServers", "an object of servers")
    servers = {
        name: _server(name, spec, environ)
        for name, spec in servers_raw.items()
        if not (isinstance(spec, dict) and spec.get("disabled") is True)
    }
    if not servers:
        raise ConfigError("mcpServers", "is empty: configure at least one MCP server")
    if raw.get("aggregate") is not None:
        aggregate = _aggregate(raw["aggregate"], servers)
        servers[aggregate.name] = aggregate
    defaults = [s.name for s in servers.values() if s.default]
    if len(defaults) > 1:
        raise ConfigError(f"mcpServers.{defaults[1]}.default", f"only one server may be the default (also {defaults[0]})")

    return GatewayConfig(
        servers=servers,
        port=_port(raw.get("port", 3000), "port"),
        host=host,
        logLevel=level,
        logFormat=log_format,
        cors=cors,
        rateLimit=rate_limit,
        session=session,
        sse=sse,
        websocket=websocket,
        redis=redis,
        metrics=metrics,
        auth=auth,
        maxBodyBytes=_positive(raw.get("maxBodyBytes", DEFAULT_MAX_MESSAGE_BYTES), "maxBodyBytes"),
        limits=limits,
        trustedProxies=trusted,
        admin=admin,
        allowedHosts=allowed_hosts,
        fastPaths=expect(raw.get("fastPaths", True), bool, "fastPaths", "true or false"),
    )


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
