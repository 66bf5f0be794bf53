"""Issue 6, authentication: static bearer tokens / API keys, JWT (HS256, JWKS), 401 on every
transport, sessions bound to their identity, no credentials (or gateway secrets) reaching a child,
and the refusal to start with an example secret.

Unit tests drive mcpgw.auth on a task.Clock; the integration tests run a real gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mcpgw import auth as auth_module
from mcpgw import tap
from mcpgw.auth import Authenticator, Principal, Unauthorized, identity_of, principal_of
from mcpgw.config import (
    AuthConfig,
    ConfigError,
    JwtConfig,
    StaticToken,
    StdioServer,
    parse,
)
from mcpgw.upstream.stdio import child_environment
from tests import wire
from tests.gateway_process import (
    ACTIVATED_LISTEN,
    ACTIVATION_ENV,
    TWISTD,
    fixture_server,
    loopback_listener,
    socket_activated,
)
from tests.wire import POST_HEADERS, session_headers

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abcd"
SECRET = "s" * 40
ISSUER = "https://issuer.example"
AUDIENCE = "mcpgw-tests"
NOW = 1_800_000_000


def hs256(claims: dict[str, Any], secret: str = SECRET, **header: Any) -> str:
    return pyjwt.encode(claims, secret, algorithm="HS256", headers=header or None)


def claims(**extra: Any) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "exp": NOW + 600, **extra}


def bearer(token: str) -> list[bytes]:
    return [f"Bearer {token}".encode()]


# -- unit: credentials ------------------------------------------------------------------------


class StaticTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        config = AuthConfig(enabled=True, bearerTokens=(StaticToken("alice", ALICE), StaticToken("bob", BOB)))
        self.auth = Authenticator(config, Clock())

    def test_bearer_token_is_its_identity(self) -> None:
        """``Authorization: Bearer <token>`` proves the token's name."""
        self.assertEqual(self.auth.authenticate(bearer(ALICE), None), "token:alice")
        self.assertEqual(self.auth.authenticate(bearer(BOB), None), "token:bob")

    def test_scheme_is_case_insensitive(self) -> None:
        self.assertEqual(self.auth.authenticate([b"bearer " + ALICE.encode()], None), "token:alice")

    def test_api_key_header(self) -> None:
        """The same token in X-API-Key (auth.apiKeyHeader)."""
        self.assertEqual(self.auth.authenticate(None, [ALICE.encode()]), "token:alice")

    def test_wrong_token(self) -> None:
        e = self.assertRaises(Unauthorized, self.auth.authenticate, bearer(ALICE + "x"), None)
        self.assertEqual(e.error, "invalid_token")
        self.assertRaises(Unauthorized, self.auth.authenticate, None, [b"nope"])

    def test_no_credentials(self) -> None:
        """No credentials: error is None, so the challenge carries no error code (RFC 6750 3.1)."""
        e = self.assertRaises(Unauthorized, self.auth.authenticate, None, None)
        self.assertIsNone(e.error)
        self.assertEqual(self.auth.challenge(e), b'Bearer realm="mcpgw"')

    def test_malformed_or_ambiguous(self) -> None:
        """Another scheme, two Authorization headers, or both kinds at once: invalid_request."""
        for authorization, key in [([b"Basic YWxpY2U6eA=="], None), (bearer(ALICE) * 2, None),
                                   (bearer(ALICE), [ALICE.encode()]), ([b"Bearer"], None)]:
            e = self.assertRaises(Unauthorized, self.auth.authenticate, authorization, key)
            self.assertEqual(e.error, "invalid_request", (authorization, key))

    def test_challenge_with_error(self) -> None:
        e = Unauthorized('bad "token"\n')
        self.assertEqual(self.auth.challenge(e),
                         b'Bearer realm="mcpgw", error="invalid_token", error_description="bad token"')

    def test_every_token_is_compared_in_constant_time(self) -> None:
        """hmac.compare_digest on fixed-length digests, for every configured token, even after a match."""
        calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def compare(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(auth_module.hmac, "compare_digest", compare)
        self.auth.authenticate(bearer(ALICE), None)
        self.assertEqual(len(calls), 2)
        self.assertEqual({len(a) for a, _ in calls} | {len(b) for _, b in calls}, {32})


class JwtTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.auth = Authenticator(AuthConfig(enabled=True, jwt=JwtConfig(ISSUER, (AUDIENCE,), secret=SECRET)), self.clock)

    def check(self, token: str) -> str:
        return self.auth.authenticate(bearer(token), None)

    def refused(self, token: str) -> Unauthorized:
        e = self.assertRaises(Unauthorized, self.check, token)
        self.assertEqual(e.error, "invalid_token")
        return e

    def test_valid_token_is_its_subject(self) -> None:
        self.assertEqual(self.check(hs256(claims())), "jwt:carol")

    def test_audience_list(self) -> None:
        self.assertEqual(self.check(hs256(claims(aud=["other", AUDIENCE]))), "jwt:carol")

    def test_wrong_secret_issuer_audience(self) -> None:
        self.refused(hs256(claims(), secret="t" * 40))
        self.assertIn("issuer", self.refused(hs256(claims(iss="https://evil.example"))).description)
        self.assertIn("audience", self.refused(hs256(claims(aud="someone-else"))).description)

    def test_expiry_on_the_injected_clock(self) -> None:
        token = hs256(claims(exp=NOW + 10))
        self.assertEqual(self.check(token), "jwt:carol")
        self.clock.advance(11)
        self.assertIn("expired", self.refused(token).description)

    def test_leeway(self) -> None:
        auth = Authenticator(AuthConfig(enabled=True, jwt=JwtConfig(ISSUER, (AUDIENCE,), secret=SECRET, leeway=30)), self.clock)
        self.assertEqual(auth.authenticate(bearer(hs256(claims(exp=NOW - 20))), None), "jwt:carol")
        self.assertRaises(Unauthorized, auth.authenticate, bearer(hs256(claims(exp=NOW - 40))), None)

    def test_not_before(self) -> None:
        token = hs256(claims(nbf=NOW + 5))
        self.assertIn("not valid yet", self.refused(token).description)
        self.clock.advance(5)
        self.assertEqual(self.check(token), "jwt:carol")

    def test_required_claims(self) -> None:
        """exp, iss, aud and sub must all be there."""
        for claim in ("exp", "iss", "aud", "sub"):
            c = claims()
            del c[claim]
            self.refused(hs256(c))

    def test_alg_none_is_refused(self) -> None:
        token = pyjwt.encode(claims(), None, algorithm="none")
        self.refused(token)

    def test_other_algorithm_is_refused(self) -> None:
        """HS512 with the right secret is not HS256."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyJWT: a 40-byte key is short for HS512
            token = pyjwt.encode(claims(), SECRET, algorithm="HS512")
        self.refused(token)

    def test_garbage_with_two_dots(self) -> None:
        self.refused("a.b.c")


class JwksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="k1", alg="RS256", use="sig")
        fd, self.path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [jwk]}, f)
        self.addCleanup(os.unlink, self.path)
        self.auth = Authenticator(AuthConfig(enabled=True, jwt=JwtConfig(ISSUER, (AUDIENCE,), jwksFile=self.path)), self.clock)

    def rs256(self, key: Any = None, kid: str = "k1", **extra: Any) -> str:
        return pyjwt.encode(claims(**extra), key or self.key, algorithm="RS256", headers={"kid": kid})

    def test_signed_by_the_jwks_key(self) -> None:
        self.assertEqual(self.auth.authenticate(bearer(self.rs256()), None), "jwt:carol")

    def test_unknown_kid_or_other_key(self) -> None:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertRaises(Unauthorized, self.auth.authenticate, bearer(self.rs256(kid="k2")), None)
        self.assertRaises(Unauthorized, self.auth.authenticate, bearer(self.rs256(key=other)), None)

    def test_algorithm_confusion(self) -> None:
        """An HS256 token keyed with the RSA public key is not accepted."""
        from cryptography.hazmat.primitives import serialization

        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        forged = base64.urlsafe_b64encode(b"x").decode()  # pyjwt refuses to sign with a PEM: build it by hand
        header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": "k1"}).encode()).rstrip(b"=")
        body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
        mac = hmac.new(pem, header + b"." + body, "sha256").digest()
        forged = (header + b"." + body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
        self.assertRaises(Unauthorized, self.auth.authenticate, bearer(forged), None)

    def test_expired(self) -> None:
        self.assertRaises(Unauthorized, self.auth.authenticate, bearer(self.rs256(exp=NOW - 1)), None)


class PrincipalTests(SynchronousTestCase):
    def request(self, **headers: str) -> DummyRequest:
        request = DummyRequest([b"mcp"])
        request.client = IPv4Address("TCP", "192.168.1.1", 40000)
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
        return request

    def test_credentials_are_removed_from_the_request(self) -> None:
        """Once checked, Authorization and the API key header are gone: nothing later can pass them on."""
        auth = Authenticator(AuthConfig(enabled=True, bearerTokens=(StaticToken("alice", ALICE),)), Clock())
        request = self.request(authorization=f"Bearer {ALICE}")
        self.assertEqual(auth.principal(request).identity, "token:alice")
        self.assertIsNone(request.getHeader(b"authorization"))
        self.assertEqual(identity_of(request), "token:alice")
        request = self.request(x_api_key=ALICE)
        auth.principal(request)
        self.assertIsNone(request.getHeader(b"x-api-key"))

    def test_refused_request_still_has_an_anonymous_principal(self) -> None:
        """For the rate limiter: the client's address."""
        auth = Authenticator(AuthConfig(enabled=True, bearerTokens=(StaticToken("alice", ALICE),)), Clock())
        request = self.request(authorization="Bearer wrong-token-0000000000")
        self.assertRaises(Unauthorized, auth.principal, request)
        self.assertEqual(principal_of(request), Principal(None, "192.168.1.1"))
        self.assertIsNone(request.getHeader(b"authorization"))

    def test_auth_off_is_anonymous(self) -> None:
        auth = Authenticator(AuthConfig(), Clock())
        request = self.request(authorization="Bearer whatever")
        self.assertEqual(auth.principal(request), Principal(None, "192.168.1.1"))
        self.assertEqual(principal_of(request).rate_key, "ip:192.168.1.1")


class ChildEnvironmentTests(SynchronousTestCase):
    """mcpgw.upstream.stdio.child_environment: minimal and explicit."""

    def test_only_base_variables_inherit_env_and_env(self) -> None:
        environ = {
            "PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC", "TERM": "xterm",
            "SESSION_SECRET": "s", "REDIS_PASSWORD": "p", "REDIS_URL": "redis://:p@h", "MCPGW_AUTH_TOKENS": ALICE,
            "MCPGW_JWT_SECRET": SECRET, "AWS_SECRET_ACCESS_KEY": "aws", "GITHUB_TOKEN": "gh",
        }
        server = StdioServer(name="s", command="c", env={"DEBUG": "1"}, inheritEnv=("GITHUB_TOKEN", "UNSET"))
        self.assertEqual(child_environment(server, environ), {
            "PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC", "GITHUB_TOKEN": "gh", "DEBUG": "1",
        })

    def test_path_defaults(self) -> None:
        self.assertEqual(child_environment(StdioServer(name="s", command="c"), {})["PATH"], os.defpath)

    def test_inherit_env_config(self) -> None:
        config = parse(doc(mcpServers={"s": {"command": sys.executable, "inheritEnv": ["GITHUB_TOKEN", "HTTPS_PROXY"]}}), {})
        self.assertEqual((config.servers["s"].name, config.servers["s"].inheritEnv), ("s", ("GITHUB_TOKEN", "HTTPS_PROXY")))

    def test_inherit_env_never_names_a_gateway_secret(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            parse(doc(mcpServers={"s": {"command": sys.executable, "inheritEnv": ["HOME", "SESSION_SECRET"]}}), {})
        self.assertEqual(ctx.exception.key, "mcpServers.s.inheritEnv[1]")


# -- unit: config -----------------------------------------------------------------------------


def doc(**top: Any) -> dict[str, Any]:
    return {"mcpServers": {"s": {"command": sys.executable}}, **top}


class AuthConfigTests(SynchronousTestCase):
    def key(self, raw: Any, environ: dict[str, str] | None = None) -> str:
        with self.assertRaises(ConfigError) as ctx:
            parse(raw, environ or {})
        self.assertNotIn("\n", str(ctx.exception))
        return ctx.exception.key

    def test_off_by_default(self) -> None:
        self.assertFalse(parse(doc(), {}).auth.enabled)

    def test_on_when_tokens_are_configured(self) -> None:
        config = parse(doc(auth={"bearerTokens": [ALICE, {"name": "bob", "token": BOB}]}), {})
        self.assertTrue(config.auth.enabled)
        self.assertEqual([t.name for t in config.auth.bearerTokens][1], "bob")
        self.assertNotIn(ALICE, repr(config.auth))

    def test_tokens_from_the_environment(self) -> None:
        config = parse(doc(), {"MCPGW_AUTH_TOKENS": f"{ALICE}, {BOB}"})
        self.assertTrue(config.auth.enabled)
        self.assertEqual(len(config.auth.bearerTokens), 2)

    def test_jwt_secret_from_the_environment(self) -> None:
        config = parse(doc(auth={"jwt": {"secret": "x" * 32, "issuer": ISSUER, "audience": AUDIENCE}}),
                       {"MCPGW_JWT_SECRET": SECRET})
        assert config.auth.jwt is not None
        self.assertEqual((config.auth.jwt.secret, config.auth.jwt.audience), (SECRET, (AUDIENCE,)))

    def test_strict_keys(self) -> None:
        jwt_ok = {"secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE}
        cases = {
            "auth.enabled": doc(auth={"enabled": True}),
            "auth.bearerTokens[0]": doc(auth={"bearerTokens": ["short"]}),
            "auth.bearerTokens[1].token": doc(auth={"bearerTokens": [ALICE, {"name": "b"}]}),
            "auth.bearerTokens": doc(auth={"bearerTokens": [ALICE, ALICE]}),
            "auth.apiKeyHeader": doc(auth={"apiKeyHeader": "Authorization"}),
            "auth.realm": doc(auth={"realm": 'a"b'}),
            "auth.jwt": doc(auth={"jwt": {"issuer": ISSUER, "audience": AUDIENCE}}),
            "auth.jwt.secret": doc(auth={"jwt": {**jwt_ok, "secret": "short"}}),
            "auth.jwt.issuer": doc(auth={"jwt": {"secret": SECRET, "audience": AUDIENCE}}),
            "auth.jwt.audience": doc(auth={"jwt": {**jwt_ok, "audience": []}}),
            "auth.jwt.leeway": doc(auth={"jwt": {**jwt_ok, "leeway": -1}}),
            "auth.jwt.algorithm": doc(auth={"jwt": {**jwt_ok, "algorithm": "HS256"}}),
            "auth.jwt.jwksFile": doc(auth={"jwt": {"jwksFile": "/nonexistent.json", "issuer": ISSUER, "audience": AUDIENCE}}),
            "auth.token": doc(auth={"token": ALICE}),
        }
        for key, raw in cases.items():
            self.assertEqual(self.key(raw), key, raw)

    def test_jwks_without_signing_keys(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump({"keys": [{"kty": "oct", "k": "AAAA", "use": "enc"}]}, f)
            f.flush()
            self.assertEqual(self.key(doc(auth={"jwt": {"jwksFile": f.name, "issuer": ISSUER, "audience": AUDIENCE}})),
                             "auth.jwt.jwksFile")


class ExampleSecretTests(SynchronousTestCase):
    """check_secrets: the example secret only with --insecure-dev or a loopback-only listener."""

    def config(self, host: str = "0.0.0.0", secret: str = "change-this-secret") -> Any:
        return parse(doc(host=host, session={"secret": secret}), {})

    def test_refused_on_every_interface(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            tap.check_secrets(self.config(), None, False)
        self.assertEqual(ctx.exception.key, "session.secret")
        self.assertIn("--insecure-dev", str(ctx.exception))

    def test_the_env_example_value_too(self) -> None:
        self.assertRaises(ConfigError, tap.check_secrets, self.config(secret="change-this-session-secret"), None, False)

    def test_allowed_on_loopback_or_insecure_dev(self) -> None:
        tap.check_secrets(self.config(host="127.0.0.1"), None, False)
        tap.check_secrets(self.config(), "tcp:3000:interface=127.0.0.1", False)
        tap.check_secrets(self.config(), "tcp:3000:interface=\\:\\:1", False)
        tap.check_secrets(self.config(), None, True)
        tap.check_secrets(self.config(secret="a-real-random-secret"), None, False)

    def test_listen_overrides_a_loopback_host(self) -> None:
        self.assertRaises(ConfigError, tap.check_secrets, self.config(host="127.0.0.1"), "tcp:3000", False)
        self.assertRaises(ConfigError, tap.check_secrets, self.config(host="127.0.0.1"), "tcp:3000:interface=0.0.0.0", False)


# -- integration ------------------------------------------------------------------------------


def activated_twistd(sock: socket.socket, config_path: str, *args: str) -> list[str]:
    """``twistd -n mcpgw`` listening on ``sock`` only, handed over as systemd does: a bind the gateway cannot know
    to be loopback, as ``interface=0.0.0.0`` (tests bind 127.0.0.1 only); metrics on a free loopback port."""
    return socket_activated(sock, [*TWISTD, "mcpgw", "--config", config_path, "--listen", ACTIVATED_LISTEN,
                                   "--metrics-listen", "tcp:0:interface=127.0.0.1", *args])


EXAMPLE_SECRET_ENV = {**ACTIVATION_ENV, "SESSION_SECRET": "change-this-secret"}


@pytest.mark.integration
def test_example_secret_stops_startup(tmp_path):
    """On an endpoint that is not (known to be) loopback: one line naming session.secret, exit status 2, nothing
    listening."""
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"mcpServers": {"fx": fixture_server()}}))
    with loopback_listener() as sock:
        result = subprocess.run(activated_twistd(sock, str(path)), pass_fds=(sock.fileno(),), capture_output=True,
                                text=True, check=False, timeout=20, cwd=tmp_path, env={**os.environ, **EXAMPLE_SECRET_ENV})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("mcpgw: config error: session.secret: "), result.stderr
    assert "change-this-secret" in lines[0] and "--insecure-dev" in lines[0]
    assert "starting on" not in result.stdout


@pytest.mark.integration
def test_example_secret_with_insecure_dev(tmp_path):
    """--insecure-dev starts on an endpoint that is not (known to be) loopback even with the example secret, and
    serves there."""
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"mcpServers": {"fx": fixture_server()}}))
    with loopback_listener() as sock:
        proc = subprocess.Popen(activated_twistd(sock, str(path), "--insecure-dev"), pass_fds=(sock.fileno(),),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, **EXAMPLE_SECRET_ENV})
        port = sock.getsockname()[1]
    assert proc.stdout is not None
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"GatewaySite starting on" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert b"GatewaySite starting on" in seen, seen
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.integration
def test_example_secret_on_loopback(make_gateway):
    """Bound to loopback (the test gateways are) the example secret is allowed."""
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}}, env={"SESSION_SECRET": "change-this-secret"})
    assert httpx.get(gw.url + "/health").status_code == 200


