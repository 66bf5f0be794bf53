"""Authentication: who a request is from (static bearer tokens / API keys, JWT), and its Principal.

``mcpgw.web.Guard`` calls ``Authenticator.authenticate`` for every request to
an MCP endpoint (and ``/servers``), removes the credentials from the request,
and attaches a ``Principal``: the identity (None while auth is off) and the
client's IP address. Transports bind a new session to ``principal.identity``
and look sessions up with it, so another identity's session id is 404.

Static tokens are compared in constant time: SHA-256 of the presented token
against SHA-256 of every configured one, each with ``hmac.compare_digest``,
all of them every time. JWTs are verified with PyJWT against the HS256
secret or the keys of a JWKS file (the key's own algorithm only, never
``none``); ``iss``, ``aud``, ``exp`` and ``sub`` are required, and ``exp``/
``nbf`` are checked against the injected clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import attrs
import jwt

from mcpgw.config import AuthConfig, load_jwks
from mcpgw.ratelimit import ClientAddresses, ip_key

_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")
_ATTR = "_mcpgw_principal"


class Unauthorized(Exception):
    """No usable credentials. ``error`` is RFC 6750's code (None when none were sent)."""

    def __init__(self, description: str, error: str | None = "invalid_token"):
        super().__init__(description)
        self.description = description
        self.error = error


@attrs.frozen
class Principal:
    """Who sent a request: an authenticated identity (None while auth is off) and the client's IP."""

    identity: str | None
    client_ip: str

    @property
    def rate_key(self) -> str:
        """The rate limiter's key: the identity, else the address."""
        return "id:" + self.identity if self.identity is not None else ip_key(self.client_ip)


def principal_of(request: Any) -> Principal | None:
    """The Principal the Guard attached to ``request`` (None if it did not pass one)."""
    return getattr(request, _ATTR, None)


def identity_of(request: Any) -> str | None:
    principal = principal_of(request)
    return None if principal is None else principal.identity


class Authenticator:
    """Checks the credentials of requests against ``auth`` and finds the client's address."""

    def __init__(self, config: AuthConfig, clock: Any, trusted_proxies: tuple[str, ...] = ()):
        self.enabled = config.enabled
        self.realm = config.realm
        self._clock = clock
        self._addresses = ClientAddresses(trusted_proxies)
        self._api_key_header = config.apiKeyHeader.lower().encode() if config.apiKeyHeader else None
        self._tokens = [(hashlib.sha256(t.token.encode()).digest(), "token:" + t.name) for t in config.bearerTokens]
        self._jwt = config.jwt
        self._jwks: dict[str | None, jwt.PyJWK] = {}
        if config.jwt is not None and config.jwt.jwksFile is not None:
            self._jwks = load_jwks(config.jwt.jwksFile)

    # -- the request ---------------------------------------------------------

    def principal(self, request: Any) -> Principal:
        """Authenticate ``request``, strip its credentials, attach and return its Principal.

        Raises Unauthorized (after attaching an anonymous Principal, for the rate limiter).
        """
        headers = request.requestHeaders
        client_ip = self._addresses.client(
            _peer_host(request), headers.getRawHeaders(b"x-forwarded-for"),
            (headers.getRawHeaders(b"x-real-ip") or [None])[-1],
        )
        authorization = headers.getRawHeaders(b"authorization")
        api_key = headers.getRawHeaders(self._api_key_header) if self._api_key_header else None
        # The client's credentials go no further than this (not to a transport, never to a child).
        headers.removeHeader(b"authorization")
        if self._api_key_header:
            headers.removeHeader(self._api_key_header)
        anonymous = Principal(None, client_ip)
        setattr(request, _ATTR, anonymous)
        if not self.enabled:
            return anonymous
        principal = Principal(self.authenticate(authorization, api_key), client_ip)
        setattr(request, _ATTR, principal)
        return principal

    def authenticate(self, authorization: list[bytes] | None, api_key: list[bytes] | None) -> str:
        """The identity the credentials prove; Unauthorized if they prove none."""
        if authorization and api_key:
            raise Unauthorized("send one credential, not Authorization and an API key", "invalid_request")
        if authorization:
            if len(authorization) > 1:
                raise Unauthorized("more than one Authorization header", "invalid_request")
            m = _BEARER.fullmatch(authorization[0].decode("latin-1"))
            if m is None:
                raise Unauthorized("Authorization must be 'Bearer <token>'", "invalid_request")
            token = m.group(1)
            identity = self._static(token.encode("latin-1"))
            if identity is not None:
                return identity
            if self._jwt is not None and token.count(".") == 2:
                return self._verify_jwt(token)
            raise Unauthorized("invalid bearer token")
        if api_key:
            identity = self._static(api_key[0].strip()) if len(api_key) == 1 else None
            if identity is None:
                raise Unauthorized("invalid API key")
            return identity
        raise Unauthorized("authentication required", None)

    def challenge(self, e: Unauthorized) -> bytes:
        """The ``WWW-Authenticate`` value for a 401 (RFC 6750 section 3)."""
        value = f'Bearer realm="{self.realm}"'
        if e.error is not None:
            description = re.sub(r'[^\x20-\x7e]|["\\]', "", e.description)
            value += f', error="{e.error}", error_description="{description}"'
        return value.encode("ascii")

    # -- credentials ---------------------------------------------------------

    def _static(self, token: bytes) -> str | None:
        digest = hashlib.sha256(token).digest()
        found = None
        for expected, identity in self._tokens:  # every one, every time: no early exit
            if hmac.compare_digest(digest, expected) and found is None:
                found = identity
        return found

    def _verify_jwt(self, token: str) -> str:
        config = self._jwt
        assert config is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed JWT") from None
        if config.secret is not None:
            key: Any = config.secret
            algorithms = ["HS256"]
        else:
            kid = header.get("kid")
            jwk = self._jwks.get(kid) if kid is not None else (next(iter(self._jwks.values())) if len(self._jwks) == 1 else None)
            if jwk is None:
                raise Unauthorized("JWT signed with an unknown key")
            key, algorithms = jwk, [jwk.algorithm_name]
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=list(config.audience), issuer=config.issuer,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise Unauthorized("JWT audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("JWT issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthorized(f"JWT lacks the {e.claim} claim") from None
        except jwt.PyJWTError:
            raise Unauthorized("JWT signature or algorithm is not valid") from None
        now = self._clock.seconds()
        exp, nbf, sub = claims.get("exp"), claims.get("nbf"), claims.get("sub")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or now > exp + config.leeway:
            raise Unauthorized("JWT has expired")
        if nbf is not None and (not isinstance(nbf, (int, float)) or isinstance(nbf, bool) or now + config.leeway < nbf):
            raise Unauthorized("JWT is not valid yet")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("JWT sub must be a non-empty string")
        return "jwt:" + sub


def _peer_host(request: Any) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "local"
