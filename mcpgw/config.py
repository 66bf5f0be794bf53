"""The gateway's configuration: one JSON file, environment overrides, strict checks.

Every problem is a ConfigError naming the key path (``mcpServers.time.command``)
so that startup can stop with one clear line before anything listens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

import attrs

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
EXAMPLE_SECRET = "change-this-secret"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@attrs.frozen
class ServerConfig:
    """One stdio MCP server (Claude-desktop shape plus gateway options)."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    default: bool = False
    #: Longest newline-delimited message accepted from the child.
    maxMessageBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds between stdin EOF and SIGTERM, and again between SIGTERM and SIGKILL.
    stopGrace: float = 0.5
    #: The absolute path ``command`` resolved to at load time (spawning a
    #: PATH-searched shim costs tens of ms per session).
    executable: str = ""


@attrs.frozen
class CorsConfig:
    enabled: bool = True
    origins: tuple[str, ...] = ("*",)


@attrs.frozen
class RateLimitConfig:
    enabled: bool = False
    max: int = 100
    window: str = "15m"


@attrs.frozen
class SessionConfig:
    secret: str | None = None
    #: Idle lifetime of a session in milliseconds.
    maxAge: int = 3_600_000


@attrs.frozen
class SseConfig:
    #: Seconds between ``: ping`` comments on idle SSE streams (under every
    #: common proxy idle timeout).
    keepalive: float = 15.0
    #: Events kept per stream for ``Last-Event-ID`` replay.
    replayEvents: int = 256
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


@attrs.frozen
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None


@attrs.frozen
class MetricsConfig:
    enabled: bool = True
    port: int = 9091


@attrs.frozen
class AuthConfig:
    bearerTokens: tuple[str, ...] = ()


@attrs.frozen
class GatewayConfig:
    servers: Mapping[str, ServerConfig]
    port: int = 3000
    host: str = "0.0.0.0"
    logLevel: str = "info"
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

    @property
    def default_server(self) -> ServerConfig:
        for server in self.servers.values():
            if server.default:
                return server
        return next(iter(self.servers.values()))


# -- checking helpers ---------------------------------------------------------


def _expect(value: Any, kind: type | tuple[type, ...], key: str, what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(key, f"must be {what}, not {json.dumps(value)}")
    if not isinstance(value, kind):
        raise ConfigError(key, f"must be {what}, not {json.dumps(value)[:60]}")
    return value


def _object(value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
    _expect(value, dict, key, "an object")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}" if key else k, f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    _expect(value, list, key, "a list of strings")
    for i, item in enumerate(value):
        _expect(item, str, f"{key}[{i}]", "a string")
    return tuple(value)


def _positive(value: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    _expect(value, kind, key, "a positive number" if kind is not int else "a positive integer")
    if value <= 0:
        raise ConfigError(key, f"must be positive, not {value}")
    return value


def _port(value: Any, key: str) -> int:
    _expect(value, int, key, "an integer port")
    if not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a port between 0 and 65535, not {value}")
    return value


_WINDOW = re.compile(r"^\d+(ms|s|m|h)$")


def _server(name: str, raw: Any, environ: Mapping[str, str]) -> ServerConfig:
    key = f"mcpServers.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(key, "server names may use letters, digits, '_', '.' and '-' only")
    allowed = {"command", "args", "env", "cwd", "default", "maxMessageBytes", "stopGrace", "disabled"}
    _object(raw, key, allowed)
    if "command" not in raw:
        raise ConfigError(f"{key}.command", "is required")
    command = _expect(raw["command"], str, f"{key}.command", "a string")
    args = _string_list(raw.get("args", []), f"{key}.args")
    env = _expect(raw.get("env", {}), dict, f"{key}.env", "an object of strings")
    for k, v in env.items():
        _expect(v, str, f"{key}.env.{k}", "a string")
    cwd = raw.get("cwd")
    if cwd is not None:
        _expect(cwd, str, f"{key}.cwd", "a string")
        if not os.path.isdir(cwd):
            raise ConfigError(f"{key}.cwd", f"{cwd!r} is not a directory")
    default = _expect(raw.get("default", False), bool, f"{key}.default", "true or false")
    _expect(raw.get("disabled", False), bool, f"{key}.disabled", "true or false")
    path = env.get("PATH", environ.get("PATH", os.defpath))
    if os.sep in command:
        base = os.path.join(cwd, command) if cwd and not os.path.isabs(command) else command
        executable = base if os.path.isfile(base) and os.access(base, os.X_OK) else None
    else:
        executable = shutil.which(command, path=path)
    if executable is None:
        raise ConfigError(f"{key}.command", f"{command!r} was not found or is not executable")
    return ServerConfig(
        name=name,
        command=command,
        args=args,
        env=dict(env),
        cwd=cwd,
        default=default,
        maxMessageBytes=_positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), f"{key}.maxMessageBytes"),
        stopGrace=_positive(raw.get("stopGrace", 0.5), f"{key}.stopGrace", (int, float)),
        executable=os.path.abspath(executable),
    )