#: (REDIS_PASSWORD would turn the Redis store on: mcpgw.upstream.stdio's unit test covers it.)
SECRETS_ENV = {
    "SESSION_SECRET": "gateway-session-secret-0123456789",
    "MCPGW_AUTH_TOKENS": BOB,
    "MCPGW_JWT_SECRET": SECRET,
    "SOME_GATEWAY_VARIABLE": "not-for-children",
    "LC_ALL": "C.UTF-8",
    "PASS_ME": "inherited",
}


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    """Auth on: alice in the file, bob from MCPGW_AUTH_TOKENS, JWTs with the MCPGW_JWT_SECRET."""
    return make_module_gateway(wire.config(
        auth={"bearerTokens": [{"name": "alice", "token": ALICE}],
              "jwt": {"secret": "x" * 32, "issuer": ISSUER, "audience": AUDIENCE, "leeway": 5}},
        mcpServers={"fx": fixture_server(env={"FROM_CONFIG": "yes"}, inheritEnv=["PASS_ME"])},
        cors={"origins": ["*"]},  # a loopback page's preflight (the default allows no other origin)
    ), env=SECRETS_ENV)


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_401(r: httpx.Response, error: str | None = None) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="mcpgw"'), challenge
    if error:
        assert f'error="{error}"' in challenge, challenge
    assert r.json()["error"]["message"].startswith("Unauthorized")


