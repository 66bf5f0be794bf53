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

With ``auth.oauth`` the gateway is also an OAuth 2.1 resource server (MCP authorization spec):
a bearer token that is neither a static token nor a JWT of ``auth.jwt``'s issuer goes to
``mcpgw.oauth.tokens.TokenVerifier``, which accepts it only for this gateway or for the server the
request is for (RFC 8707; never another resource's token). That check answers later (it may fetch
keys or introspect), so ``principal`` returns a Deferred for such a token. An OAuth principal carries
its token's scopes, which the scope policy (``mcpgw.oauth.policy``) reads; every 401 points at the
Protected Resource Metadata (RFC 9728) of the endpoint asked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Any

import attrs
import jwt
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mcpgw.config import AuthConfig, load_jwks
from mcpgw.oauth import policy
from mcpgw.oauth.http import HttpClient, TreqHttp
from mcpgw.oauth.metadata import ProtectedResources
from mcpgw.oauth.tokens import AccessToken, TokenError, TokenVerifier
from mcpgw.ratelimit import ClientAddresses, ip_key

_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")
_ATTR = "_mcpgw_principal"


class Unauthorized(Exception):
    """No usable credentials. ``error`` is RFC 6750's code (None when none were sent); ``status`` the
    HTTP status (401; 503 when the authorization server that would decide cannot be asked)."""

    def __init__(self, description: str, error: str | None = "invalid_token", status: int = 401):
        super().__init__(description)
        self.description = description
        self.error = error
        self.status = status


class InsufficientScope(Exception):
    """A token accepted here that lacks the scope an operation needs: 403 with ``error="insufficient_scope"``
    and the scopes to ask for (MCP authorization spec, "Runtime Insufficient Scope Errors")."""

    def __init__(self, description: str, scopes: tuple[str, ...]):
        super().__init__(description)
        self.description = description
        self.scopes = scopes


@attrs.frozen
class Principal:
    """Who sent a request: an authenticated identity (None while auth is off) and the client's IP."""

    identity: str | None
    client_ip: str
    #: The scopes of an OAuth access token; None for every other credential (static tokens, API keys,
    #: ``auth.jwt``), which the OAuth scope policy does not restrict.
    scopes: frozenset[str] | None = None

    @property
    def rate_key(self) -> str:
        """The rate limiter's key: the identity, else the address."""
        return "id:" + self.identity if self.identity is not None else ip_key(self.client_ip)


def principal_of(request: Any) -> Principal | None:
    """The Principal the Guard attached to ``request`` (None if it did not pass one: any request object
    reaches here, twisted.web's own and the tests' too, so the attribute may be absent)."""
    return getattr(request, _ATTR, None)


def identity_of(request: Any) -> str | None:
    principal = principal_of(request)
    return None if principal is None else principal.identity


