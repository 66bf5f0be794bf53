"""Issue 18 groundwork: a real authorization server (oidc-provider, tests/oauth_server.py) issues tokens
that mcpgw.oauth accepts for the resource they were requested for and for no other (RFC 8707), with
real treq fetches of its metadata and keys, and real introspection (RFC 7662) of opaque tokens.
"""

from __future__ import annotations

import json
from typing import Any

import jwt as pyjwt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from mcpgw.config.oauth import parse_oauth
from mcpgw.oauth.http import TreqHttp, basic_auth
from mcpgw.oauth.keys import AuthorizationServer
from mcpgw.oauth.metadata import ProtectedResources
from mcpgw.oauth.tokens import TokenError, TokenVerifier
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, OAuthServer, make_oauth_server  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

GATEWAY = "http://127.0.0.1:1234"
RESOURCE = GATEWAY + "/mcp"
OTHER = GATEWAY + "/servers/other/mcp"


async def request_token(server: OAuthServer, resource: str, scope: str = "files:read",
                        client: tuple[str, str] = (CLIENT_ID, CLIENT_SECRET)) -> dict[str, Any]:
    """A client-credentials token request with RFC 8707's ``resource``."""
    response = await treq.post(
        server.token_endpoint, data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
        headers={"Authorization": basic_auth(*client)}, timeout=10,
        pool=HTTPConnectionPool(reactor, persistent=False),  # a restarted AS on the same port: no stale connection
    )
    body = json.loads(await response.content())
    assert response.code == 200, body
    return body


@pytest_twisted.ensureDeferred
async def test_oidc_provider_jwt_is_bound_to_its_resource(make_oauth_server):  # noqa: F811 - the fixture
    server = make_oauth_server()
    http = TreqHttp(reactor)
    try:
        # RFC 8414: the authorization server's metadata, found by mcpgw.oauth.keys' discovery.
        metadata = await AuthorizationServer(server.issuer, http, reactor).metadata()
        assert metadata["issuer"] == server.issuer
        assert metadata["jwks_uri"].startswith(server.issuer)
        assert "client_credentials" in metadata["grant_types_supported"]

        issued = await request_token(server, RESOURCE)
        value = issued["access_token"]
        assert pyjwt.get_unverified_header(value)["typ"] == "at+jwt"  # RFC 9068
        assert pyjwt.decode(value, options={"verify_signature": False})["aud"] == RESOURCE

        config = parse_oauth({"resource": GATEWAY, "authorizationServers": [server.issuer]})
        resources = ProtectedResources(config, ["main", "other"], default="main")
        verifier = TokenVerifier(config, http, reactor)
        accepted = await verifier.verify(value, resources.audiences("main"))
        assert accepted.subject == CLIENT_ID and accepted.client_id == CLIENT_ID
        assert accepted.scopes == {"files:read"} and accepted.issuer == server.issuer

        # RFC 8707: the token for /mcp (server main) is not good on server other, and the reverse.
        with pytest.raises(TokenError) as refused:
            await verifier.verify(value, resources.audiences("other"))
        assert "audience" in refused.value.description
        elsewhere = (await request_token(server, OTHER))["access_token"]
        with pytest.raises(TokenError):
            await verifier.verify(elsewhere, resources.audiences("main"))
        assert (await verifier.verify(elsewhere, resources.audiences("other"))).subject == CLIENT_ID
    finally:
        await http.close()


@pytest_twisted.ensureDeferred
async def test_oidc_provider_opaque_token_introspected(make_oauth_server):  # noqa: F811 - the fixture
    gateway_client = ("mcpgw-gateway", "mcpgw-gateway-secret-0123456789")
    server = make_oauth_server(clients=[(CLIENT_ID, CLIENT_SECRET), gateway_client], token_format="opaque")
    http = TreqHttp(reactor)
    try:
        issued = await request_token(server, RESOURCE, scope="files:read files:write")
        value = issued["access_token"]
        assert value.count(".") != 2  # opaque
        config = parse_oauth({"resource": GATEWAY, "authorizationServers": [server.issuer],
                              "introspection": {"clientId": gateway_client[0], "clientSecret": gateway_client[1]}})
        verifier = TokenVerifier(config, http, reactor)
        accepted = await verifier.verify(value, {RESOURCE})
        assert accepted.subject == CLIENT_ID and accepted.scopes == {"files:read", "files:write"}
        assert accepted.expires is not None
        with pytest.raises(TokenError):
            await verifier.verify(value, {OTHER})
        with pytest.raises(TokenError) as inactive:
            await verifier.verify("not-a-token-this-server-issued", {RESOURCE})
        assert "not active" in inactive.value.description
    finally:
        await http.close()


@pytest_twisted.ensureDeferred
async def test_oidc_provider_stopped_then_restarted_with_a_new_key(make_oauth_server):  # noqa: F811 - the fixture
    """Issue 18 (3, 4): while the AS is down, the cached keys keep verifying its tokens; restarted, it signs
    with a new kid, which one JWKS refresh finds; the old kid is gone with the old keys."""
    first = make_oauth_server()
    http = TreqHttp(reactor)
    try:
        config = parse_oauth({"resource": GATEWAY, "authorizationServers": [first.issuer],
                              "jwksMinRefreshSeconds": 0.001, "httpTimeout": 5})
        verifier = TokenVerifier(config, http, reactor)
        old = (await request_token(first, RESOURCE))["access_token"]
        await verifier.verify(old, {RESOURCE})
        first.stop()
        assert (await verifier.verify(old, {RESOURCE})).subject == CLIENT_ID  # no AS needed

        second = make_oauth_server(port=first.port)
        assert second.issuer == first.issuer
        new = (await request_token(second, RESOURCE))["access_token"]
        assert pyjwt.get_unverified_header(new)["kid"] != pyjwt.get_unverified_header(old)["kid"]
        assert (await verifier.verify(new, {RESOURCE})).subject == CLIENT_ID
        with pytest.raises(TokenError) as gone:
            await verifier.verify(old, {RESOURCE})
        assert "unknown key" in gone.value.description and gone.value.status == 401
    finally:
        await http.close()
