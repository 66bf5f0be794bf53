"""Issue 18 groundwork, unit tests of mcpgw.oauth (no process, no network: a task.Clock and a fake HTTP
client standing in for the authorization server).

Spec sections named in the tests: the MCP authorization spec (2025-06-18 / 2025-11-25,
basic/authorization), RFC 9728 (Protected Resource Metadata), RFC 8707 (Resource Indicators),
RFC 8414 (AS metadata), RFC 9068 (JWT access tokens), RFC 7662 (introspection), RFC 6750 (Bearer).
"""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any
from urllib.parse import unquote

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import UnsupportedMethod
from twisted.web.test.requesthelper import DummyRequest

from mcpgw.config import ConfigError
from mcpgw.config.oauth import CLIENT_SECRET_ENV, OAuthConfig, canonical_uri, check_servers, parse_oauth
from mcpgw.oauth import policy
from mcpgw.oauth.http import HttpError, HttpResponse, _BodyReader, basic_auth
from mcpgw.oauth.keys import AuthorizationServer, KeysUnavailable, UnknownKey, metadata_urls, parse_jwks
from mcpgw.oauth.metadata import MetadataResource, ProtectedResources, bearer_challenge, metadata_url, well_known
from mcpgw.oauth.tokens import AccessToken, TokenError, TokenVerifier

NOW = 1_800_000_000.0
ISSUER = "https://as.example"
OTHER_ISSUER = "https://other-as.example"
GW = "https://gw.example.com"
FILES = GW + "/servers/files/mcp"
NOTES = GW + "/servers/notes/mcp"
AS_METADATA = ISSUER + "/.well-known/oauth-authorization-server"
OIDC_METADATA = ISSUER + "/.well-known/openid-configuration"
JWKS = ISSUER + "/jwks"
INTROSPECT = ISSUER + "/introspect"