class Authenticator:
    """Checks the credentials of requests against ``auth`` and finds the client's address.

    ``servers`` and ``default`` name the gateway's servers, for the resource identifiers of
    ``auth.oauth`` (mcpgw.oauth.metadata); ``http`` is how the authorization servers are asked
    (default: treq on ``clock``, which is then the reactor)."""

    def __init__(self, config: AuthConfig, clock: Any, trusted_proxies: tuple[str, ...] = (), *,
                 servers: Iterable[str] = (), default: str | None = None, http: HttpClient | None = None):
        self.enabled = config.enabled
        #: ``auth.oauth`` (None: off, and while ``auth.enabled`` is false).
        self.oauth = config.oauth if config.enabled else None
        self.realm = config.realm
        self._clock = clock
        self._addresses = ClientAddresses(trusted_proxies)
        self._api_key_header = config.apiKeyHeader.lower().encode() if config.apiKeyHeader else None
        self._tokens = [(hashlib.sha256(t.token.encode()).digest(), "token:" + t.name) for t in config.bearerTokens]
        self._jwt = config.jwt
        self._jwks: dict[str | None, jwt.PyJWK] = {}
        if config.jwt is not None and config.jwt.jwksFile is not None:
            self._jwks = load_jwks(config.jwt.jwksFile)
        #: The gateway's resource identifiers and their metadata (None without ``auth.oauth``).
        self.resources: ProtectedResources | None = None
        self._verifier: TokenVerifier | None = None
        if self.oauth is not None:
            self.resources = ProtectedResources(self.oauth, servers, default)
            self._verifier = TokenVerifier(self.oauth, http if http is not None else TreqHttp(clock), clock)

    # -- the request ---------------------------------------------------------

    def principal(self, request: Any, server: str | None = None) -> Principal | Deferred[Principal]:
        """Authenticate ``request`` for ``server`` (None: no one server, e.g. ``/servers``), strip its
        credentials, attach and return its Principal: a Deferred of it for an OAuth access token.

        Raises (or fails with) Unauthorized, after attaching an anonymous Principal for the rate limiter.
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
        found = self.authenticate(authorization, api_key, server)
        if isinstance(found, str):
            principal = Principal(found, client_ip)
            setattr(request, _ATTR, principal)
            return principal
        return found.addCallbacks(self._attach_token, _unauthorized, callbackArgs=(request, client_ip))

    @staticmethod
    def _attach_token(token: AccessToken, request: Any, client_ip: str) -> Principal:
        principal = Principal(token.identity, client_ip, token.scopes)
        setattr(request, _ATTR, principal)
        return principal

    def authenticate(self, authorization: list[bytes] | None, api_key: list[bytes] | None,
                     server: str | None = None) -> str | Deferred[AccessToken]:
        """The identity the credentials prove, or a Deferred of the OAuth access token they are;
        Unauthorized if they prove none."""
        if authorization and api_key:
            raise Unauthorized("send one credential, not Authorization and an API key", "invalid_request")
        if authorization:
            if len(authorization) > 1:
                raise Unauthorized("more than one Authorization header", "invalid_request")
            m = _BEARER.fullmatch(authorization[0].decode("latin-1"))
            if m is None:
                raise Unauthorized("Authorization must be 'Bearer <token>'", "invalid_request")
            return self._bearer(m.group(1), server)
        if api_key:
            identity = self._static(api_key[0].strip()) if len(api_key) == 1 else None
            if identity is None:
                raise Unauthorized("invalid API key")
            return identity
        raise Unauthorized("authentication required", None)

    def _bearer(self, token: str, server: str | None) -> str | Deferred[AccessToken]:
        """Static tokens first, then ``auth.jwt`` (its issuer's JWTs when OAuth is on too), then the
        authorization servers of ``auth.oauth`` for the resource ``server`` is."""
        identity = self._static(token.encode("latin-1"))
        if identity is not None:
            return identity
        is_jwt = token.count(".") == 2
        if self._jwt is not None and is_jwt and (self._verifier is None or _issuer(token) == self._jwt.issuer):
            return self._verify_jwt(token)
        if self._verifier is not None and self.resources is not None:
            return self._verifier.verify(token, self.resources.audiences(server))
        raise Unauthorized("invalid bearer token")

    def scope_refusal(self, principal: Principal, server: str | None) -> InsufficientScope | None:
        """An OAuth token without one of ``server``'s session scopes (``auth.oauth.scopes``) is refused there."""
        if self.oauth is None or principal.scopes is None or server is None:
            return None
        if policy.may_open_session(self.oauth, server, principal.scopes):
            return None
        needed = policy.session_scopes(self.oauth, server)
        return InsufficientScope(f"this server needs one of the scopes {' '.join(needed)}",
                                 policy.step_up_scopes(self.oauth, server, principal.scopes, needed))

    def tool_refusal(self, principal: Principal | None, server: str, tool: Any) -> InsufficientScope | None:
        """A ``tools/call`` of ``tool`` that the principal's token has no scope for (``auth.oauth.toolScopes``)."""
        if self.oauth is None or principal is None or principal.scopes is None or not isinstance(tool, str):
            return None
        if policy.may_call_tool(self.oauth, server, tool, principal.scopes):
            return None
        needed = policy.tool_scopes(self.oauth, server, tool)
        return InsufficientScope(f"calling {tool} needs one of the scopes {' '.join(needed)}",
                                 policy.step_up_scopes(self.oauth, server, principal.scopes, needed))

    def hidden_tools(self, principal: Principal | None, server: str) -> frozenset[str]:
        """The tools ``tools/list`` leaves out for this principal: those its token may not call."""
        if self.oauth is None or principal is None or principal.scopes is None:
            return frozenset()
        scoped = self.oauth.toolScopes.get(server, {})
        return frozenset(name for name in scoped if not policy.may_call_tool(self.oauth, server, name, principal.scopes))

    def challenge(self, e: Unauthorized, request: Any = None) -> bytes:
        """The ``WWW-Authenticate`` value for a 401 (RFC 6750 section 3), pointing at the Protected
        Resource Metadata of the endpoint ``request`` asked when OAuth is on (RFC 9728 section 5.1)."""
        if self.resources is not None:
            return self.resources.unauthorized_at(request.path.decode("latin-1"), error=e.error,
                                                  description=e.description, realm=self.realm)
        value = f'Bearer realm="{self.realm}"'
        if e.error is not None:
            description = re.sub(r'[^\x20-\x7e]|["\\]', "", e.description)
            value += f', error="{e.error}", error_description="{description}"'
        return value.encode("ascii")

    def step_up(self, e: InsufficientScope, request: Any) -> bytes:
        """The ``WWW-Authenticate`` value of a 403 insufficient_scope at the endpoint ``request`` asked."""
        assert self.resources is not None  # only OAuth principals have scopes to lack
        return self.resources.insufficient_scope_at(request.path.decode("latin-1"), e.scopes, e.description)

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
    return address.host if isinstance(address, (IPv4Address, IPv6Address)) else "local"


def _issuer(token: str) -> Any:
    """The ``iss`` a JWT claims, unverified: which verifier is to check it."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None


def _unauthorized(failure: Failure) -> Failure:
    """A TokenError as the Unauthorized the Guard answers (401; 503 when no authorization server could be asked)."""
    if failure.check(TokenError):
        e = failure.value
        assert isinstance(e, TokenError)
        return Failure(Unauthorized(e.description, e.error, e.status))
    return failure
