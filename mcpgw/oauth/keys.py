"""An authorization server's metadata (RFC 8414, OpenID Connect Discovery) and signing keys (its JWKS).

The keys are fetched when first needed and kept ``cacheSeconds``. A token signed with a ``kid`` the cache
does not have refreshes them, but at most once every ``minRefreshSeconds`` (so tokens with made-up kids
cannot make the gateway hammer the authorization server). Keys past their lifetime keep serving while a
refresh runs, and after it failed: an authorization server that is down does not stop tokens it signed
with a known key. Every fetch has a timeout; nothing here waits for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import jwt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw import logs
from mcpgw.oauth.http import HttpClient, HttpError, fetch_json

T = TypeVar("T")
#: Key types an authorization server may sign access tokens with; a symmetric ("oct") key published in a
#: JWKS would let anyone who reads it sign tokens, so it is never used.
_ASYMMETRIC = frozenset({"RSA", "EC", "OKP"})


class KeysUnavailable(Exception):
    """The authorization server's metadata or keys cannot be had now (unreachable, refused, malformed)."""


class UnknownKey(Exception):
    """The keys were fetched (recently) and none has the token's ``kid``."""


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order the MCP authorization spec ("Authorization Server
    Metadata Discovery") tries them: RFC 8414 section 3.1 inserts the well-known segment between host and
    path; OpenID Connect Discovery inserts it (RFC 8414 section 5), then appends it."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(p: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, p, "", ""))

    if not path:
        return [at("/.well-known/oauth-authorization-server"), at("/.well-known/openid-configuration")]
    return [at("/.well-known/oauth-authorization-server" + path), at("/.well-known/openid-configuration" + path),
            at(path + "/.well-known/openid-configuration")]


def parse_jwks(doc: Any, source: str) -> dict[str | None, jwt.PyJWK]:
    """The signing keys of a JWKS document by ``kid``: asymmetric, ``use`` sig (or unset), an algorithm
    that is not ``none``. Keys this PyJWT cannot use are skipped (an AS may publish newer kinds)."""
    keys: dict[str | None, jwt.PyJWK] = {}
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeysUnavailable(f"{source} is not a JWKS (no keys list)")
    for data in entries:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig" or data.get("kty") not in _ASYMMETRIC:
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if key.algorithm_name == "none" or key.algorithm_name.startswith("HS"):
            continue
        keys[data.get("kid")] = key
    return keys


class AuthorizationServer:
    """One issuer: its metadata and its key cache, on the injected ``clock``."""

    log = Logger(observer=logs.observer)

    def __init__(self, issuer: str, http: HttpClient, clock: IReactorTime, *, cache_seconds: float = 3600.0,
                 min_refresh_seconds: float = 30.0, timeout: float = 10.0):
        self.issuer = issuer
        self._http = http
        self._clock = clock
        self._lifetime = cache_seconds
        self._min_refresh = min_refresh_seconds
        self._timeout = timeout
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = float("-inf")
        self._discover_at = float("-inf")
        self._discover_error = "not fetched yet"
        self._discovery: Shared[dict[str, Any]] = Shared(self._discover)
        self._keys: dict[str | None, jwt.PyJWK] | None = None
        self._keys_at = float("-inf")
        #: When the last refresh started (success or not): the rate limit counts from here.
        self._attempt_at = float("-inf")
        self._last_error: str | None = None
        self._refresh: Shared[None] = Shared(self._fetch)

    # -- the questions -----------------------------------------------------------

    def metadata(self) -> Deferred[dict[str, Any]]:
        """The server's metadata document; KeysUnavailable if it cannot be had. Fetched again after
        ``cache_seconds``, tried again at most every ``min_refresh_seconds``."""
        now = self._now()
        known = self._metadata
        recent = now - self._discover_at < self._min_refresh
        if known is not None and (now - self._metadata_at < self._lifetime or recent):
            return succeed(known)
        if known is None and recent and not self._discovery.running:
            return fail(KeysUnavailable(f"no metadata from {self.issuer} ({self._discover_error})"))
        d = self._discovery()
        if known is not None:
            d.addErrback(lambda f: self._stale("metadata", f, known))
        return d

    def key(self, kid: str | None) -> Deferred[jwt.PyJWK]:
        """The signing key ``kid`` names (None: the only key). KeysUnavailable when the keys cannot be
        fetched and the cache has no such key; UnknownKey when fetched keys do not have it."""
        now = self._now()
        found = self._lookup(kid)
        if found is not None:
            if now - self._keys_at >= self._lifetime and self._may_refresh(now):
                self._refresh().addErrback(lambda f: None)  # served from the cache meanwhile; a failure is logged in _refreshed
            return succeed(found)
        if not self._may_refresh(now):
            return fail(self._missing(kid))
        d = self._refresh()
        d.addErrback(lambda f: None)  # the outcome is the cache after it: a key, or _missing says why not
        return d.addCallback(lambda _: self._found(kid))

    # -- the cache ---------------------------------------------------------------

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if self._keys is None:
            return None
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _found(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is None:
            raise self._missing(kid)
        return key

    def _missing(self, kid: str | None) -> Exception:
        if self._last_error is not None:
            return KeysUnavailable(f"the keys of {self.issuer} cannot be fetched ({self._last_error})")
        if kid is None:
            return UnknownKey(f"the token names no kid and {self.issuer} has {len(self._keys or {})} keys")
        return UnknownKey(f"{self.issuer} has no key {kid!r}")

    def _may_refresh(self, now: float) -> bool:
        return self._refresh.running or now - self._attempt_at >= self._min_refresh

    def _fetch(self) -> Deferred[None]:
        """Fetch the metadata (when stale) and the keys."""
        self._attempt_at = self._now()
        d = self.metadata()
        d.addCallback(self._fetch_keys)
        return d.addBoth(self._refreshed)

    def _fetch_keys(self, metadata: dict[str, Any]) -> Deferred[None]:
        uri = metadata.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise KeysUnavailable(f"the metadata of {self.issuer} names no jwks_uri")
        d = fetch_json(self._http, self._clock, self._timeout, uri)

        def parsed(doc: Any) -> None:
            self._keys = parse_jwks(doc, uri)
            self._keys_at = self._now()

        return d.addCallback(parsed)

    def _refreshed(self, result: Any) -> Any:
        if isinstance(result, Failure):
            self._last_error = result.getErrorMessage() if result.check(HttpError, KeysUnavailable) else repr(result.value)
            self.log.warn("oauth: cannot refresh the keys of {issuer}: {error}", issuer=self.issuer, error=self._last_error)
            return Failure(KeysUnavailable(self._last_error))
        self._last_error = None
        return None

    # -- the metadata ------------------------------------------------------------

    def _discover(self) -> Deferred[dict[str, Any]]:
        self._discover_at = self._now()
        urls = metadata_urls(self.issuer)
        errors: list[str] = []

        def attempt(i: int) -> Deferred[dict[str, Any]]:
            d = fetch_json(self._http, self._clock, self._timeout, urls[i])
            d.addCallback(self._check_metadata, urls[i])
            return d.addErrback(next_url, i)

        def next_url(failure: Failure, i: int) -> Deferred[dict[str, Any]]:
            failure.trap(HttpError, KeysUnavailable)
            errors.append(failure.getErrorMessage())
            if i + 1 < len(urls):
                return attempt(i + 1)
            self._discover_error = "; ".join(errors)
            raise KeysUnavailable(f"no metadata from {self.issuer}: {self._discover_error}")

        return attempt(0)

    def _check_metadata(self, doc: dict[str, Any], url: str) -> dict[str, Any]:
        # RFC 8414 section 3.3: the issuer in the metadata is the one its URL was made from, or the
        # metadata is not used (else a server could speak for another issuer).
        if doc.get("issuer") != self.issuer:
            raise KeysUnavailable(f"{url} names issuer {str(doc.get('issuer'))[:100]!r}, not {self.issuer!r}")
        self._metadata = doc
        self._metadata_at = self._now()
        return doc

    def _stale(self, what: str, failure: Failure, known: dict[str, Any]) -> dict[str, Any]:
        failure.trap(HttpError, KeysUnavailable)
        self.log.warn("oauth: {issuer}: {what} refresh failed, the known one kept: {error}", issuer=self.issuer,
                      what=what, error=failure.getErrorMessage())
        return known

    def _now(self) -> float:
        return self._clock.seconds()


class Shared(Generic[T]):
    """Runs one operation at a time: a caller while it runs waits for the same outcome (one fetch for
    the hundred requests that all found the cache empty)."""

    def __init__(self, run: Callable[[], Deferred[T]]):
        self._run = run
        self._waiting: list[Deferred[T]] | None = None

    @property
    def running(self) -> bool:
        return self._waiting is not None

    def __call__(self) -> Deferred[T]:
        mine: Deferred[T] = Deferred()
        if self._waiting is not None:
            self._waiting.append(mine)
            return mine
        self._waiting = [mine]
        self._run().addBoth(self._done)
        return mine

    def _done(self, result: T | Failure) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