def live_jwt(sub: str = "carol", **extra: Any) -> str:
    return hs256({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": int(time.time()) + 300, **extra})


@pytest.mark.integration
class TestEveryTransportNeedsCredentials:
    @pytest.mark.parametrize("path", ["/mcp", "/servers/fx/mcp"])
    def test_streamable_post(self, gw, path):
        with wire.http_client(gw.url) as c:
            assert_401(c.post(path, headers=POST_HEADERS, json=wire.initialize()))
            assert_401(c.post(path, headers={**POST_HEADERS, **auth("wrong-token-000000000000")}, json=wire.initialize()),
                       "invalid_token")
            assert c.post(path, headers={**POST_HEADERS, **auth(ALICE)}, json=wire.initialize()).status_code == 200

    def test_streamable_get_and_delete(self, gw):
        with wire.http_client(gw.url) as c:
            sid = open_session(c, ALICE)
            assert_401(c.get("/mcp", headers={"accept": "text/event-stream", "mcp-session-id": sid}))
            assert_401(c.delete("/mcp", headers={"mcp-session-id": sid}))
            assert c.delete("/mcp", headers={"mcp-session-id": sid, **auth(ALICE)}).status_code == 200

    @pytest.mark.parametrize("path", ["/sse", "/servers/fx/sse"])
    def test_legacy_sse(self, gw, path):
        with wire.http_client(gw.url) as c:
            assert_401(c.get(path, headers={"accept": "text/event-stream"}))
            with c.stream("GET", path, headers={"accept": "text/event-stream", **auth(ALICE)}) as r:
                assert r.status_code == 200

    def test_legacy_messages(self, gw):
        with wire.http_client(gw.url) as c, \
                c.stream("GET", "/sse", headers={"accept": "text/event-stream", "x-api-key": ALICE}) as r:
            events = wire.sse_events(r)  # held: dropping it closes the stream
            endpoint = next(events).data
            assert_401(c.post(endpoint, json=wire.request(1, "ping")))
            assert c.post(endpoint, json=wire.request(1, "ping"), headers={"x-api-key": ALICE}).status_code == 202

    @pytest.mark.parametrize("path", ["/ws", "/servers/fx/ws"])
    def test_websocket_upgrade(self, gw, path):
        async def go():
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://127.0.0.1:{gw.port}{path}", subprotocols=["mcp"]):
                    pass
            response = info.value.response
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            async with connect(f"ws://127.0.0.1:{gw.port}{path}", subprotocols=["mcp"],
                               additional_headers=auth(ALICE)) as ws:
                await ws.send(json.dumps(wire.initialize()))
                assert "result" in json.loads(await ws.recv())
        asyncio.run(go())

    def test_servers_index(self, gw):
        assert_401(httpx.get(gw.url + "/servers"))
        assert httpx.get(gw.url + "/servers", headers=auth(ALICE)).status_code == 200

    def test_health_and_ready_stay_open(self, gw):
        assert httpx.get(gw.url + "/health").status_code == 200
        assert httpx.get(gw.url + "/ready").status_code == 200

    def test_preflight_needs_no_credentials(self, gw):
        r = httpx.options(gw.url + "/mcp", headers={"origin": "http://localhost:5173", "access-control-request-method": "POST",
                                                   "access-control-request-headers": "authorization, content-type"})
        assert r.status_code == 204
        assert "authorization" in r.headers["access-control-allow-headers"].lower()

    def test_jwt_and_environment_tokens(self, gw):
        with wire.http_client(gw.url) as c:
            assert c.post("/mcp", headers={**POST_HEADERS, **auth(live_jwt())}, json=wire.initialize()).status_code == 200
            assert c.post("/mcp", headers={**POST_HEADERS, **auth(BOB)}, json=wire.initialize()).status_code == 200
            expired = live_jwt(exp=int(time.time()) - 60)
            assert_401(c.post("/mcp", headers={**POST_HEADERS, **auth(expired)}, json=wire.initialize()), "invalid_token")
            wrong_aud = live_jwt(aud="other")
            assert_401(c.post("/mcp", headers={**POST_HEADERS, **auth(wrong_aud)}, json=wire.initialize()), "invalid_token")


def open_session(c: httpx.Client, token: str) -> str:
    r = c.post("/mcp", headers={**POST_HEADERS, **auth(token)}, json=wire.initialize())
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    r = c.post("/mcp", headers={**session_headers(sid), **auth(token)}, json=wire.notification("notifications/initialized"))
    assert r.status_code == 202
    return sid


@pytest.mark.integration
class TestSessionsBelongToTheirIdentity:
    def test_streamable(self, gw):
        """bob (and a JWT subject) presenting alice's session id get 404, for POST, GET and DELETE."""
        with wire.http_client(gw.url) as c:
            sid = open_session(c, ALICE)
            ping = wire.request(2, "ping")
            for other in (BOB, live_jwt("alice")):
                r = c.post("/mcp", headers={**session_headers(sid), **auth(other)}, json=ping)
                wire.assert_jsonrpc_error(r, 404, wire.SESSION_NOT_FOUND)
                r = c.get("/mcp", headers={"accept": "text/event-stream", "mcp-session-id": sid, **auth(other)})
                assert r.status_code == 404
                assert c.delete("/mcp", headers={"mcp-session-id": sid, **auth(other)}).status_code == 404
            r = c.post("/mcp", headers={**session_headers(sid), **auth(ALICE)}, json=ping)
            assert r.status_code == 200 and r.json()["result"] == {}
            assert wire.delete_session(c, sid) == 401
            assert c.delete("/mcp", headers={"mcp-session-id": sid, **auth(ALICE)}).status_code == 200

    def test_legacy(self, gw):
        with wire.http_client(gw.url) as c, \
                c.stream("GET", "/sse", headers={"accept": "text/event-stream", **auth(ALICE)}) as r:
            events = wire.sse_events(r)  # held: dropping it closes the stream
            endpoint = next(events).data
            r2 = c.post(endpoint, json=wire.request(1, "ping"), headers=auth(BOB))
            wire.assert_jsonrpc_error(r2, 404, wire.SESSION_NOT_FOUND)
            assert c.post(endpoint, json=wire.request(1, "ping"), headers=auth(ALICE)).status_code == 202


def env_of_a_child(c: httpx.Client, token: str) -> dict[str, str]:
    sid = open_session(c, token)
    r = c.post("/mcp", headers={**session_headers(sid), **auth(token)}, json=wire.tool_call(3, "env"))
    [reply] = wire.messages_of(r)
    c.delete("/mcp", headers={"mcp-session-id": sid, **auth(token)})
    return json.loads(reply["result"]["content"][0]["text"])


@pytest.mark.integration
class TestChildEnvironment:
    def test_minimal_and_explicit(self, gw):
        """PATH, HOME, LC_*, the server's env and inheritEnv names; none of the gateway's own."""
        with wire.http_client(gw.url) as c:
            env = env_of_a_child(c, ALICE)
        # MCPGW_CHILD: the child's tag, by which its escaped helpers are found (mcpgw.procsec).
        allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "FROM_CONFIG", "PASS_ME", "MCPGW_CHILD"}
        # A child's own interpreter may set a few of its own (Python: LC_CTYPE coercion).
        extra = {k for k in env if k not in allowed and not k.startswith("LC_")}
        assert extra <= {"PYTHONIOENCODING", "PWD", "SHLVL", "_"}, extra
        assert env["FROM_CONFIG"] == "yes" and env["PASS_ME"] == "inherited" and env["LC_ALL"] == "C.UTF-8"
        assert "PATH" in env

    def test_no_secret_or_token_reaches_a_child(self, gw):
        """Not SESSION_SECRET, REDIS_PASSWORD, tokens; not the client's Authorization (by name or value)."""
        token = live_jwt("dave")
        with wire.http_client(gw.url) as c:
            env = env_of_a_child(c, token)
        text = json.dumps(env)
        for name in ("SESSION_SECRET", "MCPGW_AUTH_TOKENS", "MCPGW_JWT_SECRET", "SOME_GATEWAY_VARIABLE"):
            assert name not in env
        for value in (*SECRETS_ENV.values(), token, ALICE):
            if value not in ("C.UTF-8", "inherited"):
                assert value not in text

    def test_websocket_child_too(self, gw):
        async def go() -> dict[str, str]:
            async with connect(f"ws://127.0.0.1:{gw.port}/ws", subprotocols=["mcp"], additional_headers=auth(ALICE)) as ws:
                await ws.send(json.dumps(wire.initialize()))
                await ws.recv()
                await ws.send(json.dumps(wire.tool_call(2, "env")))
                return json.loads(json.loads(await ws.recv())["result"]["content"][0]["text"])
        env = asyncio.run(go())
        assert "SESSION_SECRET" not in env and ALICE not in json.dumps(env)
