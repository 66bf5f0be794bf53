"""``mcpServers`` and ``aggregate``: the MCP servers behind the gateway, one record type per kind.

A server is a stdio child (``command``), a remote server (``url``) or the aggregated server (the
top-level ``aggregate``); ``ServerConfig`` is the union of the three, told apart by ``kind``. Each
record holds only what its kind uses, so a consumer cannot read a pool size off a remote server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from mcpgw.config.checks import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfigError,
    boolean,
    check_object,
    expect,
    optional_positive,
    positive,
    string_list,
)
from mcpgw.config.environment import PRIVATE_ENV

SESSION_MODES = ("per-client", "pooled")
REMOTE_TRANSPORTS = ("streamable-http", "sse")
#: A server's name is a path segment (/servers/NAME/mcp) and a metric label: no '.', '/' or space,
#: so no client that normalises paths ('..') reaches another server.
SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


@attrs.frozen
class ToolFilter:
    """``tools.allow`` (None: all) and ``tools.deny`` names of one server."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()

    def permits(self, name: Any) -> bool:
        return isinstance(name, str) and (self.allow is None or name in self.allow) and name not in self.deny


@attrs.frozen(kw_only=True)
class ServerBase:
    """What every kind of server has: its name and the gateway's options around it."""

    name: str
    #: Also served at /mcp, /sse, /messages and /ws.
    default: bool = False
    #: Most concurrent sessions of this server; None: only the global cap.
    maxSessions: int | None = None
    #: Tool filtering (``tools.allow`` / ``tools.deny``); None: every tool.
    tools: ToolFilter | None = None


@attrs.frozen(kw_only=True)
class StdioServer(ServerBase):
    """A child process spoken to over stdin/stdout (Claude-desktop shape plus gateway options)."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    #: The account the child runs as (a name or a uid, and a group: default the user's own) when
    #: the gateway runs as root; None: the gateway's own (mcpgw.procsec.account).
    user: str | None = None
    group: str | None = None
    #: Longest newline-delimited message accepted from the child.
    maxMessageBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds between stdin EOF and SIGTERM, and again between SIGTERM and SIGKILL.
    stopGrace: float = 0.5
    #: The absolute path ``command`` resolved to once, at load time: a missing command stops startup
    #: rather than every session, and no spawn searches PATH.
    executable: str = ""
    #: Variables copied from the gateway's environment into the child's (never PRIVATE_ENV).
    inheritEnv: tuple[str, ...] = ()
    #: "per-client" (one child per client session) or "pooled" (mcpgw.pool: poolSize shared children).
    sessions: str = "per-client"
    #: Children of a pooled server, and the most requests in flight on each (more: 503 + Retry-After).
    poolSize: int = 4
    poolQueue: int = 256
    #: Seconds a pooled call that answered a 2026-07-28 client with an InputRequiredResult waits for its retry.
    poolInputWait: float = 60.0
    #: Pre-spawned children of a per-client server that new sessions take (mcpgw.upstream.warm); 0: off.
    warmPool: int = 0

    @property
    def kind(self) -> Literal["stdio"]:
        return "stdio"


@attrs.frozen(kw_only=True)
class RemoteServer(ServerBase):
    """An MCP server the gateway reaches over HTTP."""

    #: Its endpoint (http:// or https://, no credentials in it).
    url: str
    #: "streamable-http" or "sse" (the 2024-11-05 HTTP+SSE transport).
    transport: str = "streamable-http"
    #: Headers sent upstream (``${VAR}`` already resolved from the environment); never logged.
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Longest message accepted from the server.
    maxMessageBytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds to connect to the server.
    connectTimeout: float = 10.0
    #: Seconds one HTTP exchange with it may take (not its SSE streams): key ``exchangeTimeout``, or
    #: ``requestTimeout``, its older name, which read like ``limits.requestTimeout`` (a client request's).
    exchangeTimeout: float = 300.0

    @property
    def kind(self) -> Literal["remote"]:
        return "remote"


@attrs.frozen(kw_only=True)
class AggregateServer(ServerBase):
    """One endpoint over several servers (mcpgw.aggregate)."""

    members: tuple[StdioServer | RemoteServer, ...]
    separator: str = "__"
    #: "always": every name is ``server<sep>name``; "on-collision": only names two members share.
    prefix: str = "always"

    @property
    def kind(self) -> Literal["aggregate"]:
        return "aggregate"


#: Any configured server; ``kind`` ("stdio", "remote", "aggregate") tells which.
ServerConfig = StdioServer | RemoteServer | AggregateServer


def check_server_name(name: Any, key: str) -> str:
    """``name`` if it is a usable server name, else ConfigError(key) quoting it (cut short)."""
    if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
        raise ConfigError(key, f"{str(name)[:80]!r} is not a usable server name: 1 to 64 letters, digits, "
                               "'_' and '-' only")
    return name


def parse_servers(servers_raw: Any, aggregate_raw: Any, environ: Mapping[str, str]) -> dict[str, ServerConfig]:
    """``mcpServers`` (its enabled entries) and the ``aggregate`` server made of them."""
    if servers_raw is None:
        raise ConfigError("mcpServers", "is required: configure at least one MCP server")
    expect(servers_raw, dict, "mcpServers", "an object of servers")
    servers: dict[str, ServerConfig] = {
        name: parse_server(name, spec, environ)
        for name, spec in servers_raw.items()
        if not (isinstance(spec, dict) and spec.get("disabled") is True)
    }
    if not servers:
        raise ConfigError("mcpServers", "is empty: configure at least one MCP server")
    if aggregate_raw is not None:
        aggregate = _aggregate(aggregate_raw, servers)
        servers[aggregate.name] = aggregate
    defaults = [s.name for s in servers.values() if s.default]
    if len(defaults) > 1:
        raise ConfigError(f"mcpServers.{defaults[1]}.default", f"only one server may be the default (also {defaults[0]})")
    return servers


def parse_server(name: str, raw: Any, environ: Mapping[str, str] | None = None) -> StdioServer | RemoteServer:
    """Check one ``mcpServers`` entry (as the file would give it); a stdio server's command is resolved."""
    environ = os.environ if environ is None else environ
    if not SERVER_NAME.fullmatch(name):
        check_server_name(name, "mcpServers." + repr(name[:80])[1:-1])  # the key on one line, however named
    if isinstance(raw, dict) and "url" in raw:
        return _remote_server(name, raw, environ)
    return _stdio_server(name, raw, environ)


