"""The gateway as an OAuth 2.1 resource server, in process (MCP authorization spec 2025-06-18 ..
2026-07-28, RFC 9728, RFC 8707, RFC 6750): what a client sees on the wire for every token it may send.

The authorization server is tests/test_oauth_unit.FakeHttp (its metadata, its JWKS, its introspection
endpoint) in place of the treq client the gateway would use; the gateway and its children are the
in-process harness (tests/harness.py). The real authorization server and the official SDK's OAuth
client are tests/test_oauth_sdk.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from mcpgw.oauth.http import HttpError, HttpResponse
from tests import wire
from tests.gateway_process import fixture_server
from tests.harness import Harness
from tests.test_oauth_unit import INTROSPECT, ISSUER, JWKS, KEY1, KEY2, FakeHttp, as_routes, jwk
from tests.test_oauth_unit import token as signed
from tests.wire import POST_HEADERS, initialize, messages_of, notification, session_headers, tool_call

GW = "http://127.0.0.1:3000"
FILES = GW + "/servers/files/mcp"
NOTES = GW + "/servers/notes/mcp"
PRM = GW + "/.well-known/oauth-protected-resource"


def gateway_config(**oauth: Any) -> dict[str, Any]:
    return {
        "mcpServers": {"files": fixture_server(default=True), "notes": fixture_server()},
        "auth": {
            "bearerTokens": [{"name": "ops", "token": "a-static-token-for-the-ops-script-0123"}],
            "oauth": {"resource": GW, "authorizationServers": [ISSUER], "scopesSupported": ["files:read"],
                      "scopes": {"notes": ["notes:use"]}, "toolScopes": {"files": {"sleep": ["files:write"]}},
                      **oauth},
        },
    }


@pytest.fixture
def fake_as(monkeypatch: pytest.MonkeyPatch) -> FakeHttp:
    http = FakeHttp(as_routes())
    monkeypatch.setattr("mcpgw.auth.TreqHttp", lambda reactor: http)
    return http


@pytest.fixture
def gw(fake_as: FakeHttp) -> Iterator[Harness]:
    with Harness(gateway_config()) as h:
        yield h


def token(h: Harness, aud: str = FILES, scope: str = "files:read", **claims: Any) -> str:
    now = h.clock.seconds()
    return signed(aud=aud, scope=scope, iat=now, exp=now + 300, **claims)


def bearer(value: str) -> dict[str, str]:
    return {**POST_HEADERS, "authorization": f"Bearer {value}"}


def challenge(response: Any) -> dict[str, str]:
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def open_session(client: Any, value: str, path: str = "/servers/files/mcp") -> str:
    r = client.post(path, headers=bearer(value), json=initialize())
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    r = client.post(path, headers={**session_headers(sid), "authorization": f"Bearer {value}"},
                    json=notification("notifications/initialized"))
    assert r.status_code == 202, r.text
    return sid


def call(client: Any, value: str, sid: str, message: dict[str, Any], path: str = "/servers/files/mcp") -> Any:
    return client.post(path, headers={**session_headers(sid), "authorization": f"Bearer {value}"}, json=message)


# -- discovery (RFC 9728, MCP authorization spec "Authorization Server Discovery") -----------------------


def test_rfc9728_s3_metadata_of_the_gateway_and_of_each_server_without_credentials(gw: Harness) -> None:
    with gw.client() as client:
        root = client.get("/.well-known/oauth-protected-resource")
        files = client.get("/.well-known/oauth-protected-resource/servers/files/mcp")
        default = client.get("/.well-known/oauth-protected-resource/mcp")
    assert root.status_code == files.status_code == default.status_code == 200
    assert root.json()["resource"] == GW and root.json()["authorization_servers"] == [ISSUER]
    assert files.json() == {"resource": FILES, "authorization_servers": [ISSUER], "bearer_methods_supported": ["header"],
                            "scopes_supported": ["files:read", "files:write"]}
    assert default.json()["resource"] == GW + "/mcp"


@pytest.mark.parametrize("path", ["/servers/files/mcp", "/servers/notes/sse", "/mcp", "/servers"])
def test_mcp_auth_401_points_at_the_metadata_of_the_endpoint_asked(gw: Harness, path: str) -> None:
    with gw.client() as client:
        r = client.post(path, headers=POST_HEADERS, json=initialize()) if path != "/servers" else client.get(path)
    assert r.status_code == 401
    params = challenge(r)
    expected = PRM + path if path != "/servers" else PRM
    assert params["resource_metadata"] == expected
    assert "error" not in params  # no token was sent (RFC 6750 section 3.1)
    assert gw.child_pids() == []


# -- a good token -----------------------------------------------------------------------------------


def test_token_for_the_server_lists_and_calls_tools_and_never_reaches_the_child(gw: Harness) -> None:
    value = token(gw)
    with gw.client() as client:
        sid = open_session(client, value)
        [listed] = messages_of(call(client, value, sid, wire.request(2, "tools/list")))
        [echoed] = messages_of(call(client, value, sid, tool_call(3, "echo", {"text": "hi"})))
    assert "echo" in [t["name"] for t in listed["result"]["tools"]]
    assert echoed["result"]["content"][0]["text"] == "hi"
    [pid] = gw.child_pids()
    assert value not in json.dumps(gw.program(pid).received)  # no token passthrough, ever


def test_token_for_the_gateway_audience_is_good_on_every_server(gw: Harness) -> None:
    value = token(gw, aud=GW, scope="files:read notes:use")
    with gw.client() as client:
        open_session(client, value, "/servers/files/mcp")
        open_session(client, value, "/servers/notes/mcp")


def test_static_tokens_keep_working_beside_oauth(gw: Harness) -> None:
    with gw.client() as client:
        sid = open_session(client, "a-static-token-for-the-ops-script-0123")
        [answer] = messages_of(call(client, "a-static-token-for-the-ops-script-0123", sid, tool_call(2, "sleep", {"seconds": 0})))
    assert "result" in answer


# -- refusals: each a 401 that names the metadata, and no child ---------------------------------------


def refused(h: Harness, value: str, path: str = "/servers/files/mcp") -> dict[str, str]:
    before = h.child_pids()
    with h.client() as client:
        r = client.post(path, headers=bearer(value), json=initialize())
    assert r.status_code == 401, r.text
    params = challenge(r)
    assert params["error"] == "invalid_token" and params["resource_metadata"] == PRM + path
    assert h.child_pids() == before  # nothing reached a server before the token was accepted
    return params


def test_rfc8707_token_for_another_resource_is_refused(gw: Harness) -> None:
    refused(gw, token(gw, aud="https://elsewhere.example/mcp"))


def test_rfc8707_token_for_server_notes_is_refused_on_server_files(gw: Harness) -> None:
    refused(gw, token(gw, aud=NOTES, scope="notes:use"))


def test_expired_token_is_refused(gw: Harness) -> None:
    gw.advance(1000)
    now = gw.clock.seconds()
    refused(gw, signed(aud=FILES, iat=now - 600, exp=now - 300))


def test_token_of_an_issuer_not_configured_is_refused_without_asking_it(gw: Harness, fake_as: FakeHttp) -> None:
    refused(gw, token(gw, iss="https://other-as.example"))
    assert not [c for c in fake_as.calls if "other-as" in c[1]]


def test_unknown_kid_is_refused_after_one_jwks_refresh(gw: Harness, fake_as: FakeHttp) -> None:
    with gw.client() as client:
        open_session(client, token(gw))  # the keys are fetched once
    assert fake_as.count(JWKS) == 1
    gw.advance(31)  # past jwksMinRefreshSeconds (30): an unknown kid may make the keys be fetched again
    refused(gw, signed(KEY2, kid="k2", aud=FILES, exp=gw.clock.seconds() + 300))
    assert fake_as.count(JWKS) == 2


def test_rotated_key_is_accepted_after_the_refresh(gw: Harness, fake_as: FakeHttp) -> None:
    fake_as.routes.update(as_routes(jwk(KEY1, "k1"), jwk(KEY2, "k2")))
    with gw.client() as client:
        open_session(client, signed(KEY2, kid="k2", aud=FILES, exp=gw.clock.seconds() + 300))


def test_rfc7662_inactive_opaque_token_is_refused(fake_as: FakeHttp) -> None:
    fake_as.routes[INTROSPECT] = {"active": False}
    with Harness(gateway_config(introspection={"clientId": "gw", "clientSecret": "gw-secret-0123456789abcdef"})) as h:
        refused(h, "an-opaque-token-the-gateway-cannot-read")
    assert fake_as.count(INTROSPECT) == 1


def test_rfc7662_active_opaque_token_for_this_server_is_accepted(fake_as: FakeHttp) -> None:
    fake_as.routes[INTROSPECT] = lambda call: {"active": True, "sub": "svc", "iss": ISSUER, "aud": FILES,
                                               "scope": "files:read", "exp": 10_000}
    with Harness(gateway_config(introspection={"clientId": "gw", "clientSecret": "gw-secret-0123456789abcdef"})) as h:
        with h.client() as client:
            open_session(client, "an-opaque-token-the-gateway-cannot-read")


# -- the authorization server stopped -----------------------------------------------------------------


def test_as_stopped_cached_keys_serve_and_a_new_kid_gets_503_not_a_hang(gw: Harness, fake_as: FakeHttp) -> None:
    with gw.client() as client:
        open_session(client, token(gw))
        fake_as.routes.clear()
        fake_as.routes[JWKS] = HttpError("connection refused")
        open_session(client, token(gw))  # cached keys
        gw.advance(60)  # past jwksMinRefreshSeconds: the unknown kid may ask again
        r = client.post("/servers/files/mcp", headers=bearer(signed(KEY2, kid="k2", aud=FILES, exp=gw.clock.seconds() + 300)),
                        json=initialize())
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


def test_metadata_that_is_not_json_is_unavailable_not_accepted(fake_as: FakeHttp) -> None:
    fake_as.routes.clear()
    fake_as.routes["https://as.example/.well-known/oauth-authorization-server"] = HttpResponse(500, b"oops")
    fake_as.routes["https://as.example/.well-known/openid-configuration"] = HttpResponse(500, b"oops")
    with Harness(gateway_config()) as h, h.client() as client:
        r = client.post("/servers/files/mcp", headers=bearer(token(h)), json=initialize())
        assert r.status_code == 503
        assert h.child_pids() == []


# -- scopes: per server and per tool (step-up) --------------------------------------------------------


def test_server_scope_missing_is_403_insufficient_scope_naming_it(gw: Harness) -> None:
    with gw.client() as client:
        r = client.post("/servers/notes/mcp", headers=bearer(token(gw, aud=NOTES, scope="files:read")), json=initialize())
    assert r.status_code == 403
    params = challenge(r)
    # What the token has that means something here, then what is needed (the spec's recommended step-up).
    assert params["error"] == "insufficient_scope" and params["scope"] == "files:read notes:use"
    assert params["resource_metadata"] == PRM + "/servers/notes/mcp"
    assert gw.child_pids() == []


def test_tool_scope_hides_the_tool_refuses_the_call_and_a_stepped_up_token_succeeds(gw: Harness) -> None:
    reader = token(gw)
    with gw.client() as client:
        sid = open_session(client, reader)
        [listed] = messages_of(call(client, reader, sid, wire.request(2, "tools/list")))
        assert "sleep" not in [t["name"] for t in listed["result"]["tools"]]
        assert "echo" in [t["name"] for t in listed["result"]["tools"]]
        r = call(client, reader, sid, tool_call(3, "sleep", {"seconds": 0}))
        assert r.status_code == 403
        params = challenge(r)
        assert params["error"] == "insufficient_scope" and params["scope"] == "files:read files:write"
        [pid] = gw.child_pids()
        assert "sleep" not in json.dumps(gw.program(pid).received)
        writer = token(gw, scope="files:read files:write")  # the same subject, more scopes
        [listed] = messages_of(call(client, writer, sid, wire.request(4, "tools/list")))
        assert "sleep" in [t["name"] for t in listed["result"]["tools"]]
        [answer] = messages_of(call(client, writer, sid, tool_call(5, "sleep", {"seconds": 0})))
        assert "result" in answer


def test_session_stays_bound_to_the_token_subject(gw: Harness) -> None:
    with gw.client() as client:
        sid = open_session(client, token(gw))
        r = call(client, token(gw, sub="mallory"), sid, wire.request(2, "tools/list"))
    assert r.status_code == 404


# -- tool policy on every transport and kind of server -----------------------------------------------


def test_legacy_sse_tool_scope_403_on_the_post_and_the_list_on_the_stream_hides_the_tool(gw: Harness) -> None:
    reader = token(gw)
    stream = gw.open_sse("/servers/files/sse", {"authorization": f"Bearer {reader}"})
    with gw.client() as client:
        def post(message: dict[str, Any], value: str = reader) -> Any:
            return client.post(stream.endpoint, headers=bearer(value), json=message)

        assert post(initialize()).status_code == 202
        assert post(notification("notifications/initialized")).status_code == 202
        assert post(wire.request(2, "tools/list")).status_code == 202
        gw.run_until(lambda: b'"id":2' in stream.received, 5)
        listed = [json.loads(line[6:]) for line in stream.received.decode().splitlines()
                  if line.startswith("data: ") and '"id":2' in line]
        names = [t["name"] for t in listed[0]["result"]["tools"]]
        assert "echo" in names and "sleep" not in names
        r = post(tool_call(3, "sleep", {"seconds": 0}))
        assert r.status_code == 403 and challenge(r)["scope"] == "files:read files:write"
        assert challenge(r)["resource_metadata"] == PRM + "/servers/files/messages"
        assert post(tool_call(4, "sleep", {"seconds": 0}), token(gw, scope="files:read files:write")).status_code == 202
        assert gw.run_until(lambda: b'"id":4' in stream.received, 5)
    stream.close()


def test_aggregate_and_pooled_servers_follow_tool_scopes(fake_as: FakeHttp) -> None:
    config = gateway_config(toolScopes={"all": {"b__sleep": ["files:write"]}, "pool": {"sleep": ["files:write"]}})
    config["mcpServers"].update({"a": fixture_server(), "b": fixture_server(),
                                 "pool": fixture_server(sessions="pooled", poolSize=1)})
    config["aggregate"] = {"name": "all", "servers": ["a", "b"]}
    with Harness(config) as h, h.client() as client:
        for name, hidden, shown in (("all", "b__sleep", "a__sleep"), ("pool", "sleep", "echo")):
            path = f"/servers/{name}/mcp"
            reader = token(h, aud=GW + path)
            sid = open_session(client, reader, path)
            [listed] = messages_of(call(client, reader, sid, wire.request(2, "tools/list"), path))
            names = [t["name"] for t in listed["result"]["tools"]]
            assert shown in names and hidden not in names, (name, names)
            r = call(client, reader, sid, tool_call(3, hidden, {"seconds": 0}), path)
            assert r.status_code == 403 and challenge(r)["error"] == "insufficient_scope", (name, r.text)
            writer = token(h, aud=GW + path, scope="files:read files:write")
            [answer] = messages_of(call(client, writer, sid, tool_call(4, hidden, {"seconds": 0}), path))
            assert "result" in answer, (name, answer)


def test_jwks_fetch_that_never_answers_times_out_into_503(gw: Harness, fake_as: FakeHttp) -> None:
    """An authorization server that accepts the connection and never answers: ``httpTimeout`` (10 s) ends
    the wait with a 503, on the gateway's clock; nothing hangs and nothing is accepted."""
    from twisted.internet.defer import Deferred

    fake_as.routes.clear()
    fake_as.routes["https://as.example/.well-known/oauth-authorization-server"] = lambda call: Deferred()
    started = gw.clock.seconds()
    with gw.client() as client:
        r = client.post("/servers/files/mcp", headers=bearer(token(gw)), json=initialize())
    assert r.status_code == 503
    assert 10 <= gw.clock.seconds() - started < 30
    assert gw.child_pids() == []