KEY1 = ec.generate_private_key(ec.SECP256R1())
KEY2 = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private: Any, kid: str, alg: str = "ES256") -> dict[str, Any]:
    algorithm = pyjwt.algorithms.get_default_algorithms()[alg]
    data = json.loads(algorithm.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def token(private: Any = KEY1, kid: str | None = "k1", alg: str = "ES256", typ: str | None = "at+jwt",
          **claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": FILES, "sub": "alice", "exp": NOW + 300, "iat": NOW, "scope": "files:read",
               "client_id": "app"}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers: dict[str, Any] = {}
    if kid is not None:
        headers["kid"] = kid
    if typ is not None:
        headers["typ"] = typ
    return pyjwt.encode(payload, private, algorithm=alg, headers=headers)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def unsigned(**claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": FILES, "sub": "alice", "exp": NOW + 300, **claims}
    return _b64({"alg": "none", "typ": "at+jwt", "kid": "k1"}) + "." + _b64(payload) + "."


class FakeHttp:
    """The authorization server: ``routes`` maps a URL to a dict (200 JSON), an HttpResponse, an
    exception, or a callable of the call answering one of those or a Deferred."""

    def __init__(self, routes: dict[str, Any] | None = None):
        self.routes: dict[str, Any] = dict(routes or {})
        self.calls: list[tuple[Any, ...]] = []

    def get(self, url: str) -> Deferred[HttpResponse]:
        self.calls.append(("GET", url))
        return self._answer(url, ("GET", url))

    def post_form(self, url: str, form: Any, headers: Any) -> Deferred[HttpResponse]:
        call = ("POST", url, dict(form), dict(headers))
        self.calls.append(call)
        return self._answer(url, call)

    def _answer(self, url: str, call: tuple[Any, ...]) -> Deferred[HttpResponse]:
        answer = self.routes.get(url, HttpResponse(404, b"{}"))
        if callable(answer):
            answer = answer(call)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, dict):
            answer = HttpResponse(200, json.dumps(answer).encode())
        return succeed(answer)

    def count(self, url: str) -> int:
        return sum(1 for c in self.calls if c[1] == url)


def as_routes(*keys: dict[str, Any]) -> dict[str, Any]:
    return {
        AS_METADATA: {"issuer": ISSUER, "jwks_uri": JWKS, "introspection_endpoint": INTROSPECT},
        JWKS: {"keys": list(keys) or [jwk(KEY1, "k1")]},
    }


def config(**overrides: Any) -> OAuthConfig:
    raw: dict[str, Any] = {"resource": GW, "authorizationServers": [ISSUER]}
    raw.update(overrides)
    return parse_oauth(raw)


def new_clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


# -- configuration ---------------------------------------------------------------------------------


def test_config_canonical_resource_and_audience_default():
    """MCP spec "Canonical Server URI": lowercase scheme and host, no trailing slash; audience defaults to it."""
    c = parse_oauth({"resource": "HTTPS://GW.Example.com/", "authorizationServers": [ISSUER]})
    assert c.resource == GW
    assert c.audience is None and c.gateway_audience == GW
    assert c.jwksCacheSeconds == 3600 and c.jwksMinRefreshSeconds == 30 and c.requireAtJwt is True
    assert canonical_uri("HTTPS://GW.example.COM/servers/A/mcp/") == "https://gw.example.com/servers/A/mcp"
    assert canonical_uri("api://mcpgw") == "api://mcpgw"


def test_config_full():
    c = parse_oauth({
        "resource": GW, "authorizationServers": [ISSUER, OTHER_ISSUER], "scopesSupported": ["mcp"],
        "audience": "api://mcpgw", "jwksCacheSeconds": 600, "jwksMinRefreshSeconds": 5, "httpTimeout": 2,
        "leeway": 1.5, "requireAtJwt": False,
        "introspection": {"clientId": "gw", "clientSecret": "s3cret", "authorizationServer": OTHER_ISSUER,
                          "cacheSeconds": 10, "cacheSize": 50},
        "scopes": {"files": ["files:read", "files:write"]},
        "toolScopes": {"files": {"write_file": ["files:write"]}},
    })
    assert c.authorizationServers == (ISSUER, OTHER_ISSUER)
    assert c.gateway_audience == "api://mcpgw"
    assert c.introspection is not None and c.introspection.authorizationServer == OTHER_ISSUER
    assert c.introspection.cacheSize == 50 and "s3cret" not in repr(c)
    assert c.scopes == {"files": ("files:read", "files:write")}
    assert c.toolScopes == {"files": {"write_file": ("files:write",)}}


@pytest.mark.parametrize(("raw", "key"), [
    ({"authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": GW}, "auth.oauth.authorizationServers"),
    ({"resource": GW, "authorizationServers": []}, "auth.oauth.authorizationServers"),
    ({"resource": "http://gw.example.com", "authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": "gw.example.com", "authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": GW + "#frag", "authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": GW + "?a=1", "authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": 'https://gw"x', "authorizationServers": [ISSUER]}, "auth.oauth.resource"),
    ({"resource": GW, "authorizationServers": ["http://as.example"]}, "auth.oauth.authorizationServers[0]"),
    ({"resource": GW, "authorizationServers": [ISSUER, ISSUER]}, "auth.oauth.authorizationServers"),
    ({"resource": GW, "authorizationServers": [ISSUER], "scopesSupported": ['a"b']}, "auth.oauth.scopesSupported[0]"),
    ({"resource": GW, "authorizationServers": [ISSUER], "scopesSupported": ["a b"]}, "auth.oauth.scopesSupported[0]"),
    ({"resource": GW, "authorizationServers": [ISSUER], "jwksCacheSeconds": 0}, "auth.oauth.jwksCacheSeconds"),
    ({"resource": GW, "authorizationServers": [ISSUER], "leeway": True}, "auth.oauth.leeway"),
    ({"resource": GW, "authorizationServers": [ISSUER], "nope": 1}, "auth.oauth.nope"),
    ({"resource": GW, "authorizationServers": [ISSUER], "scopes": {"files": []}}, "auth.oauth.scopes.files"),
    ({"resource": GW, "authorizationServers": [ISSUER], "toolScopes": {"files": ["x"]}}, "auth.oauth.toolScopes.files"),
    ({"resource": GW, "authorizationServers": [ISSUER], "introspection": {"clientId": "gw"}},
     "auth.oauth.introspection.clientSecret"),
    ({"resource": GW, "authorizationServers": [ISSUER],
      "introspection": {"clientId": "gw", "clientSecret": "s", "authorizationServer": OTHER_ISSUER}},
     "auth.oauth.introspection.authorizationServer"),
])
def test_config_refusals_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_oauth(raw)
    assert e.value.key == key


def test_config_loopback_http_allowed_and_secret_from_environment():
    """OAuth 2.1 section 1.5: https, except on a loopback host (the tests' authorization server)."""
    c = parse_oauth({"resource": "http://127.0.0.1:8080", "authorizationServers": ["http://localhost:9000"],
                     "introspection": {"clientId": "gw"}}, environ={CLIENT_SECRET_ENV: "from-env"})
    assert c.resource == "http://127.0.0.1:8080"
    assert c.introspection is not None and c.introspection.clientSecret == "from-env"


def test_config_scopes_must_name_configured_servers():
    c = config(scopes={"files": ["r"]}, toolScopes={"nope": {"t": ["w"]}})
    with pytest.raises(ConfigError) as e:
        check_servers(c, {"files"})
    assert e.value.key == "auth.oauth.toolScopes.nope"
    check_servers(config(scopes={"files": ["r"]}), {"files"})


# -- Protected Resource Metadata (RFC 9728) ---------------------------------------------------------


def resources(**overrides: Any) -> ProtectedResources:
    return ProtectedResources(config(**overrides), ["files", "notes"], default="files")


def test_rfc9728_s3_1_well_known_url_inserted_between_host_and_path():
    assert metadata_url(GW) == GW + "/.well-known/oauth-protected-resource"
    assert metadata_url(FILES) == GW + "/.well-known/oauth-protected-resource/servers/files/mcp"
    assert metadata_url("https://h.example:8443/gw/mcp") == "https://h.example:8443/.well-known/oauth-protected-resource/gw/mcp"
    r = resources()
    assert r.metadata_url("notes") == GW + "/.well-known/oauth-protected-resource/servers/notes/mcp"
    assert r.metadata_url("files", "mcp", root=True) == GW + "/.well-known/oauth-protected-resource/mcp"
    assert r.metadata_url(None) == GW + "/.well-known/oauth-protected-resource"


def test_rfc9728_s2_documents():
    r = resources(scopesSupported=["mcp"], scopes={"files": ["files:read"]},
                  toolScopes={"files": {"write_file": ["files:write"]}, "notes": {"x": ["notes:x"]}})
    assert r.document(FILES) == {
        "resource": FILES, "authorization_servers": [ISSUER], "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp", "files:read", "files:write"],
    }
    assert r.documents()["/servers/notes/mcp"]["scopes_supported"] == ["mcp", "notes:x"]
    assert r.documents()[""]["scopes_supported"] == ["mcp", "files:read", "files:write", "notes:x"]
    assert r.documents()["/mcp"]["resource"] == GW + "/mcp"  # the default server at the root
    assert r.document(GW + "/servers/other/mcp") is None
    assert "scopes_supported" not in resources().documents()["/servers/files/mcp"]  # RECOMMENDED, not made up