# -- stdio -------------------------------------------------------------------


_STDIO_KEYS = {"command", "args", "env", "cwd", "default", "maxMessageBytes", "stopGrace", "disabled", "maxSessions",
               "inheritEnv", "tools", "sessions", "poolSize", "poolQueue", "poolInputWait", "warmPool", "user", "group"}


def _stdio_server(name: str, raw: Any, environ: Mapping[str, str]) -> StdioServer:
    key = f"mcpServers.{name}"
    check_object(raw, key, _STDIO_KEYS)
    if "command" not in raw:
        raise ConfigError(f"{key}.command", "is required")
    command = expect(raw["command"], str, f"{key}.command", "a string")
    args = string_list(raw.get("args", []), f"{key}.args")
    env = expect(raw.get("env", {}), dict, f"{key}.env", "an object of strings")
    for k, v in env.items():
        expect(v, str, f"{key}.env.{k}", "a string")
    cwd = raw.get("cwd")
    if cwd is not None:
        expect(cwd, str, f"{key}.cwd", "a string")
        if not os.path.isdir(cwd):
            raise ConfigError(f"{key}.cwd", f"{cwd!r} is not a directory")
    default = boolean(raw.get("default", False), f"{key}.default")
    inherit = _inherit_env(raw.get("inheritEnv", []), f"{key}.inheritEnv")
    boolean(raw.get("disabled", False), f"{key}.disabled")
    executable = _executable(command, cwd, env.get("PATH", environ.get("PATH", os.defpath)), f"{key}.command")
    user, group = _child_account(raw, key)
    return StdioServer(
        name=name,
        command=command,
        args=args,
        env=dict(env),
        cwd=cwd,
        user=user,
        group=group,
        default=default,
        maxMessageBytes=positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), f"{key}.maxMessageBytes"),
        stopGrace=positive(raw.get("stopGrace", 0.5), f"{key}.stopGrace", (int, float)),
        executable=executable,
        maxSessions=optional_positive(raw.get("maxSessions"), f"{key}.maxSessions"),
        inheritEnv=inherit,
        tools=_tool_filter(raw.get("tools"), f"{key}.tools"),
        **_pooling(raw, key),
    )


