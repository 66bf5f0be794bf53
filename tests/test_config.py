"""mcpgw.config: defaults, strict checks naming the key, environment overrides; and startup on a bad config."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import tap
from mcpgw.config import (
    CLIENT_SECRET_ENV,
    DEFAULT_MAX_MESSAGE_BYTES,
    PRIVATE_ENV,
    AggregateServer,
    ConfigError,
    GatewayConfig,
    OAuthConfig,
    RemoteServer,
    ServerConfig,
    StdioServer,
    load,
    parse,
)
from mcpgw.upstream.stdio import child_environment
from tests.gateway_process import TWISTD

ROOT = Path(__file__).resolve().parent.parent
#: An absolute command that exists everywhere the tests run.
COMMAND = sys.executable


def doc(**top: Any) -> dict[str, Any]:
    """A minimal valid config document, with ``top`` merged in."""
    return {"mcpServers": {"s": {"command": COMMAND}}, **top}


def server(**spec: Any) -> dict[str, Any]:
    """A document whose one server ``s`` has ``spec`` on top of a valid command."""
    return {"mcpServers": {"s": {"command": COMMAND, **spec}}}


class ConfigTestCase(SynchronousTestCase):
    def parse(self, raw: Any, environ: dict[str, str] | None = None) -> GatewayConfig:
        return parse(raw, {} if environ is None else environ)

    def error(self, raw: Any, environ: dict[str, str] | None = None) -> ConfigError:
        with self.assertRaises(ConfigError) as ctx:
            self.parse(raw, environ)
        return ctx.exception

    def assertKey(self, raw: Any, key: str, environ: dict[str, str] | None = None) -> ConfigError:
        e = self.error(raw, environ)
        self.assertEqual(e.key, key, str(e))
        self.assertTrue(str(e).startswith(key + ": "), str(e))
        self.assertNotIn("\n", str(e))
        return e


class DefaultsTests(ConfigTestCase):
    def setUp(self) -> None:
        self.config = self.parse(doc())

    def test_listen(self) -> None:
        """Port 3000 on loopback by default, metrics on the same interface."""
        self.assertEqual((self.config.port, self.config.host, self.config.metrics.host), (3000, "127.0.0.1", "127.0.0.1"))

    def test_logLevel(self) -> None:
        """The log level defaults to info."""
        self.assertEqual(self.config.logLevel, "info")

    def test_sections(self) -> None:
        """Each section has its documented defaults; Redis is off."""
        c = self.config
        self.assertEqual((c.cors.enabled, c.cors.origins), (True, ()))
        self.assertEqual((c.rateLimit.enabled, c.rateLimit.max, c.rateLimit.window), (False, 100, "15m"))
        self.assertEqual((c.session.secret, c.session.idleSeconds, c.session.lifetimeSeconds), (None, 3600.0, 86400.0))
        self.assertEqual((c.sse.keepalive, c.sse.replayEvents, c.sse.retry), (15.0, 256, 1000))
        self.assertIsNone(c.redis)
        self.assertEqual((c.metrics.enabled, c.metrics.port), (True, 9091))
        self.assertEqual(c.auth.bearerTokens, ())
        self.assertEqual(c.maxBodyBytes, DEFAULT_MAX_MESSAGE_BYTES)

    def test_server(self) -> None:
        """A server needs only a command; the rest defaults and the executable is resolved."""
        s = self.config.servers["s"]
        self.assertEqual((s.name, s.command, s.args, dict(s.env), s.cwd, s.default), ("s", COMMAND, (), {}, None, False))
        self.assertEqual((s.maxMessageBytes, s.stopGrace), (DEFAULT_MAX_MESSAGE_BYTES, 0.5))
        self.assertEqual(s.executable, os.path.abspath(COMMAND))

    def test_defaultServerIsFirst(self) -> None:
        """Without a "default": true, the first server is the default."""
        config = self.parse({"mcpServers": {"a": {"command": COMMAND}, "b": {"command": COMMAND}}})
        self.assertEqual(config.default_server.name, "a")

    def test_defaultServerMarked(self) -> None:
        """The server marked "default": true is the default."""
        config = self.parse({"mcpServers": {"a": {"command": COMMAND}, "b": {"command": COMMAND, "default": True}}})
        self.assertEqual(config.default_server.name, "b")

    def test_disabledServerSkipped(self) -> None:
        """A server with "disabled": true is left out (and not checked)."""
        config = self.parse({"mcpServers": {"a": {"command": COMMAND}, "off": {"command": "nope", "disabled": True}}})
        self.assertEqual(list(config.servers), ["a"])

    def test_serverPathLookup(self) -> None:
        """A bare command is found on the PATH of the server's env, else the gateway's."""
        bindir = os.path.dirname(COMMAND)
        name = os.path.basename(COMMAND)
        config = self.parse({"mcpServers": {"s": {"command": name, "env": {"PATH": bindir}}}})
        self.assertEqual(config.servers["s"].executable, os.path.join(bindir, name))


#: A wrong-typed value for every top-level key.
TOP_LEVEL_WRONG = {
    "port": "3000",
    "host": 127001,
    "logLevel": 5,
    "cors": ["*"],
    "rateLimit": "on",
    "session": "secret",
    "sse": 15,
    "websocket": "on",
    "redis": "redis://127.0.0.1",
    "metrics": True,
    "auth": ["token"],
    "mcpServers": [{"command": COMMAND}],
    "maxBodyBytes": "1MB",
}


class TopLevelTypeTests(ConfigTestCase):
    """One generated test per top-level key (see below)."""

    def test_notAnObject(self) -> None:
        """A document that is not an object is an error."""
        e = self.error(["mcpServers"])
        self.assertIn("must be an object", str(e))

    def test_boolIsNotANumber(self) -> None:
        """true is not accepted where a number is expected."""
        self.assertKey(doc(port=True), "port")


def _wrong_type_test(key: str, value: Any) -> Any:
    def test(self: ConfigTestCase) -> None:
        raw = doc() if key == "mcpServers" else doc(**{key: value})
        raw[key] = value
        e = self.assertKey(raw, key)
        self.assertIn("must be", e.problem)

    test.__doc__ = f"A wrong type for {key!r} ({json.dumps(value)}) is a ConfigError naming {key!r}."
    return test


for _key, _value in TOP_LEVEL_WRONG.items():
    setattr(TopLevelTypeTests, f"test_{_key}", _wrong_type_test(_key, _value))


class NestedValueTests(ConfigTestCase):
    def test_portRange(self) -> None:
        """A port outside 0..65535 is an error naming the port."""
        self.assertKey(doc(port=70000), "port")

    def test_logLevelUnknown(self) -> None:
        """An unknown log level is an error listing the levels."""
        e = self.assertKey(doc(logLevel="loud"), "logLevel")
        self.assertIn("debug", e.problem)

    def test_logLevelWarning(self) -> None:
        """"warning" (any case) is accepted as warn."""
        self.assertEqual(self.parse(doc(logLevel="WARNING")).logLevel, "warn")

    def test_corsEnabled(self) -> None:
        """cors.enabled must be a boolean."""
        self.assertKey(doc(cors={"enabled": "yes"}), "cors.enabled")

    def test_corsOriginsItem(self) -> None:
        """A non-string origin names its index."""
        self.assertKey(doc(cors={"origins": ["https://a.example", 3]}), "cors.origins[1]")

    def test_rateLimitWindow(self) -> None:
        """rateLimit.window must be a duration like 15m."""
        self.assertKey(doc(rateLimit={"window": "15 minutes"}), "rateLimit.window")

    def test_rateLimitMax(self) -> None:
        """rateLimit.max must be positive."""
        self.assertKey(doc(rateLimit={"max": 0}), "rateLimit.max")

    def test_sessionMaxAge(self) -> None:
        """session.maxAge must be a positive integer."""
        self.assertKey(doc(session={"maxAge": -1}), "session.maxAge")

    def test_sessionSecret(self) -> None:
        """session.secret must be a string."""
        self.assertKey(doc(session={"secret": 1234}), "session.secret")

    def test_sseKeepalive(self) -> None:
        """sse.keepalive must be a positive number."""
        self.assertKey(doc(sse={"keepalive": "15"}), "sse.keepalive")

    def test_sseKeepaliveFloat(self) -> None:
        """sse.keepalive may be fractional."""
        self.assertEqual(self.parse(doc(sse={"keepalive": 0.5})).sse.keepalive, 0.5)

    def test_sseReplayEvents(self) -> None:
        """sse.replayEvents must be an integer."""
        self.assertKey(doc(sse={"replayEvents": 1.5}), "sse.replayEvents")

    def test_redisUrl(self) -> None:
        """redis.url must be a redis URL."""
        self.assertKey(doc(redis={"url": "http://127.0.0.1"}), "redis.url")

    def test_redisNull(self) -> None:
        """"redis": null leaves Redis off."""
        self.assertIsNone(self.parse(doc(redis=None)).redis)

    def test_metricsPort(self) -> None:
        """metrics.port must be a port."""
        self.assertKey(doc(metrics={"port": 65536}), "metrics.port")

    def test_bearerTokens(self) -> None:
        """auth.bearerTokens must be a list of strings."""
        self.assertKey(doc(auth={"bearerTokens": "token"}), "auth.bearerTokens")

    def test_maxBodyBytes(self) -> None:
        """maxBodyBytes must be positive."""
        self.assertKey(doc(maxBodyBytes=0), "maxBodyBytes")


class UnknownKeyTests(ConfigTestCase):
    def test_topLevel(self) -> None:
        """An unknown top-level key is named, with the allowed keys."""
        e = self.assertKey(doc(prot=3000), "prot")
        self.assertIn("unknown key", e.problem)
        self.assertIn("port", e.problem)

    def test_nested(self) -> None:
        """An unknown key inside a section is named by its path (cors.origin for cors.origins)."""
        e = self.assertKey(doc(cors={"origin": ["*"]}), "cors.origin")
        self.assertIn("origins", e.problem)

    def test_inSession(self) -> None:
        """Key names are case-sensitive: session.maxage is unknown."""
        self.assertKey(doc(session={"maxage": 1}), "session.maxage")

    def test_inServer(self) -> None:
        """An unknown key in a server is named by its full path."""
        self.assertKey(server(comand="x"), "mcpServers.s.comand")


class ServerTests(ConfigTestCase):
    def test_noMcpServers(self) -> None:
        """A config without mcpServers is an error naming mcpServers."""
        e = self.assertKey({"port": 3000}, "mcpServers")
        self.assertIn("required", e.problem)

    def test_emptyMcpServers(self) -> None:
        """An empty mcpServers is an error."""
        e = self.assertKey({"mcpServers": {}}, "mcpServers")
        self.assertIn("empty", e.problem)

    def test_allDisabled(self) -> None:
        """Only disabled servers count as none."""
        self.assertKey({"mcpServers": {"a": {"command": COMMAND, "disabled": True}}}, "mcpServers")

    def test_commandNotFound(self) -> None:
        """A command that does not exist names mcpServers.NAME.command and the command."""
        e = self.assertKey({"mcpServers": {"time": {"command": "mcp-server-tim"}}}, "mcpServers.time.command",
                           {"PATH": os.environ["PATH"]})
        self.assertEqual(e.problem, f"'mcp-server-tim' was not found on PATH or in {os.path.dirname(sys.executable)} "
                                    "(beside the running Python), or is not executable")

    def test_commandNotExecutable(self) -> None:
        """A path to a file that is not executable is refused."""
        with tempfile.NamedTemporaryFile() as f:
            self.assertKey({"mcpServers": {"s": {"command": f.name}}}, "mcpServers.s.command")

    def test_commandMissing(self) -> None:
        """A server without command is an error naming mcpServers.NAME.command."""
        self.assertKey({"mcpServers": {"s": {"args": []}}}, "mcpServers.s.command")

    def test_commandType(self) -> None:
        """command must be a string."""
        self.assertKey({"mcpServers": {"s": {"command": [COMMAND]}}}, "mcpServers.s.command")

    def test_serverNotObject(self) -> None:
        """A server given as a string names the server."""
        self.assertKey({"mcpServers": {"s": COMMAND}}, "mcpServers.s")

    def test_serverName(self) -> None:
        """Server names are restricted to URL-safe characters."""
        self.assertKey({"mcpServers": {"a b": {"command": COMMAND}}}, "mcpServers.a b")

    def test_argsItem(self) -> None:
        """A non-string arg names its index."""
        self.assertKey(server(args=["-v", 2]), "mcpServers.s.args[1]")

    def test_envValue(self) -> None:
        """A non-string env value names the variable."""
        self.assertKey(server(env={"DEBUG": 1}), "mcpServers.s.env.DEBUG")

    def test_cwdMissing(self) -> None:
        """A cwd that is not a directory is refused."""
        self.assertKey(server(cwd="/nonexistent/dir"), "mcpServers.s.cwd")

    def test_defaultType(self) -> None:
        """default must be a boolean."""
        self.assertKey(server(default="yes"), "mcpServers.s.default")

    def test_disabledType(self) -> None:
        """disabled must be a boolean: "true" as a string does not silently leave the server on."""
        self.assertKey(server(disabled="true"), "mcpServers.s.disabled")

    def test_maxMessageBytes(self) -> None:
        """maxMessageBytes must be positive."""
        self.assertKey(server(maxMessageBytes=0), "mcpServers.s.maxMessageBytes")

    def test_stopGrace(self) -> None:
        """stopGrace must be a positive number."""
        self.assertKey(server(stopGrace="1s"), "mcpServers.s.stopGrace")

    def test_twoDefaults(self) -> None:
        """Two defaults: the second is named, and the first mentioned."""
        e = self.assertKey({"mcpServers": {"a": {"command": COMMAND, "default": True},
                                           "b": {"command": COMMAND, "default": True}}}, "mcpServers.b.default")
        self.assertIn("also a", e.problem)


class EnvironmentTests(ConfigTestCase):
    def test_logLevel(self) -> None:
        """LOG_LEVEL overrides logLevel, case-insensitively."""
        self.assertEqual(self.parse(doc(logLevel="info"), {"LOG_LEVEL": "DEBUG"}).logLevel, "debug")

    def test_badLogLevel(self) -> None:
        """A bad LOG_LEVEL is an error naming logLevel."""
        self.assertKey(doc(), "logLevel", {"LOG_LEVEL": "chatty"})

    def test_sessionSecret(self) -> None:
        """SESSION_SECRET sets session.secret and keeps the file's other session keys."""
        config = self.parse(doc(session={"maxAge": 5000, "secret": "file"}), {"SESSION_SECRET": "env"})
        self.assertEqual((config.session.secret, config.session.idleSeconds), ("env", 5.0))

    def test_sessionSecretWithBadSession(self) -> None:
        """SESSION_SECRET with a non-object session is still a ConfigError naming session."""
        self.assertKey(doc(session="x"), "session", {"SESSION_SECRET": "env"})

    def test_port(self) -> None:
        """MCPGW_PORT overrides port."""
        self.assertEqual(self.parse(doc(port=3000), {"MCPGW_PORT": "8080"}).port, 8080)

    def test_badPort(self) -> None:
        """A non-integer MCPGW_PORT is an error naming MCPGW_PORT."""
        e = self.assertKey(doc(), "MCPGW_PORT", {"MCPGW_PORT": "eighty"})
        self.assertIn("'eighty'", e.problem)

    def test_portOutOfRange(self) -> None:
        """An MCPGW_PORT outside 0..65535 is refused."""
        self.assertKey(doc(), "port", {"MCPGW_PORT": "70000"})

    def test_host(self) -> None:
        """MCPGW_HOST overrides host."""
        self.assertEqual(self.parse(doc(host="0.0.0.0"), {"MCPGW_HOST": "127.0.0.1"}).host, "127.0.0.1")

    def test_redisUrl(self) -> None:
        """REDIS_URL turns Redis on with that URL."""
        config = self.parse(doc(), {"REDIS_URL": "redis://cache:6380/1"})
        self.assertEqual((config.redis.url, config.redis.password), ("redis://cache:6380/1", None))

    def test_redisPassword(self) -> None:
        """REDIS_PASSWORD alone is an error naming it (tests/test_hostile_config.py has the rest)."""
        self.assertKey(doc(), "REDIS_PASSWORD", {"REDIS_PASSWORD": "hunter2"})

    def test_redisOverridesFile(self) -> None:
        """REDIS_URL and REDIS_PASSWORD override the file's redis section."""
        config = self.parse(doc(redis={"url": "redis://file", "password": "file"}),
                            {"REDIS_URL": "rediss://env", "REDIS_PASSWORD": "env"})
        self.assertEqual((config.redis.url, config.redis.password), ("rediss://env", "env"))

    def test_badRedisUrl(self) -> None:
        """A bad REDIS_URL is an error naming redis.url."""
        self.assertKey(doc(), "redis.url", {"REDIS_URL": "localhost:6379"})

    def test_redisEnvWithBadRedis(self) -> None:
        """REDIS_URL with a non-object redis section is still a ConfigError naming redis."""
        self.assertKey(doc(redis="redis://file"), "redis", {"REDIS_URL": "redis://env"})

    def test_redisEnvWithListRedis(self) -> None:
        """A redis section given as a list of pairs is refused, even when REDIS_PASSWORD is set."""
        self.assertKey(doc(redis=[["url", "redis://file"]]), "redis", {"REDIS_PASSWORD": "p"})

    def test_unrelatedEnvironmentIgnored(self) -> None:
        """Variables the gateway does not know change nothing."""
        self.assertEqual(self.parse(doc(), {"PORT": "1", "HOST": "x"}), self.parse(doc()))


