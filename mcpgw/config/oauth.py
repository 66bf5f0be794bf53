"""``auth.oauth``: the gateway as an OAuth 2.1 resource server (MCP authorization spec, RFC 9728, RFC 8707).

``parse_oauth`` checks the object strictly and raises ConfigError naming the key path, like the rest of
the configuration; ``check_servers`` refuses per-server scopes of a server that is not configured. The
OAuth machinery that uses these records is mcpgw.oauth.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from mcpgw.config.checks import ConfigError, check_object, expect, positive

#: The environment variable that overrides ``introspection.clientSecret`` (keeps it out of the file).
CLIENT_SECRET_ENV = "MCPGW_OAUTH_CLIENT_SECRET"
#: RFC 6749 section 3.3: scope-token = 1*NQCHAR (no space, quote or backslash), so it fits in a quoted-string.
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
#: What may not appear in a URL the gateway quotes in WWW-Authenticate or serves in metadata.
_UNQUOTABLE = re.compile(r'[\x00-\x20\x7f"\\]')


@attrs.frozen
class IntrospectionConfig:
    """RFC 7662 token introspection for opaque access tokens, with the gateway's own client credentials."""

    clientId: str
    clientSecret: str = attrs.field(repr=False)
    #: The issuer whose opaque tokens are introspected: an opaque token says nothing of where it came from,
    #: so it is shown to this one authorization server only (default: the first of authorizationServers).
    authorizationServer: str = ""
    #: The introspection endpoint; None: ``introspection_endpoint`` from that server's metadata.
    endpoint: str | None = None
    #: Seconds an ``active`` answer is reused (never past the token's ``exp``): how long a revoked token
    #: still works here.
    cacheSeconds: float = 60.0
    #: Most answers kept; the least recently used goes first.
    cacheSize: int = 10000


@attrs.frozen
class OAuthConfig:
    """``auth.oauth``: who issues the tokens this gateway accepts, for which resource, with which scopes."""

    #: The gateway's canonical URI (RFC 8707 section 2): its public base URL, e.g. ``https://gw.example.com``
    #: (lowercase scheme and host, no trailing slash). Server NAME is ``<resource>/servers/NAME/mcp``.
    resource: str
    #: Issuer identifiers of the authorization servers (RFC 8414 section 2); a token's ``iss`` is one of them.
    authorizationServers: tuple[str, ...]
    #: ``scopes_supported`` of the gateway's metadata (RFC 9728 section 2) and the 401's ``scope`` by default.
    scopesSupported: tuple[str, ...] = ()
    #: The audience that makes a token good on every server (None: ``resource``); a server's own resource
    #: URIs are accepted on that server only.
    audience: str | None = None
    #: Seconds the keys of an authorization server are used before they are fetched again.
    jwksCacheSeconds: float = 3600.0
    #: Fewest seconds between two fetches of an authorization server's keys (or metadata): a token with an
    #: unknown ``kid`` refreshes them at most this often.
    jwksMinRefreshSeconds: float = 30.0
    #: Seconds for one exchange with an authorization server (metadata, keys, introspection).
    httpTimeout: float = 10.0
    #: Seconds of clock skew allowed on ``exp`` / ``nbf``.
    leeway: float = 0.0
    #: JWT access tokens must say ``typ: at+jwt`` (RFC 9068 section 4); false also takes ``JWT`` or none.
    requireAtJwt: bool = True
    introspection: IntrospectionConfig | None = None
    #: Per server: a token needs one of these scopes to open a session there.
    scopes: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: Per server, per tool: a token needs one of these scopes to call (and to see) the tool.
    toolScopes: Mapping[str, Mapping[str, tuple[str, ...]]] = attrs.field(factory=dict)

    @property
    def gateway_audience(self) -> str:
        return self.audience if self.audience is not None else self.resource