def _inherit_env(value: Any, key: str) -> tuple[str, ...]:
    names = string_list(value, key)
    for i, variable in enumerate(names):
        if variable in PRIVATE_ENV:
            raise ConfigError(f"{key}[{i}]", f"{variable} is the gateway's own secret or setting and is never passed to a child")
    return names


def _executable(command: str, cwd: str | None, path: str, key: str) -> str:
    """The absolute path of ``command``: a path (relative ones against ``cwd``), or a bare name on ``path``."""
    if os.sep in command:
        base = os.path.join(cwd, command) if cwd and not os.path.isabs(command) else command
        executable = base if os.path.isfile(base) and os.access(base, os.X_OK) else None
    else:
        executable = _which(command, path)
    if executable is None:
        where = "" if os.sep in command else f" on PATH or in {_interpreter_dir()} (beside the running Python),"
        raise ConfigError(key, f"{command!r} was not found{where} or is not executable")
    return os.path.abspath(executable)


def _interpreter_dir() -> str:
    """The running interpreter's directory (a venv's bin/, not resolved through its symlink)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def _which(command: str, path: str) -> str | None:
    """A bare command on PATH, then beside the running interpreter: the ``pip install`` that brought
    the gateway puts a server's console script there, and a unit or cron job runs ``/venv/bin/twistd``
    without the venv on PATH."""
    return shutil.which(command, path=path) or shutil.which(command, path=_interpreter_dir())


def _pooling(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """``sessions``, ``poolSize``, ``poolQueue``, ``poolInputWait``, ``warmPool`` of one stdio server."""
    mode = expect(raw.get("sessions", "per-client"), str, f"{key}.sessions", '"per-client" or "pooled"')
    if mode not in SESSION_MODES:
        raise ConfigError(f"{key}.sessions", f'must be "per-client" or "pooled", not {json.dumps(mode)}')
    for option in ("poolSize", "poolQueue", "poolInputWait"):
        if option in raw and mode != "pooled":
            raise ConfigError(f"{key}.{option}", 'only applies to a server with "sessions": "pooled"')
    size = positive(raw.get("poolSize", 4), f"{key}.poolSize")
    if size > 256:
        raise ConfigError(f"{key}.poolSize", f"must be at most 256, not {size}")
    queue = positive(raw.get("poolQueue", 256), f"{key}.poolQueue")
    wait = float(positive(raw.get("poolInputWait", 60.0), f"{key}.poolInputWait", (int, float)))
    warm = expect(raw.get("warmPool", 0), int, f"{key}.warmPool", "a whole number from 0 to 64")
    if not 0 <= warm <= 64:
        raise ConfigError(f"{key}.warmPool", f"must be a whole number from 0 to 64, not {json.dumps(warm)}")
    if warm and mode != "per-client":
        raise ConfigError(f"{key}.warmPool", 'only applies to a server with "sessions": "per-client"')
    return {"sessions": mode, "poolSize": size, "poolQueue": queue, "poolInputWait": wait, "warmPool": warm}


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


# -- remote, aggregate, tools ------------------------------------------------


_REMOTE_KEYS = {"url", "transport", "headers", "connectTimeout", "exchangeTimeout", "requestTimeout", "default",
                "disabled", "maxSessions", "maxMessageBytes", "tools"}


def _remote_server(name: str, raw: dict[str, Any], environ: Mapping[str, str]) -> RemoteServer:
    """``{"url": ..., "transport": "streamable-http" | "sse", "headers": {...}, ...}``."""
    key = f"mcpServers.{name}"
    check_object(raw, key, _REMOTE_KEYS)
    url = expect(raw["url"], str, f"{key}.url", "a string")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{key}.url", f"must be an http:// or https:// URL, not {url!r}")
    if "@" in url.split("/", 3)[2]:
        raise ConfigError(f"{key}.url", "must not carry credentials (user:password@): put them in headers")
    transport = expect(raw.get("transport", "streamable-http"), str, f"{key}.transport", "a string")
    if transport not in REMOTE_TRANSPORTS:
        raise ConfigError(f"{key}.transport", f"must be one of {', '.join(REMOTE_TRANSPORTS)}, not {transport!r}")
    boolean(raw.get("disabled", False), f"{key}.disabled")
    return RemoteServer(
        name=name,
        default=boolean(raw.get("default", False), f"{key}.default"),
        maxMessageBytes=positive(raw.get("maxMessageBytes", DEFAULT_MAX_MESSAGE_BYTES), f"{key}.maxMessageBytes"),
        maxSessions=optional_positive(raw.get("maxSessions"), f"{key}.maxSessions"),
        url=url,
        transport=transport,
        headers=_headers(raw.get("headers", {}), f"{key}.headers", environ),
        connectTimeout=positive(raw.get("connectTimeout", 10.0), f"{key}.connectTimeout", (int, float)),
        exchangeTimeout=_exchange_timeout(raw, key),
        tools=_tool_filter(raw.get("tools"), f"{key}.tools"),
    )


def _exchange_timeout(raw: dict[str, Any], key: str) -> float:
    """``exchangeTimeout``; ``requestTimeout`` is its deprecated name (still read, never both)."""
    if "exchangeTimeout" in raw and "requestTimeout" in raw:
        raise ConfigError(f"{key}.requestTimeout", "is the old name of exchangeTimeout: give one of them")
    name = "requestTimeout" if "requestTimeout" in raw else "exchangeTimeout"
    value: float = positive(raw.get(name, 300.0), f"{key}.{name}", (int, float))
    return value


def _headers(value: Any, key: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Header values with each ``${VAR}`` replaced by the environment's value (a secret stays out of the file)."""
    headers_raw = expect(value, dict, key, "an object of strings")
    headers = {}
    for header, raw_value in headers_raw.items():
        expect(raw_value, str, f"{key}.{header}", "a string")
        if not _HEADER_NAME.fullmatch(header):
            raise ConfigError(f"{key}.{header}", "is not a usable header name")

        def resolve(m: re.Match[str], header: str = header) -> str:
            if m.group(1) not in environ:
                raise ConfigError(f"{key}.{header}", f"refers to ${{{m.group(1)}}}, which is not set")
            return environ[m.group(1)]

        headers[header] = _ENV_REF.sub(resolve, raw_value)
        if "\r" in headers[header] or "\n" in headers[header]:
            raise ConfigError(f"{key}.{header}", "must not contain line breaks")
    return headers


