"""Issue 15, "Also seen": config that a careless operator or a hostile client could turn into
a problem.

- ``REDIS_PASSWORD`` without ``redis`` / ``REDIS_URL`` is a config error naming both: a password
  alone says nothing about where Redis is, and silently turning cluster mode on at a default
  address made a single gateway depend on a Redis it was never told about.
- Server names are ``[A-Za-z0-9_-]{1,64}``: a name is a path segment (``/servers/NAME/mcp``), and a
  server named ``..`` was reached by clients that normalise paths when they asked for another one.
  Refused in the config file and through the admin API, with an error that says what is allowed.
- Error bodies never carry an internal host name or address: a Redis outage answers 503 with
  "session store unavailable", ``/ready`` names the problem but not where Redis is; the log keeps
  the address for the operator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ConfigError, parse
from mcpgw.session import SessionIds
from tests.gateway_process import TWISTD, fixture_server, wait_until
from tests.mcp_raw import ACCEPT_BOTH, initialize_request
from tests.redis_server import free_port

SERVERS = {"fx": {"command": sys.executable}}
BAD_NAMES = ["..", ".", "a/b", "a b", "x.y", "", "a" * 65, "a\nb", "caf\u00e9", "%2e%2e"]
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SECRET = "0123456789abcdef0123456789abcdef"


class RedisPasswordTests(SynchronousTestCase):
    def test_password_alone_is_an_error_naming_both(self) -> None:
        """REDIS_PASSWORD with neither a redis section nor REDIS_URL: ConfigError on one line
        naming REDIS_PASSWORD, redis and REDIS_URL."""
        for doc in ({"mcpServers": SERVERS}, {"mcpServers": SERVERS, "redis": None}):
            with self.assertRaises(ConfigError) as e:
                parse(doc, {"REDIS_PASSWORD": "hunter2"})
            message = str(e.exception)
            self.assertEqual(e.exception.key, "REDIS_PASSWORD")
            self.assertIn("redis", e.exception.problem)
            self.assertIn("REDIS_URL", message)
            self.assertNotIn("hunter2", message)
            self.assertNotIn("\n", message)

    def test_password_with_a_place_to_use_it(self) -> None:
        """With REDIS_URL, or a redis section in the file, the password is Redis's."""
        config = parse({"mcpServers": SERVERS}, {"REDIS_PASSWORD": "p", "REDIS_URL": "redis://cache:6380/1"})
        self.assertEqual((config.redis.url, config.redis.password), ("redis://cache:6380/1", "p"))
        config = parse({"mcpServers": SERVERS, "redis": {"url": "redis://cache:6380/1"}}, {"REDIS_PASSWORD": "p"})
        self.assertEqual((config.redis.url, config.redis.password), ("redis://cache:6380/1", "p"))
        self.assertIsNone(parse({"mcpServers": SERVERS}, {}).redis)


class ServerNameTests(SynchronousTestCase):
    def test_bad_names_are_refused(self) -> None:
        """Each bad name: a one-line ConfigError under mcpServers saying which names are usable."""
        for name in BAD_NAMES:
            with self.assertRaises(ConfigError, msg=repr(name)) as e:
                parse({"mcpServers": {name: {"command": sys.executable}}}, {})
            self.assertTrue(e.exception.key.startswith("mcpServers."), e.exception.key)
            self.assertIn("letters, digits, '_' and '-' only", e.exception.problem)
            self.assertNotIn("\n", str(e.exception))

    def test_good_names(self) -> None:
        for name in ("fx", "time_2", "My-Server", "a" * 64):
            self.assertIn(name, parse({"mcpServers": {name: {"command": sys.executable}}}, {}).servers)

    def test_aggregate_name(self) -> None:
        """The aggregate is served at /servers/NAME too: the same rule."""
        for name in ("..", "all.of.them", "a b"):
            with self.assertRaises(ConfigError) as e:
                parse({"mcpServers": SERVERS, "aggregate": {"name": name}}, {})
            self.assertEqual(e.exception.key, "aggregate.name")