def test_rfc8707_audiences_are_per_server():
    """A token for server A is not good on server B; the gateway's own audience is good everywhere."""
    r = resources()
    files, notes = r.audiences("files"), r.audiences("notes")
    assert FILES in files and FILES not in notes
    assert NOTES in notes and NOTES not in files
    assert GW in files and GW in notes
    assert {GW + "/mcp", GW + "/sse", GW + "/servers/files/ws", GW + "/servers/files"} <= files  # every endpoint
    assert GW + "/mcp" not in notes
    assert resources(audience="api://mcpgw").audiences("notes") == frozenset(
        {"api://mcpgw", NOTES, GW + "/servers/notes", GW + "/servers/notes/sse", GW + "/servers/notes/messages",
         GW + "/servers/notes/ws"})


def test_mcp_spec_401_challenge_names_the_metadata_and_scope():
    """MCP spec "Protected Resource Metadata Discovery Requirements" + RFC 9728 section 5.1; RFC 6750 section 3:
    no error code when no token was sent."""
    r = resources(scopesSupported=["mcp"], scopes={"notes": ["notes:read", "notes:all"]})
    assert r.unauthorized("files") == \
        b'Bearer resource_metadata="https://gw.example.com/.well-known/oauth-protected-resource/servers/files/mcp", scope="mcp"'
    assert r.unauthorized("notes", "sse", error="invalid_token", description='bad "token"\n', realm="mcpgw") == (
        b'Bearer realm="mcpgw", resource_metadata="https://gw.example.com/.well-known/oauth-protected-resource/servers/notes/sse", '
        b'scope="notes:read notes:all", error="invalid_token", error_description="bad token"')
    assert resources().unauthorized("files", root=True) == \
        b'Bearer resource_metadata="https://gw.example.com/.well-known/oauth-protected-resource/mcp"'