def canonical_uri(uri: str) -> str:
    """``uri`` with a lowercase scheme and host and without a trailing slash (MCP authorization spec,
    "Canonical Server URI"), for comparing resource identifiers and audiences; other strings unchanged."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return uri
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, parts.fragment))


def parse_oauth(raw: Any, key: str = "auth.oauth", environ: Mapping[str, str] | None = None) -> OAuthConfig:
    """The OAuthConfig of ``raw`` (the JSON object at ``key``); ConfigError naming the key path."""
    allowed = {"resource", "authorizationServers", "scopesSupported", "audience", "jwksCacheSeconds",
               "jwksMinRefreshSeconds", "httpTimeout", "leeway", "requireAtJwt", "introspection", "scopes", "toolScopes"}
    raw = check_object(raw, key, allowed)
    for required in ("resource", "authorizationServers"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    resource = _url(raw["resource"], f"{key}.resource", resource=True)
    servers = expect(raw["authorizationServers"], list, f"{key}.authorizationServers", "a list of issuer URLs")
    if not servers:
        raise ConfigError(f"{key}.authorizationServers", "must name at least one authorization server")
    issuers = tuple(_url(s, f"{key}.authorizationServers[{i}]", resource=False) for i, s in enumerate(servers))
    if len(set(issuers)) != len(issuers):
        raise ConfigError(f"{key}.authorizationServers", "names an authorization server twice")
    audience = raw.get("audience")
    if audience is not None:
        expect(audience, str, f"{key}.audience", "a string")
        if not audience or _UNQUOTABLE.search(audience):
            raise ConfigError(f"{key}.audience", "must be a non-empty string without spaces, quotes or backslashes")
        audience = canonical_uri(audience)
    introspection = None
    if raw.get("introspection") is not None:
        introspection = _introspection(raw["introspection"], f"{key}.introspection", issuers, environ or {})
    return OAuthConfig(
        resource=resource,
        authorizationServers=issuers,
        scopesSupported=_scopes(raw.get("scopesSupported", []), f"{key}.scopesSupported"),
        audience=audience,
        jwksCacheSeconds=_seconds(raw.get("jwksCacheSeconds", 3600), f"{key}.jwksCacheSeconds"),
        jwksMinRefreshSeconds=_seconds(raw.get("jwksMinRefreshSeconds", 30), f"{key}.jwksMinRefreshSeconds"),
        httpTimeout=_seconds(raw.get("httpTimeout", 10), f"{key}.httpTimeout"),
        leeway=_seconds(raw.get("leeway", 0), f"{key}.leeway", zero=True),
        requireAtJwt=expect(raw.get("requireAtJwt", True), bool, f"{key}.requireAtJwt", "true or false"),
        introspection=introspection,
        scopes={name: _scopes(v, f"{key}.scopes.{name}", empty=False)
                for name, v in expect(raw.get("scopes", {}), dict, f"{key}.scopes", "an object").items()},
        toolScopes=_tool_scopes(raw.get("toolScopes", {}), f"{key}.toolScopes"),
    )


def check_servers(config: OAuthConfig, names: Collection[str], key: str = "auth.oauth") -> None:
    """ConfigError if ``scopes`` or ``toolScopes`` name a server that is not configured (a typo there
    would leave the server open to any scope)."""
    for field, by_server in (("scopes", config.scopes), ("toolScopes", config.toolScopes)):
        for name in by_server:
            if name not in names:
                raise ConfigError(f"{key}.{field}.{name}", "is not a configured server")


# -- pieces ------------------------------------------------------------------


def _introspection(value: Any, key: str, issuers: tuple[str, ...], environ: Mapping[str, str]) -> IntrospectionConfig:
    raw = dict(check_object(value, key, {"clientId", "clientSecret", "authorizationServer", "endpoint", "cacheSeconds",
                                    "cacheSize"}))
    if CLIENT_SECRET_ENV in environ:
        raw["clientSecret"] = environ[CLIENT_SECRET_ENV]
    for required in ("clientId", "clientSecret"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required" + (f" (or {CLIENT_SECRET_ENV})" if required == "clientSecret" else ""))
        if not expect(raw[required], str, f"{key}.{required}", "a string"):
            raise ConfigError(f"{key}.{required}", "must not be empty")
    server = raw.get("authorizationServer", issuers[0])
    if server not in issuers:
        raise ConfigError(f"{key}.authorizationServer", f"must be one of authorizationServers, not {json.dumps(server)[:60]}")
    endpoint = raw.get("endpoint")
    if endpoint is not None:
        endpoint = _url(endpoint, f"{key}.endpoint", resource=False)
    size = positive(raw.get("cacheSize", 10000), f"{key}.cacheSize")
    return IntrospectionConfig(
        clientId=raw["clientId"], clientSecret=raw["clientSecret"], authorizationServer=server, endpoint=endpoint,
        cacheSeconds=_seconds(raw.get("cacheSeconds", 60), f"{key}.cacheSeconds", zero=True), cacheSize=size,
    )


def _tool_scopes(value: Any, key: str) -> dict[str, dict[str, tuple[str, ...]]]:
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for server, tools in expect(value, dict, key, "an object of servers").items():
        expect(tools, dict, f"{key}.{server}", "an object of tool names to scope lists")
        out[server] = {tool: _scopes(v, f"{key}.{server}.{tool}", empty=False) for tool, v in tools.items()}
    return out


def _url(value: Any, key: str, *, resource: bool) -> str:
    """An absolute http(s) URL without fragment (RFC 8707 section 2, RFC 8414 section 2); https unless the
    host is loopback (OAuth 2.1 section 1.5). A resource is also made canonical and has no query."""
    expect(value, str, key, "an http(s) URL")
    if _UNQUOTABLE.search(value):
        raise ConfigError(key, "must not contain spaces, quotes or backslashes")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError as e:
        raise ConfigError(key, f"is not a URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise ConfigError(key, f"must be an absolute http(s) URL, not {json.dumps(value)[:80]}")
    if parts.fragment or value.endswith("#"):
        raise ConfigError(key, "must not have a fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "must not carry user information")
    if parts.scheme.lower() == "http" and not _loopback(host):
        raise ConfigError(key, "must be https (plain http only for a loopback host)")
    if resource:
        if parts.query or value.endswith("?"):
            raise ConfigError(key, "must not have a query (RFC 8707 section 2)")
        return canonical_uri(value)
    return value


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _scopes(value: Any, key: str, empty: bool = True) -> tuple[str, ...]:
    expect(value, list, key, "a list of scopes")
    if not value and not empty:
        raise ConfigError(key, "must name at least one scope")
    for i, scope in enumerate(value):
        expect(scope, str, f"{key}[{i}]", "a string")
        if not _SCOPE.fullmatch(scope):
            raise ConfigError(f"{key}[{i}]", f"{json.dumps(scope)[:60]} is not a scope token (RFC 6749 section 3.3)")
    return tuple(dict.fromkeys(value))


def _seconds(value: Any, key: str, zero: bool = False) -> float:
    expect(value, (int, float), key, "a number of seconds")
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(key, f"must be {'non-negative' if zero else 'positive'}, not {value}")
    return float(value)