# -- real gateways -----------------------------------------------------------------------------


def start_twistd(config: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``twistd mcpgw`` with a config it must refuse: it exits at once."""
    with tempfile.TemporaryDirectory(prefix="mcpgw-test-") as d:
        path = os.path.join(d, "gateway.json")
        with open(path, "w") as f:
            json.dump({"host": "127.0.0.1", "port": 0, **config}, f)
        return subprocess.run([*TWISTD, "mcpgw", "--config", path, "--listen", "tcp:0:interface=127.0.0.1"],
                              capture_output=True, text=True, timeout=30, cwd=d,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}, **(env or {})})


@pytest.mark.integration
def test_startup_refuses_password_alone_and_bad_names():
    """Exit 2 with one ``mcpgw: config error: KEY: ...`` line, nothing listening."""
    out = start_twistd({"mcpServers": {"fx": fixture_server()}}, {"REDIS_PASSWORD": "hunter2"})
    assert out.returncode == 2, out
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("mcpgw: config error:")]
    assert line and line[0].startswith("mcpgw: config error: REDIS_PASSWORD: ") and "REDIS_URL" in line[0], out.stderr
    assert "hunter2" not in out.stderr + out.stdout
    out = start_twistd({"mcpServers": {"..": fixture_server()}})
    assert out.returncode == 2 and "mcpgw: config error: mcpServers...: " in out.stderr, out.stderr


@pytest.mark.integration
def test_admin_api_refuses_bad_server_names(make_gateway):
    """POST /admin/servers with '..', 'a/b', 'a b' (and the rest): 400 naming ``name`` and the rule;
    nothing is added; a good name is 201."""
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "admin": {"token": ADMIN_TOKEN}})
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    for name in BAD_NAMES:
        r = httpx.post(gw.url + "/admin/servers", headers=auth, json={"name": name, **fixture_server()}, timeout=10)
        if name == "":
            assert r.status_code == 400 and "name: required" in r.text, r.text
            continue
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"].startswith("name: ") and "letters, digits, '_' and '-' only" in r.text, r.text
    servers = httpx.get(gw.url + "/admin/servers", headers=auth, timeout=10).json()["servers"]
    assert [s["name"] for s in servers] == ["fx"]
    r = httpx.post(gw.url + "/admin/servers", headers=auth, json={"name": "extra_2", **fixture_server()}, timeout=10)
    assert r.status_code == 201, r.text


@pytest.mark.integration
def test_redis_outage_bodies_name_no_internal_address(make_gateway):
    """Redis at ``localhost:<port>`` with nothing listening: /ready, a new session and a session
    owned elsewhere all answer 503 without the host name or port; the log has both."""
    port = free_port()
    gw = make_gateway({"mcpServers": {"fx": fixture_server()}, "session": {"secret": SECRET},
                       "redis": {"url": f"redis://localhost:{port}/0", "timeout": 0.5, "heartbeat": 0.5}})
    assert wait_until(lambda: "connection refused" in httpx.get(gw.url + "/ready").text, 10), gw.log()
    headers = {"accept": ACCEPT_BOTH, "content-type": "application/json"}
    bodies = {
        "ready": httpx.get(gw.url + "/ready"),
        "initialize": httpx.post(gw.url + "/mcp", content=json.dumps(initialize_request()), headers=headers),
        # A well-formed id this gateway did not make: it would be looked up in Redis.
        "elsewhere": httpx.post(gw.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                headers={**headers, "mcp-session-id": SessionIds(SECRET).new()}),
    }
    for what, r in bodies.items():
        assert r.status_code == 503, (what, r.status_code, r.text)
        assert "localhost" not in r.text and str(port) not in r.text and "redis://" not in r.text, (what, r.text)
    assert bodies["ready"].json()["problems"] == ["redis: connection refused"]
    assert "session store unavailable" in bodies["initialize"].text
    assert "session store unavailable" in bodies["elsewhere"].text
    assert f"redis://localhost:{port}/0" in gw.log()  # the operator still learns where