def _aggregate(value: Any, servers: Mapping[str, ServerConfig]) -> AggregateServer:
    """Top-level ``aggregate``: a server made of other servers (mcpgw.aggregate)."""
    raw = check_object(value, "aggregate", {"name", "servers", "separator", "prefix", "default", "maxSessions"})
    name = expect(raw.get("name", "all"), str, "aggregate.name", "a string")
    check_server_name(name, "aggregate.name")
    if name in servers:
        raise ConfigError("aggregate.name", f"{name!r} is also the name of a server in mcpServers")
    names = string_list(raw.get("servers", list(servers)), "aggregate.servers")
    if not names:
        raise ConfigError("aggregate.servers", "must name at least one server")
    members: list[StdioServer | RemoteServer] = []
    for i, member in enumerate(names):
        server = servers.get(member)
        if server is None or isinstance(server, AggregateServer):
            raise ConfigError(f"aggregate.servers[{i}]", f"{member!r} is not an enabled server in mcpServers")
        if names.count(member) > 1:
            raise ConfigError(f"aggregate.servers[{i}]", f"{member!r} is listed twice")
        members.append(server)
    separator = expect(raw.get("separator", "__"), str, "aggregate.separator", "a string")
    if not separator or not re.fullmatch(r"[A-Za-z0-9_.:/-]+", separator):
        raise ConfigError("aggregate.separator", "must be one or more of letters, digits and _ . : / -")
    prefix = expect(raw.get("prefix", "always"), str, "aggregate.prefix", "a string")
    if prefix not in ("always", "on-collision"):
        raise ConfigError("aggregate.prefix", f'must be "always" or "on-collision", not {prefix!r}')
    return AggregateServer(
        name=name,
        default=boolean(raw.get("default", False), "aggregate.default"),
        maxSessions=optional_positive(raw.get("maxSessions"), "aggregate.maxSessions"),
        members=tuple(members), separator=separator, prefix=prefix,
    )


def _tool_filter(value: Any, key: str) -> ToolFilter | None:
    if value is None:
        return None
    raw = check_object(value, key, {"allow", "deny"})
    allow = string_list(raw["allow"], f"{key}.allow") if "allow" in raw else None
    return ToolFilter(allow=allow, deny=string_list(raw.get("deny", []), f"{key}.deny"))
