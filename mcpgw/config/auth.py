"""``auth``: static bearer tokens, JWTs of one issuer, and the OAuth resource server (``auth.oauth``)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs
import jwt

from mcpgw.config.checks import ConfigError, boolean, check_object, expect, string_list
from mcpgw.config.oauth import OAuthConfig, parse_oauth


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
    #: ``auth.oauth``: tokens of OAuth authorization servers for this gateway (mcpgw.oauth); None: off.
    oauth: OAuthConfig | None = None


def parse_auth(value: Any, environ: Mapping[str, str]) -> AuthConfig:
    """``auth``, with ``MCPGW_AUTH_TOKENS``, ``MCPGW_JWT_SECRET`` and ``MCPGW_OAUTH_CLIENT_SECRET`` applied."""
    raw = check_object(value, "auth", {"enabled", "bearerTokens", "apiKeyHeader", "jwt", "realm", "oauth"})
    tokens = _static_tokens(raw.get("bearerTokens", []), "auth.bearerTokens")
    if environ.get("MCPGW_AUTH_TOKENS"):
        extra = [t.strip() for t in environ["MCPGW_AUTH_TOKENS"].split(",") if t.strip()]
        tokens += _static_tokens(extra, "MCPGW_AUTH_TOKENS")
    names = [t.name for t in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("auth.bearerTokens", f"two tokens share the name {name!r}")
    jwt_config = _jwt(raw["jwt"], environ) if raw.get("jwt") is not None else None
    oauth = parse_oauth(raw["oauth"], "auth.oauth", environ) if raw.get("oauth") is not None else None
    configured = bool(tokens) or jwt_config is not None or oauth is not None
    enabled = boolean(raw.get("enabled", configured), "auth.enabled")
    if enabled and not configured:
        raise ConfigError("auth.enabled", "is true but no bearerTokens, MCPGW_AUTH_TOKENS, jwt or oauth are configured")
    header = raw.get("apiKeyHeader", "X-API-Key")
    if header is not None:
        expect(header, str, "auth.apiKeyHeader", "a header name or null")
        if not re.fullmatch(r"[A-Za-z0-9-]+", header) or header.lower() == "authorization":
            raise ConfigError("auth.apiKeyHeader", f"{header!r} is not a usable header name")
    realm = expect(raw.get("realm", "mcpgw"), str, "auth.realm", "a string")
    if not re.fullmatch(r"[\x20-\x7e]*", realm) or '"' in realm or "\\" in realm:
        raise ConfigError("auth.realm", "must be printable ASCII without quotes or backslashes")
    return AuthConfig(enabled=enabled, bearerTokens=tuple(tokens), apiKeyHeader=header, jwt=jwt_config, realm=realm,
                      oauth=oauth)


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
    for required in ("issuer", "audience"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    audience = raw["audience"]
    audiences = (expect(audience, str, f"{key}.audience", "a string or a list of strings"),) if not isinstance(audience, list) \
        else string_list(audience, f"{key}.audience")
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