def parse(raw: Any, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Check a decoded config document and apply environment overrides."""
    environ = os.environ if environ is None else environ
    top = {
        "port", "host", "logLevel", "cors", "rateLimit", "session", "sse", "websocket", "redis",
        "metrics", "auth", "mcpServers", "maxBodyBytes",
    }
    _object(raw, "", top)
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
    # (A section of the wrong type is left as it is for its own check to name.)
    if "SESSION_SECRET" in environ and isinstance(raw.get("session", {}), dict):
        raw["session"] = {**raw.get("session", {}), "secret": environ["SESSION_SECRET"]}
    if ("REDIS_URL" in environ or "REDIS_PASSWORD" in environ) and isinstance(raw.get("redis") or {}, dict):
        redis = dict(raw.get("redis") or {})
        if "REDIS_URL" in environ:
            redis["url"] = environ["REDIS_URL"]
        if "REDIS_PASSWORD" in environ:
            redis["password"] = environ["REDIS_PASSWORD"]
        raw["redis"] = redis

    level = _expect(raw.get("logLevel", "info"), str, "logLevel", "a string")
    level = {"warning": "warn"}.get(level.lower(), level.lower())
    if level not in LOG_LEVELS:
        raise ConfigError("logLevel", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")

    cors_raw = _object(raw.get("cors", {}), "cors", {"enabled", "origins"})
    cors = CorsConfig(
        enabled=_expect(cors_raw.get("enabled", True), bool, "cors.enabled", "true or false"),
        origins=_string_list(cors_raw.get("origins", ["*"]), "cors.origins"),
    )
    rl_raw = _object(raw.get("rateLimit", {}), "rateLimit", {"enabled", "max", "window"})
    window = _expect(rl_raw.get("window", "15m"), str, "rateLimit.window", 'a duration like "15m"')
    if not _WINDOW.match(window):
        raise ConfigError("rateLimit.window", f'must be a duration like "900s", "15m" or "1h", not {window!r}')
    rate_limit = RateLimitConfig(
        enabled=_expect(rl_raw.get("enabled", False), bool, "rateLimit.enabled", "true or false"),
        max=_positive(rl_raw.get("max", 100), "rateLimit.max"),
        window=window,
    )
    s_raw = _object(raw.get("session", {}), "session", {"secret", "maxAge"})
    secret = s_raw.get("secret")
    if secret is not None:
        _expect(secret, str, "session.secret", "a string")
    session = SessionConfig(secret=secret, maxAge=_positive(s_raw.get("maxAge", 3_600_000), "session.maxAge"))
    sse_raw = _object(raw.get("sse", {}), "sse", {"keepalive", "replayEvents", "retry"})
    sse = SseConfig(
        keepalive=_positive(sse_raw.get("keepalive", 15.0), "sse.keepalive", (int, float)),
        replayEvents=_positive(sse_raw.get("replayEvents", 256), "sse.replayEvents"),
        retry=_positive(sse_raw.get("retry", 1000), "sse.retry"),
    )
    ws_raw = _object(raw.get("websocket", {}), "websocket", {"pingInterval", "pingTimeout", "maxMessageBytes"})
    websocket = WebSocketConfig(
        pingInterval=_positive(ws_raw.get("pingInterval", 30.0), "websocket.pingInterval", (int, float)),
        pingTimeout=_positive(ws_raw.get("pingTimeout", 10.0), "websocket.pingTimeout", (int, float)),
        maxMessageBytes=_positive(ws_raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), "websocket.maxMessageBytes"),
    )
    redis = None
    if raw.get("redis") is not None:
        r_raw = _object(raw["redis"], "redis", {"url", "password"})
        url = _expect(r_raw.get("url", "redis://127.0.0.1:6379/0"), str, "redis.url", "a string")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis.url", f"must start with redis://, rediss:// or unix://, not {url!r}")
        password = r_raw.get("password")
        if password is not None:
            _expect(password, str, "redis.password", "a string")
        redis = RedisConfig(url=url, password=password)
    m_raw = _object(raw.get("metrics", {}), "metrics", {"enabled", "port"})
    metrics = MetricsConfig(
        enabled=_expect(m_raw.get("enabled", True), bool, "metrics.enabled", "true or false"),
        port=_port(m_raw.get("port", 9091), "metrics.port"),
    )
    a_raw = _object(raw.get("auth", {}), "auth", {"bearerTokens"})
    auth = AuthConfig(bearerTokens=_string_list(a_raw.get("bearerTokens", []), "auth.bearerTokens"))

    servers_raw = raw.get("mcpServers")
    if servers_raw is None:
        raise ConfigError("mcpServers", "is required: configure at least one MCP server")
    _expect(servers_raw, dict, "mcpServers", "an object of servers")
    servers = {
        name: _server(name, spec, environ)
        for name, spec in servers_raw.items()
        if not (isinstance(spec, dict) and spec.get("disabled") is True)
    }
    if not servers:
        raise ConfigError("mcpServers", "is empty: configure at least one MCP server")
    defaults = [s.name for s in servers.values() if s.default]
    if len(defaults) > 1:
        raise ConfigError(f"mcpServers.{defaults[1]}.default", f"only one server may be the default (also {defaults[0]})")

    return GatewayConfig(
        servers=servers,
        port=_port(raw.get("port", 3000), "port"),
        host=_expect(raw.get("host", "0.0.0.0"), str, "host", "a string"),
        logLevel=level,
        cors=cors,
        rateLimit=rate_limit,
        session=session,
        sse=sse,
        websocket=websocket,
        redis=redis,
        metrics=metrics,
        auth=auth,
        maxBodyBytes=_positive(raw.get("maxBodyBytes", DEFAULT_MAX_MESSAGE_BYTES), "maxBodyBytes"),
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