class ServerKindTests(ConfigTestCase):
    """Each kind of server is its own record, holding only its kind's fields."""

    def test_stdio(self) -> None:
        """A ``command`` entry is a StdioServer, with the pool options and no remote fields."""
        s = self.parse(server(sessions="pooled", poolSize=2)).servers["s"]
        self.assertIsInstance(s, StdioServer)
        self.assertIsInstance(s, ServerConfig)
        self.assertEqual((s.kind, s.sessions, s.poolSize), ("stdio", "pooled", 2))
        self.assertFalse(hasattr(s, "url") or hasattr(s, "members"))

    def test_remote(self) -> None:
        """A ``url`` entry is a RemoteServer: no command, no pool options."""
        config = self.parse({"mcpServers": {"r": {"url": "https://mcp.example.com/mcp", "transport": "sse",
                                                  "headers": {"Authorization": "Bearer ${TOKEN}"}}}}, {"TOKEN": "t"})
        r = config.servers["r"]
        self.assertIsInstance(r, RemoteServer)
        self.assertEqual((r.kind, r.url, r.transport, dict(r.headers)),
                         ("remote", "https://mcp.example.com/mcp", "sse", {"Authorization": "Bearer t"}))
        self.assertFalse(hasattr(r, "command") or hasattr(r, "poolSize") or hasattr(r, "warmPool"))

    def test_remoteRefusesPoolOptions(self) -> None:
        """Pooling is a stdio server's option: on a remote server it is an unknown key."""
        self.assertKey({"mcpServers": {"r": {"url": "https://mcp.example.com/mcp", "poolSize": 2}}},
                       "mcpServers.r.poolSize")

    def test_aggregate(self) -> None:
        """``aggregate`` is an AggregateServer whose members are the other servers' own records."""
        config = self.parse({"mcpServers": {"a": {"command": COMMAND}, "b": {"command": COMMAND}},
                             "aggregate": {"servers": ["b", "a"], "prefix": "on-collision"}})
        agg = config.servers["all"]
        self.assertIsInstance(agg, AggregateServer)
        self.assertEqual((agg.kind, agg.prefix, agg.separator), ("aggregate", "on-collision", "__"))
        self.assertEqual(agg.members, (config.servers["b"], config.servers["a"]))
        self.assertFalse(hasattr(agg, "command") or hasattr(agg, "url"))