def test_mcp_spec_403_insufficient_scope_challenge():
    """MCP spec "Runtime Insufficient Scope Errors": 403 with error, scope and resource_metadata."""
    value = resources().insufficient_scope("files", ["files:read", "files:write"], description="needs files:write")
    assert value == (b'Bearer resource_metadata="https://gw.example.com/.well-known/oauth-protected-resource/servers/files/mcp", '
                     b'scope="files:read files:write", error="insufficient_scope", error_description="needs files:write"')
    assert bearer_challenge("https://x/.well-known/oauth-protected-resource", scope=()) == \
        b'Bearer resource_metadata="https://x/.well-known/oauth-protected-resource"'


def render(resource: Any, path: list[bytes], method: bytes = b"GET") -> tuple[DummyRequest, bytes]:
    request = DummyRequest(path)
    request.method = method
    body = resource.render(request)
    return request, body


def test_rfc9728_s3_2_metadata_resource_serves_json():
    prm = MetadataResource(resources(scopesSupported=["mcp"]))
    request, body = render(prm, [b"servers", b"notes", b"mcp"])
    assert request.responseCode in (None, 200)
    assert json.loads(body)["resource"] == NOTES
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"public, max-age=300"]
    assert request.responseHeaders.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert json.loads(render(prm, [])[1])["resource"] == GW
    assert json.loads(render(prm, [b"mcp"])[1])["resource"] == GW + "/mcp"
    assert json.loads(render(prm, [b"servers", b"files", b"mcp", b""])[1])["resource"] == FILES  # trailing slash
    request, body = render(prm, [b"servers", b"ghost", b"mcp"])
    assert request.responseCode == 404
    request, body = render(prm, [b"mcp"], b"OPTIONS")
    assert request.responseCode == 204
    with pytest.raises(UnsupportedMethod):
        render(prm, [b"mcp"], b"POST")


def test_metadata_resource_behind_a_path_prefix():
    """A gateway published at https://h/gw: its documents are at /.well-known/oauth-protected-resource/gw/...,
    and a proxy that strips /gw finds them without it."""
    r = ProtectedResources(parse_oauth({"resource": "https://h.example/gw", "authorizationServers": [ISSUER]}), ["a"])
    assert r.metadata_url("a") == "https://h.example/.well-known/oauth-protected-resource/gw/servers/a/mcp"
    prm = MetadataResource(r)
    assert json.loads(render(prm, [b"gw", b"servers", b"a", b"mcp"])[1])["resource"] == "https://h.example/gw/servers/a/mcp"
    assert json.loads(render(prm, [b"servers", b"a", b"mcp"])[1])["resource"] == "https://h.example/gw/servers/a/mcp"
    assert json.loads(render(prm, [b"gw"])[1])["resource"] == "https://h.example/gw"
    assert isinstance(well_known(r).children[b"oauth-protected-resource"], MetadataResource)


# -- policy ---------------------------------------------------------------------------------------------


def test_scope_policy():
    c = config(scopesSupported=["mcp"], scopes={"files": ["files:read", "files:write"]},
               toolScopes={"files": {"write_file": ["files:write"]}})
    assert policy.may_open_session(c, "files", {"files:read"})
    assert not policy.may_open_session(c, "files", {"mcp"})
    assert policy.may_open_session(c, "notes", set())  # no scopes listed for it
    assert policy.may_call_tool(c, "files", "read_file", {"files:read"})
    assert not policy.may_call_tool(c, "files", "write_file", {"files:read"})
    assert policy.visible_tools(c, "files", ["read_file", "write_file"], {"files:read"}) == ["read_file"]
    assert policy.visible_tools(c, "files", ["read_file", "write_file"], {"files:write"}) == ["read_file", "write_file"]
    # MCP spec "Recommended approach": keep what the token has here, add what is needed; drop the unrelated.
    assert policy.step_up_scopes(c, "files", {"files:read", "mcp", "unrelated"}, ["files:write"]) == \
        ("files:read", "mcp", "files:write")


# -- authorization server metadata and keys -----------------------------------------------------------


def test_rfc8414_s3_1_metadata_urls():
    """MCP spec "Authorization Server Metadata Discovery": the order of the well-known URLs."""
    assert metadata_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server", "https://as.example/.well-known/openid-configuration"]
    assert metadata_urls("https://as.example/tenant1/") == [
        "https://as.example/.well-known/oauth-authorization-server/tenant1",
        "https://as.example/.well-known/openid-configuration/tenant1",
        "https://as.example/tenant1/.well-known/openid-configuration"]


