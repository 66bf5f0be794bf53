"""Access tokens from the configured authorization servers: who they are for, what they allow, until when.

A JWT access token (RFC 9068) is verified with PyJWT against its issuer's published keys: the key's own
algorithm only (never ``none``, never a symmetric one), ``iss`` one of ``authorizationServers`` (checked
before anything is fetched), ``aud`` one of the audiences the caller accepts (RFC 8707: a token for
another resource is refused, so no token is ever passed through), ``exp`` / ``nbf`` against the injected
clock. Any other token is opaque and, when ``introspection`` is configured, shown to one authorization
server's RFC 7662 endpoint with the gateway's client credentials; an active answer is kept until the
token's ``exp`` (at most ``cacheSeconds``) in a bounded LRU, keyed by the token's SHA-256 (the token
itself is not kept).

Refusals are TokenError with RFC 6750's error code and the HTTP status to answer.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

import attrs
import jwt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw import logs
from mcpgw.config.oauth import OAuthConfig, canonical_uri
from mcpgw.oauth.http import HttpClient, HttpError, basic_auth, fetch_json
from mcpgw.oauth.keys import AuthorizationServer, KeysUnavailable, Shared, UnknownKey

#: RFC 9068 section 4: the ``typ`` of a JWT access token (compared case-insensitively, RFC 7515 4.1.9).
AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class TokenError(Exception):
    """A token that is not accepted: ``error`` is RFC 6750's code (None: not the token's fault), ``status``
    the HTTP status (401; 503 when the authorization server cannot be asked)."""

    def __init__(self, description: str, error: str | None = "invalid_token", status: int = 401):
        super().__init__(description)
        self.description = description
        self.error = error
        self.status = status


def _unavailable(description: str) -> TokenError:
    return TokenError(description, None, 503)


@attrs.frozen
class AccessToken:
    """What an accepted token says."""

    subject: str
    issuer: str
    scopes: frozenset[str]
    #: Its ``exp`` (epoch seconds; None: the introspection answer named none).
    expires: float | None
    audiences: tuple[str, ...]
    client_id: str | None = None

    @property
    def identity(self) -> str:
        """The Principal's identity: subject qualified by its issuer (two servers' subjects never meet)."""
        return f"oauth:{self.issuer}#{self.subject}"


class TokenVerifier:
    """Checks bearer tokens against ``config``; ``verify`` answers a Deferred."""

    log = Logger(observer=logs.observer)

    def __init__(self, config: OAuthConfig, http: HttpClient, clock: IReactorTime,
                 servers: Mapping[str, AuthorizationServer] | None = None):
        self._config = config
        self._http = http
        self._clock = clock
        self.servers = dict(servers) if servers is not None else {
            issuer: AuthorizationServer(issuer, http, clock, cache_seconds=config.jwksCacheSeconds,
                                        min_refresh_seconds=config.jwksMinRefreshSeconds, timeout=config.httpTimeout)
            for issuer in config.authorizationServers
        }
        introspection = config.introspection
        self._introspected: OrderedDict[bytes, tuple[AccessToken, float]] = OrderedDict()
        self._pending: dict[bytes, Shared[AccessToken]] = {}
        self._cache_size = introspection.cacheSize if introspection is not None else 0

    def verify(self, token: str, audiences: Collection[str]) -> Deferred[AccessToken]:
        """The AccessToken of ``token`` if it is good here and names one of ``audiences``; else TokenError."""
        accepted = frozenset(canonical_uri(a) for a in audiences)
        try:
            if _JWS.fullmatch(token):
                return self._jwt(token, accepted)
            return self._opaque(token, accepted)
        except TokenError as e:
            return fail(e)

    # -- JWT (RFC 9068) ------------------------------------------------------------

    def _jwt(self, token: str, audiences: frozenset[str]) -> Deferred[AccessToken]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("malformed JWT") from None
        alg, typ, kid = header.get("alg"), header.get("typ"), header.get("kid")
        if not isinstance(alg, str) or alg.lower() == "none" or alg.startswith("HS"):
            raise TokenError("the JWT's algorithm is not accepted")
        if self._config.requireAtJwt:
            if not isinstance(typ, str) or typ.lower() not in AT_JWT:
                raise TokenError("not a JWT access token (typ must be at+jwt, RFC 9068)")
        elif typ is not None and (not isinstance(typ, str) or typ.lower() not in AT_JWT | {"jwt"}):
            raise TokenError("not a JWT access token")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed JWT kid")
        issuer = unverified.get("iss")
        server = self.servers.get(issuer) if isinstance(issuer, str) else None
        if server is None:
            raise TokenError("the JWT's issuer is not accepted")  # before anything is fetched for it
        d = server.key(kid)
        d.addErrback(self._key_failed)
        return d.addCallback(lambda key: self._check_jwt(token, key, server.issuer, audiences))

    @staticmethod
    def _key_failed(failure: Failure) -> Any:
        if failure.check(UnknownKey):
            raise TokenError(f"the JWT is signed with an unknown key: {failure.getErrorMessage()}")
        if failure.check(KeysUnavailable):
            raise _unavailable(f"the authorization server's keys cannot be had: {failure.getErrorMessage()}")
        return failure

    def _check_jwt(self, token: str, key: jwt.PyJWK, issuer: str, audiences: frozenset[str]) -> AccessToken:
        try:
            claims = jwt.decode(
                token, key, algorithms=[key.algorithm_name], issuer=issuer,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_aud": False, "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidIssuerError:
            raise TokenError("the JWT's issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"the JWT lacks the {e.claim} claim") from None
        except jwt.PyJWTError:
            raise TokenError("the JWT's signature or algorithm is not valid") from None
        now = self._clock.seconds()
        leeway = self._config.leeway
        exp, nbf = claims["exp"], claims.get("nbf")
        if not _number(exp) or now >= exp + leeway:
            raise TokenError("the token has expired")
        if nbf is not None and (not _number(nbf) or now + leeway < nbf):
            raise TokenError("the token is not valid yet")
        aud = _audiences(claims["aud"], audiences)
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise TokenError("the JWT's sub must be a non-empty string")
        client_id = claims.get("client_id")
        return AccessToken(sub, issuer, _scopes(claims.get("scope")), float(exp), aud,
                           client_id if isinstance(client_id, str) else None)

    # -- opaque (RFC 7662) ---------------------------------------------------------

    def _opaque(self, token: str, audiences: frozenset[str]) -> Deferred[AccessToken]:
        if self._config.introspection is None:
            raise TokenError("invalid bearer token")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = self._clock.seconds()
        cached = self._introspected.get(digest)
        if cached is not None:
            accepted, until = cached
            if now < until:
                self._introspected.move_to_end(digest)
                return succeed(self._still_good(accepted, audiences))
            del self._introspected[digest]
        pending = self._pending.get(digest)
        if pending is None:
            pending = self._pending[digest] = Shared(lambda: self._introspect(token, digest))
        return pending().addCallback(self._still_good, audiences)

    def _still_good(self, accepted: AccessToken, audiences: frozenset[str]) -> AccessToken:
        """A cached answer, checked again for this request's audiences and clock."""
        if accepted.expires is not None and self._clock.seconds() >= accepted.expires + self._config.leeway:
            raise TokenError("the token has expired")
        _audiences(list(accepted.audiences), audiences)
        return accepted

    def _introspect(self, token: str, digest: bytes) -> Deferred[AccessToken]:
        config = self._config.introspection
        assert config is not None
        server = self.servers[config.authorizationServer]
        if config.endpoint is not None:
            d: Deferred[Any] = succeed(config.endpoint)
        else:
            d = server.metadata().addCallback(_endpoint)
        headers = {"Authorization": basic_auth(config.clientId, config.clientSecret)}
        d.addCallback(lambda url: fetch_json(self._http, self._clock, self._config.httpTimeout, url,
                                             {"token": token, "token_type_hint": "access_token"}, headers))
        d.addErrback(self._introspection_failed)
        d.addCallback(self._introspected_answer, server.issuer, digest)
        return d.addBoth(self._settled, digest)

    def _settled(self, result: Any, digest: bytes) -> Any:
        self._pending.pop(digest, None)
        return result

    def _introspection_failed(self, failure: Failure) -> Any:
        failure.trap(HttpError, KeysUnavailable)
        self.log.warn("oauth: introspection failed: {error}", error=failure.getErrorMessage())
        raise _unavailable("the authorization server cannot introspect the token now")

    def _introspected_answer(self, answer: dict[str, Any], issuer: str, digest: bytes) -> AccessToken:
        config = self._config.introspection
        assert config is not None
        if answer.get("active") is not True:
            raise TokenError("the token is not active")
        if "iss" in answer and answer["iss"] != issuer:
            raise TokenError("the token's issuer is not accepted")
        if "aud" not in answer:
            raise TokenError("the token names no audience")  # RFC 8707: it could be for any resource
        aud = answer["aud"]
        if not (isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))):
            raise TokenError("the token's audience is malformed")
        exp = answer.get("exp")
        if exp is not None and not _number(exp):
            raise TokenError("the token's exp is malformed")
        sub, client_id = answer.get("sub"), answer.get("client_id")
        subject = sub if isinstance(sub, str) and sub else client_id if isinstance(client_id, str) and client_id else None
        if subject is None:
            raise TokenError("the token names neither sub nor client_id")
        accepted = AccessToken(subject, issuer, _scopes(answer.get("scope")), None if exp is None else float(exp),
                               tuple(aud) if isinstance(aud, list) else (aud,),
                               client_id if isinstance(client_id, str) else None)
        now = self._clock.seconds()
        until = now + config.cacheSeconds
        if accepted.expires is not None:
            until = min(until, accepted.expires + self._config.leeway)
        if until > now:
            self._introspected[digest] = (accepted, until)
            while len(self._introspected) > self._cache_size:
                self._introspected.popitem(last=False)
        return accepted


def _endpoint(metadata: dict[str, Any]) -> str:
    url = metadata.get("introspection_endpoint")
    if not isinstance(url, str) or not url:
        raise KeysUnavailable("the authorization server's metadata names no introspection_endpoint")
    return url


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _audiences(aud: Any, accepted: frozenset[str]) -> tuple[str, ...]:
    """The token's audiences if one of them is accepted here (RFC 8707 section 2, RFC 7519 4.1.3)."""
    names = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
    if not names or not all(isinstance(a, str) for a in names):
        raise TokenError("the token's audience is malformed")
    if not any(canonical_uri(a) in accepted for a in names):
        raise TokenError("the token is not for this resource (audience)")
    return tuple(names)


def _scopes(value: Any) -> frozenset[str]:
    """RFC 9068 section 2.2.3 / RFC 7662: ``scope`` is space-separated; a list of strings is taken too."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(s for s in value if isinstance(s, str) and s)
    return frozenset()