class SessionDurationTests(ConfigTestCase):
    def test_millisecondsInTheFileSecondsInTheRecord(self) -> None:
        """session.maxAge and session.maxLifetime are written in ms and held in seconds."""
        s = self.parse(doc(session={"maxAge": 1500, "maxLifetime": 90_000})).session
        self.assertEqual((s.idleSeconds, s.lifetimeSeconds), (1.5, 90.0))
        self.assertIsNone(self.parse(doc(session={"maxLifetime": None})).session.lifetimeSeconds)


#: A valid ``auth.oauth`` for the one server ``s`` of ``doc()``.
OAUTH = {"resource": "https://gw.example.com", "authorizationServers": ["https://as.example.com"],
         "scopes": {"s": ["files:read"]}, "toolScopes": {"s": {"read": ["files:read"]}}}


class OAuthTests(ConfigTestCase):
    """``auth.oauth`` is part of ``auth``, checked against the configured servers."""

    def test_parsed(self) -> None:
        """auth.oauth becomes AuthConfig.oauth, and turns auth on by itself."""
        auth = self.parse(doc(auth={"oauth": OAUTH})).auth
        self.assertIsInstance(auth.oauth, OAuthConfig)
        assert auth.oauth is not None
        self.assertEqual((auth.oauth.resource, auth.oauth.authorizationServers, dict(auth.oauth.scopes)),
                         ("https://gw.example.com", ("https://as.example.com",), {"s": ("files:read",)}))
        self.assertTrue(auth.enabled)
        self.assertIsNone(self.parse(doc()).auth.oauth)

    def test_badValueNamesItsKey(self) -> None:
        """A problem inside auth.oauth names its whole key path."""
        self.assertKey(doc(auth={"oauth": {**OAUTH, "resource": "http://gw.example.com"}}), "auth.oauth.resource")

    def test_unknownServerInScopes(self) -> None:
        """Scopes for a server that is not configured are refused, naming the server's key."""
        self.assertKey(doc(auth={"oauth": {**OAUTH, "scopes": {"nope": ["x"]}}}), "auth.oauth.scopes.nope")
        self.assertKey(doc(auth={"oauth": {**OAUTH, "toolScopes": {"nope": {"t": ["x"]}}}}),
                       "auth.oauth.toolScopes.nope")

    def test_disabledServerIsUnknown(self) -> None:
        """A disabled server is not configured: scopes for it are refused too."""
        raw = {"mcpServers": {"s": {"command": COMMAND}, "off": {"command": COMMAND, "disabled": True}},
               "auth": {"oauth": {**OAUTH, "scopes": {"off": ["x"]}}}}
        self.assertKey(raw, "auth.oauth.scopes.off")

    def test_aggregateServerIsKnown(self) -> None:
        """The aggregated server is a server like the others: it may have scopes of its own."""
        config = self.parse(doc(aggregate={}, auth={"oauth": {**OAUTH, "scopes": {"all": ["x"]}}}))
        assert config.auth.oauth is not None
        self.assertEqual(config.auth.oauth.scopes["all"], ("x",))

    def test_clientSecretFromEnvironment(self) -> None:
        """MCPGW_OAUTH_CLIENT_SECRET supplies (or overrides) introspection.clientSecret."""
        raw = doc(auth={"oauth": {**OAUTH, "introspection": {"clientId": "gw"}}})
        self.assertKey(raw, "auth.oauth.introspection.clientSecret")
        oauth = self.parse(raw, {CLIENT_SECRET_ENV: "from-env"}).auth.oauth
        assert oauth is not None and oauth.introspection is not None
        self.assertEqual(oauth.introspection.clientSecret, "from-env")
        raw["auth"]["oauth"]["introspection"]["clientSecret"] = "from-file"
        oauth = self.parse(raw, {CLIENT_SECRET_ENV: "from-env"}).auth.oauth
        assert oauth is not None and oauth.introspection is not None
        self.assertEqual(oauth.introspection.clientSecret, "from-env")

    def test_clientSecretIsPrivate(self) -> None:
        """The client secret's variable is the gateway's own: no inheritEnv passes it to a child."""
        self.assertEqual(CLIENT_SECRET_ENV, "MCPGW_OAUTH_CLIENT_SECRET")
        self.assertIn(CLIENT_SECRET_ENV, PRIVATE_ENV)
        self.assertKey(server(inheritEnv=[CLIENT_SECRET_ENV]), "mcpServers.s.inheritEnv[0]")
        child = StdioServer(name="s", command=COMMAND, inheritEnv=(CLIENT_SECRET_ENV,))
        self.assertNotIn(CLIENT_SECRET_ENV, child_environment(child, {CLIENT_SECRET_ENV: "secret", "PATH": "/bin"}))