def test_parse_jwks_keeps_only_asymmetric_signing_keys():
    doc = {"keys": [jwk(KEY1, "k1"), {"kty": "oct", "k": "c2VjcmV0", "kid": "sym", "alg": "HS256"},
                    {**jwk(KEY2, "enc"), "use": "enc"}, {"kty": "RSA", "kid": "broken"}, "junk",
                    jwk(RSA_KEY, "r1", "RS256")]}
    keys = parse_jwks(doc, JWKS)
    assert set(keys) == {"k1", "r1"}
    assert keys["r1"].algorithm_name == "RS256"
    with pytest.raises(KeysUnavailable):
        parse_jwks({"nokeys": []}, JWKS)


class KeysTests(SynchronousTestCase):
    def server(self, http: FakeHttp, clock: Clock, **kwargs: Any) -> AuthorizationServer:
        return AuthorizationServer(ISSUER, http, clock, cache_seconds=kwargs.get("cache", 3600),
                                   min_refresh_seconds=kwargs.get("min_refresh", 30), timeout=5)

    def test_openid_discovery_is_the_fallback(self):
        http = FakeHttp({OIDC_METADATA: {"issuer": ISSUER, "jwks_uri": JWKS}, JWKS: {"keys": [jwk(KEY1, "k1")]}})
        server = self.server(http, new_clock())
        assert self.successResultOf(server.key("k1")).algorithm_name == "ES256"
        assert [c[1] for c in http.calls] == [AS_METADATA, OIDC_METADATA, JWKS]

    def test_rfc8414_s3_3_metadata_of_another_issuer_is_refused(self):
        http = FakeHttp({AS_METADATA: {"issuer": OTHER_ISSUER, "jwks_uri": JWKS}, JWKS: {"keys": [jwk(KEY1, "k1")]}})
        failure = self.failureResultOf(self.server(http, new_clock()).key("k1"), KeysUnavailable)
        assert "issuer" in failure.getErrorMessage()
        assert http.count(JWKS) == 0

    def test_keys_are_cached_for_their_lifetime_then_refreshed_while_serving(self):
        http = FakeHttp(as_routes())
        clock = new_clock()
        server = self.server(http, clock, cache=100)
        self.successResultOf(server.key("k1"))
        self.successResultOf(server.key("k1"))
        assert http.count(JWKS) == 1 and http.count(AS_METADATA) == 1
        clock.advance(101)
        self.successResultOf(server.key("k1"))  # answered from the cache; a refresh runs beside it
        assert http.count(JWKS) == 2

    def test_unknown_kid_refreshes_at_most_once_per_interval(self):
        http = FakeHttp(as_routes())
        clock = new_clock()
        server = self.server(http, clock, min_refresh=30)
        self.successResultOf(server.key("k1"))
        clock.advance(31)
        self.failureResultOf(server.key("new"), UnknownKey)
        assert http.count(JWKS) == 2  # one refresh for the unknown kid
        self.failureResultOf(server.key("other"), UnknownKey)
        self.failureResultOf(server.key("new"), UnknownKey)
        assert http.count(JWKS) == 2  # rate limited: no fetch
        http.routes[JWKS] = {"keys": [jwk(KEY1, "k1"), jwk(KEY2, "new")]}  # the AS rotates
        clock.advance(30)
        assert self.successResultOf(server.key("new"))
        assert http.count(JWKS) == 3

    def test_concurrent_requests_share_one_fetch(self):
        pending: Deferred[HttpResponse] = Deferred()
        http = FakeHttp({**as_routes(), JWKS: lambda call: pending})
        server = self.server(http, new_clock())
        first, second = server.key("k1"), server.key("k1")
        self.assertNoResult(first)
        pending.callback(HttpResponse(200, json.dumps({"keys": [jwk(KEY1, "k1")]}).encode()))
        assert self.successResultOf(first) is self.successResultOf(second)
        assert http.count(JWKS) == 1

    def test_authorization_server_down_known_keys_keep_serving_new_kid_unavailable(self):
        """Issue 18 (4): the AS stopped: cached keys still verify; a new kid is refused, never a hang."""
        http = FakeHttp(as_routes())
        clock = new_clock()
        server = self.server(http, clock, cache=60)
        self.successResultOf(server.key("k1"))
        http.routes.clear()
        http.routes[JWKS] = HttpError("connection refused")
        http.routes[AS_METADATA] = HttpError("connection refused")
        clock.advance(61)
        self.successResultOf(server.key("k1"))
        self.failureResultOf(server.key("new"), KeysUnavailable)  # the refresh just failed: rate limited
        clock.advance(31)
        self.failureResultOf(server.key("new"), KeysUnavailable)
        self.successResultOf(server.key("k1"))

    def test_fetch_has_a_timeout(self):
        cancelled: list[bool] = []
        http = FakeHttp({**as_routes(), JWKS: lambda call: Deferred(lambda d: cancelled.append(True))})
        clock = new_clock()
        d = self.server(http, clock).key("k1")
        self.assertNoResult(d)
        clock.advance(5)
        failure = self.failureResultOf(d, KeysUnavailable)
        assert "within 5 s" in failure.getErrorMessage()
        assert cancelled == [True]

    def test_metadata_failures_are_rate_limited_too(self):
        http = FakeHttp({AS_METADATA: HttpError("down"), OIDC_METADATA: HttpError("down")})
        clock = new_clock()
        server = self.server(http, clock)
        self.failureResultOf(server.metadata(), KeysUnavailable)
        self.failureResultOf(server.metadata(), KeysUnavailable)
        self.failureResultOf(server.key("k1"), KeysUnavailable)
        assert http.count(AS_METADATA) == 1
        clock.advance(30)
        http.routes.update(as_routes())
        assert self.successResultOf(server.key("k1"))