def test_servers_index_takes_a_gateway_token_and_refuses_a_server_token(gw: Harness) -> None:
    """``/servers`` is the gateway's own resource: a token for the gateway opens it, one for a server does not."""
    with gw.client() as client:
        ok = client.get("/servers", headers={"authorization": f"Bearer {token(gw, aud=GW)}"})
        refused = client.get("/servers", headers={"authorization": f"Bearer {token(gw)}"})
    assert ok.status_code == 200 and {s["name"] for s in ok.json()["servers"]} == {"files", "notes"}
    assert refused.status_code == 401 and challenge(refused)["resource_metadata"] == PRM


def test_hs256_jwts_of_auth_jwt_keep_working_beside_oauth(fake_as: FakeHttp) -> None:
    """``auth.jwt``'s own issuer's HS256 tokens go to its verifier; other JWTs to the authorization servers."""
    import jwt as pyjwt

    secret = "a-jwt-secret-of-at-least-thirty-two-bytes!"
    config = gateway_config()
    config["auth"]["jwt"] = {"secret": secret, "issuer": "https://idp.internal", "audience": "mcpgw"}
    with Harness(config) as h, h.client() as client:
        now = h.clock.seconds()
        hs256 = pyjwt.encode({"iss": "https://idp.internal", "aud": "mcpgw", "sub": "batch", "exp": now + 60},
                             secret, algorithm="HS256")
        open_session(client, hs256)
        open_session(client, token(h))  # an OAuth access token still goes to its authorization server
        forged = pyjwt.encode({"iss": ISSUER, "aud": FILES, "sub": "x", "exp": now + 60}, secret, algorithm="HS256")
        r = client.post("/servers/files/mcp", headers=bearer(forged), json=initialize())
    assert r.status_code == 401  # an HS256 token claiming the authorization server's issuer is never accepted


def test_a_server_added_at_run_time_gets_its_metadata_and_audience_and_loses_them_when_removed(gw: Harness) -> None:
    """RFC 9728 / RFC 8707 for servers the admin API (mcpgw.control) adds and removes without a restart."""
    extra = GW + "/servers/extra/mcp"
    fixture = fixture_server()
    gw.gateway.add_server("extra", command=fixture["command"], args=fixture["args"])
    with gw.client() as client:
        prm = client.get("/.well-known/oauth-protected-resource/servers/extra/mcp")
        assert prm.status_code == 200 and prm.json()["resource"] == extra
        open_session(client, token(gw, aud=extra), "/servers/extra/mcp")
        gw.gateway.remove_server("extra")
        gw.run_until(lambda: not gw.child_pids(), 10)
        assert client.get("/.well-known/oauth-protected-resource/servers/extra/mcp").status_code == 404
        r = client.post("/servers/files/mcp", headers=bearer(token(gw, aud=extra)), json=initialize())
        assert r.status_code == 401  # its token is good on no other server