class LoadTests(ConfigTestCase):
    def test_repoConfig(self) -> None:
        """conf/gateway.json loads: the time server, default, on port 3000."""
        config = load(str(ROOT / "conf" / "gateway.json"), {"PATH": os.environ["PATH"]})
        self.assertEqual(config.default_server.name, "time")
        self.assertEqual(config.default_server.args, ("--local-timezone", "UTC"))
        self.assertEqual(config.port, 3000)

    def test_missingFile(self) -> None:
        """An unreadable file is an error naming --config."""
        with self.assertRaises(ConfigError) as ctx:
            load("/nonexistent/gateway.json", {})
        self.assertEqual(ctx.exception.key, "--config")

    def test_badJson(self) -> None:
        """A file that is not JSON is an error naming --config."""
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write("{port: 3000}")
            f.flush()
            with self.assertRaises(ConfigError) as ctx:
                load(f.name, {})
        self.assertEqual(ctx.exception.key, "--config")
        self.assertIn("not valid JSON", ctx.exception.problem)


class MakeServiceTests(SynchronousTestCase):
    def test_configErrorOneLine(self) -> None:
        """makeService on a bad config writes one 'mcpgw: config error:' line and exits with status 2."""
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump({"mcpServers": {}}, f)
            f.flush()
            options = tap.Options()
            options.parseOptions(["--config", f.name])
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as ctx:
                tap.makeService(options, reactor=object())
        self.assertEqual(ctx.exception.code, 2)
        self.assertEqual(err.getvalue(), "mcpgw: config error: mcpServers: is empty: configure at least one MCP server\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_twistd_stops_on_bad_config(tmp_path: Path) -> None:
    """The real ``twistd -n mcpgw`` on a bad config: non-zero exit, one line naming the key, nothing listening."""
    port = _free_port()
    bad = tmp_path / "BAD.json"
    bad.write_text(json.dumps({"host": "127.0.0.1", "port": port, "mcpServers": {"time": {"command": "mcp-server-tim"}}}))
    proc = subprocess.run([*TWISTD, "mcpgw", "--config", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    output = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in output if line.startswith("mcpgw: config error:")]
    assert proc.returncode != 0, output
    assert len(errors) == 1, output
    assert "mcpServers.time.command" in errors[0]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something listens on {port}"