# -- tokens ------------------------------------------------------------------------------------------


class JwtTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.http = FakeHttp(as_routes(jwk(KEY1, "k1"), jwk(RSA_KEY, "r1", "RS256")))
        self.clock = new_clock()
        self.resources = resources()
        self.verifier = TokenVerifier(config(), self.http, self.clock)

    def verify(self, value: str, server: str | None = "files") -> Deferred[AccessToken]:
        return self.verifier.verify(value, self.resources.audiences(server))

    def refused(self, value: str, server: str | None = "files") -> TokenError:
        error = self.failureResultOf(self.verify(value, server), TokenError).value
        assert isinstance(error, TokenError)
        assert error.error == "invalid_token" and error.status == 401
        return error

    def test_rfc9068_token_accepted(self):
        accepted = self.successResultOf(self.verify(token(scope="files:read files:write")))
        assert accepted.subject == "alice" and accepted.issuer == ISSUER
        assert accepted.scopes == {"files:read", "files:write"}
        assert accepted.expires == NOW + 300 and accepted.audiences == (FILES,) and accepted.client_id == "app"
        assert accepted.identity == f"oauth:{ISSUER}#alice"
        assert self.successResultOf(self.verify(token(RSA_KEY, "r1", "RS256", scope=None))).scopes == frozenset()

    def test_rfc8707_audience_of_another_resource_is_refused(self):
        assert "audience" in self.refused(token(aud="https://elsewhere.example/mcp")).description
        self.refused(token(aud=[NOTES]))  # a token for server notes, used on files
        self.successResultOf(self.verify(token(aud=[NOTES]), "notes"))
        self.successResultOf(self.verify(token(aud=["https://x.example", GW])))  # the gateway's audience
        self.successResultOf(self.verify(token(aud="HTTPS://GW.EXAMPLE.COM/servers/files/mcp/")))  # canonical form
        self.refused(token(aud=None))
        self.refused(token(aud=[]))

    def test_unknown_issuer_is_refused_before_any_fetch(self):
        self.refused(token(iss=OTHER_ISSUER))
        self.refused(token(iss=None))
        assert self.http.calls == []

    def test_expired_and_not_yet_valid(self):
        self.refused(token(exp=NOW))
        self.refused(token(exp=None))
        self.refused(token(exp="soon"))
        self.refused(token(nbf=NOW + 10))
        self.successResultOf(self.verify(token(nbf=NOW)))
        value = token(exp=NOW + 10)
        self.successResultOf(self.verify(value))
        self.clock.advance(10)
        assert "expired" in self.refused(value).description
        lenient = TokenVerifier(config(leeway=5), self.http, self.clock)
        self.successResultOf(lenient.verify(value, {FILES}))

    def test_alg_none_and_algorithm_confusion_are_refused(self):
        self.refused(unsigned())
        # HS256 keyed with the RSA public key's PEM (the classic confusion): never an HMAC key here.
        pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = (_b64({"alg": "HS256", "typ": "at+jwt", "kid": "r1"}) + "." +
                         _b64({"iss": ISSUER, "aud": FILES, "sub": "eve", "exp": NOW + 300}))
        signature = base64.urlsafe_b64encode(hmac.digest(pem, signing_input.encode(), "sha256")).rstrip(b"=").decode()
        self.refused(signing_input + "." + signature)
        # The header's alg is not the key's: an ES256 key never verifies an RS256 token and vice versa.
        self.refused(token(RSA_KEY, "k1", "RS256"))

    def test_bad_signature_and_missing_claims(self):
        self.refused(token(KEY2, "k1"))  # signed with another key under a known kid
        self.refused(token(sub=None))
        self.refused(token(sub=""))
        self.refused("a.b.c")

    def test_rfc9068_s4_typ_must_be_at_jwt(self):
        self.refused(token(typ="JWT"))
        self.refused(token(typ=None))
        self.successResultOf(self.verify(token(typ="application/at+jwt")))
        lax = TokenVerifier(config(requireAtJwt=False), self.http, self.clock)
        self.successResultOf(lax.verify(token(typ="JWT"), {FILES}))
        self.successResultOf(lax.verify(token(typ=None), {FILES}))
        self.failureResultOf(lax.verify(token(typ="dpop+jwt"), {FILES}), TokenError)

    def test_unknown_kid_one_refresh_then_rate_limited(self):
        """Issue 18 (3): an unknown kid is refused after one JWKS refresh, and refreshes are rate limited."""
        self.successResultOf(self.verify(token()))
        self.clock.advance(60)
        assert "unknown key" in self.refused(token(KEY2, "k2")).description
        assert self.http.count(JWKS) == 2
        for _ in range(5):
            self.refused(token(KEY2, "k3"))
        assert self.http.count(JWKS) == 2
        self.http.routes[JWKS] = {"keys": [jwk(KEY1, "k1"), jwk(KEY2, "k2")]}
        self.clock.advance(30)
        self.successResultOf(self.verify(token(KEY2, "k2")))

    def test_keys_unreachable_is_503_not_a_hang(self):
        http = FakeHttp({**as_routes(), JWKS: lambda call: Deferred()})
        verifier = TokenVerifier(config(), http, self.clock)
        d = verifier.verify(token(), {FILES})
        self.assertNoResult(d)
        self.clock.advance(10)
        error = self.failureResultOf(d, TokenError).value
        assert isinstance(error, TokenError) and error.status == 503 and error.error is None


class IntrospectionTests(SynchronousTestCase):
    """RFC 7662 for opaque tokens."""

    def setUp(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.http = FakeHttp({**as_routes(), INTROSPECT: self.introspect})
        self.clock = new_clock()
        self.verifier = self.make(cacheSeconds=60, cacheSize=3)

    def make(self, **introspection: Any) -> TokenVerifier:
        c = config(introspection={"clientId": "gw id", "clientSecret": "p@ss:word", **introspection})
        return TokenVerifier(c, self.http, self.clock)

    def introspect(self, call: tuple[Any, ...]) -> Any:
        _, _, form, headers = call
        assert headers["Authorization"] == basic_auth("gw id", "p@ss:word")
        assert form["token_type_hint"] == "access_token"
        return self.answers.get(form["token"], {"active": False})

    def active(self, value: str, **fields: Any) -> None:
        self.answers[value] = {"active": True, "iss": ISSUER, "aud": FILES, "sub": "bob", "client_id": "app",
                               "scope": "files:read", "exp": NOW + 300, **fields}

    def posts(self) -> int:
        return self.http.count(INTROSPECT)

    def test_active_token_accepted_and_cached_until_exp(self):
        self.active("opaque-1", exp=NOW + 30)
        accepted = self.successResultOf(self.verifier.verify("opaque-1", {FILES}))
        assert accepted.subject == "bob" and accepted.scopes == {"files:read"} and accepted.expires == NOW + 30
        self.successResultOf(self.verifier.verify("opaque-1", {FILES}))
        assert self.posts() == 1
        self.clock.advance(30)
        del self.answers["opaque-1"]
        self.failureResultOf(self.verifier.verify("opaque-1", {FILES}), TokenError)
        assert self.posts() == 2

    def test_cache_seconds_bounds_a_revoked_token(self):
        self.active("opaque-1", exp=NOW + 3600)
        self.successResultOf(self.verifier.verify("opaque-1", {FILES}))
        self.answers["opaque-1"] = {"active": False}  # revoked at the AS
        self.clock.advance(59)
        self.successResultOf(self.verifier.verify("opaque-1", {FILES}))
        self.clock.advance(1)
        error = self.failureResultOf(self.verifier.verify("opaque-1", {FILES}), TokenError).value
        assert "not active" in str(error)

    def test_inactive_token_refused_and_not_cached(self):
        error = self.failureResultOf(self.verifier.verify("unknown", {FILES}), TokenError).value
        assert isinstance(error, TokenError) and error.error == "invalid_token" and error.status == 401
        self.failureResultOf(self.verifier.verify("unknown", {FILES}), TokenError)
        assert self.posts() == 2

    def test_rfc8707_introspected_audience_checked_on_every_use(self):
        self.active("for-notes", aud=[NOTES])
        self.failureResultOf(self.verifier.verify("for-notes", {FILES}), TokenError)
        self.successResultOf(self.verifier.verify("for-notes", {NOTES}))
        self.failureResultOf(self.verifier.verify("for-notes", {FILES}), TokenError)  # from the cache: still no
        self.active("no-aud", aud=None)
        del self.answers["no-aud"]["aud"]
        self.failureResultOf(self.verifier.verify("no-aud", {FILES}), TokenError)
        self.active("other-iss", iss=OTHER_ISSUER)
        self.failureResultOf(self.verifier.verify("other-iss", {FILES}), TokenError)
        self.active("expired", exp=NOW - 1)
        self.failureResultOf(self.verifier.verify("expired", {FILES}), TokenError)
        self.active("client-only", sub=None)
        del self.answers["client-only"]["sub"]
        assert self.successResultOf(self.verifier.verify("client-only", {FILES})).subject == "app"

    def test_cache_is_a_bounded_lru(self):
        for name in ("t1", "t2", "t3", "t4"):
            self.active(name)
        for name in ("t1", "t2", "t3"):
            self.successResultOf(self.verifier.verify(name, {FILES}))
        self.successResultOf(self.verifier.verify("t1", {FILES}))  # t1 used last: t2 is now the oldest
        self.successResultOf(self.verifier.verify("t4", {FILES}))
        assert self.posts() == 4
        assert len(self.verifier._introspected) == 3
        self.successResultOf(self.verifier.verify("t1", {FILES}))
        assert self.posts() == 4
        self.successResultOf(self.verifier.verify("t2", {FILES}))  # evicted: asked again
        assert self.posts() == 5

    def test_concurrent_uses_share_one_introspection(self):
        pending: Deferred[HttpResponse] = Deferred()
        self.http.routes[INTROSPECT] = lambda call: pending
        first = self.verifier.verify("opaque", {FILES})
        second = self.verifier.verify("opaque", {FILES})
        assert self.posts() == 1
        body = {"active": True, "aud": FILES, "sub": "bob", "exp": NOW + 60}
        pending.callback(HttpResponse(200, json.dumps(body).encode()))
        assert self.successResultOf(first) == self.successResultOf(second)

    def test_endpoint_unreachable_is_503(self):
        self.http.routes[INTROSPECT] = HttpResponse(500, b"oops")
        error = self.failureResultOf(self.verifier.verify("opaque", {FILES}), TokenError).value
        assert isinstance(error, TokenError) and error.status == 503

    def test_configured_endpoint_skips_discovery(self):
        self.http.routes["https://as.example/other-introspect"] = self.introspect
        verifier = self.make(endpoint="https://as.example/other-introspect")
        self.active("x")
        self.successResultOf(verifier.verify("x", {FILES}))
        assert self.http.count(AS_METADATA) == 0

    def test_opaque_without_introspection_is_refused(self):
        verifier = TokenVerifier(config(), self.http, self.clock)
        self.failureResultOf(verifier.verify("opaque", {FILES}), TokenError)
        assert self.http.calls == []


# -- HTTP pieces ----------------------------------------------------------------------------------


def test_rfc6749_s2_3_1_basic_auth_form_encodes_first():
    value = basic_auth("gw id", "p@ss:word")
    assert value.startswith("Basic ")
    client, secret = base64.b64decode(value[6:]).decode().split(":")
    assert (unquote(client), unquote(secret)) == ("gw id", "p@ss:word")


class _Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class BodyReaderTests(SynchronousTestCase):
    def test_body_over_the_limit_fails_and_drops_the_connection(self):
        reader = _BodyReader(10)
        transport = _Transport()
        reader.makeConnection(transport)
        reader.dataReceived(b"12345")
        reader.dataReceived(b"678901")
        self.failureResultOf(reader.done, HttpError)
        assert transport.stopped

    def test_cancel_drops_the_connection(self):
        reader = _BodyReader(10)
        transport = _Transport()
        reader.makeConnection(transport)
        reader.done.cancel()
        assert transport.stopped
        self.failureResultOf(reader.done)
