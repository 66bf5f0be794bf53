"""Issue 11, point 2: the admin API (``/admin/``), every endpoint, against a real gateway process;
its auth (off without a token, 401 without the right one); drain; the stats ring (unit, on a Clock);
the ``admin`` config section.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, ClassVar

import httpx
import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from mcpgw.admin import AdminAuth
from mcpgw.config import PRIVATE_ENV, ConfigError, parse
from mcpgw.metrics import Metrics
from mcpgw.stats import StatsSampler, quantile
from tests import wire
from tests.gateway_process import fixture_server, pid_alive, wait_until

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def admin_config(**extra: Any) -> dict[str, Any]:
    return wire.config(admin={"token": TOKEN, "statsInterval": 0.2}, **extra)


@pytest.fixture(scope="module")
def gw(make_module_gateway):
    return make_module_gateway(admin_config())


@pytest.fixture
def client(gw):
    with wire.http_client(gw.url, timeout=20) as c:
        yield c


def api(client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    return client.request(method, "/admin/" + path, headers={**AUTH, **kw.pop("headers", {})}, **kw)


def call(client: httpx.Client, sid: str, msg: dict[str, Any], path: str = "/mcp") -> httpx.Response:
    return client.post(path, headers=wire.session_headers(sid), json=msg)


def result_text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    [reply] = [m for m in wire.messages_of(response) if "id" in m]
    return reply["result"]["content"][0]["text"]


ENDPOINTS = [
    ("GET", ""), ("GET", "servers"), ("POST", "servers"), ("GET", "servers/fx"), ("DELETE", "servers/fx"),
    ("POST", "servers/fx/restart"), ("GET", "sessions"), ("GET", "sessions/x"), ("DELETE", "sessions/x"),
    ("GET", "drain"), ("POST", "drain"), ("DELETE", "drain"), ("GET", "stats"),
]


@pytest.mark.integration
class TestAuth:
    @pytest.mark.parametrize("method,path", ENDPOINTS)
    def test_401_without_the_token(self, client, method, path):
        """Every endpoint: no token, a wrong one, or the token as an API key is 401 with a Bearer challenge."""
        for headers in ({}, {"authorization": "Bearer " + "x" * len(TOKEN)}, {"authorization": TOKEN},
                        {"x-api-key": TOKEN}):
            r = client.request(method, "/admin/" + path, headers=headers, json={"name": "n", "command": "c"})
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="mcpgw-admin"')
        # and nothing happened
        assert api(client, "GET", "drain").json()["draining"] is False
        assert "fx" in [s["name"] for s in api(client, "GET", "servers").json()["servers"]]

    def test_off_without_a_token(self, make_gateway):
        """No admin token configured: /admin/ and /console/ do not exist (404), whatever is sent."""
        gw = make_gateway(wire.config())
        for path in ("/admin/", "/admin/servers", "/console/", "/console/console.js"):
            assert httpx.get(gw.url + path, headers=AUTH).status_code == 404

    def test_token_from_environment(self, make_gateway):
        """MCPGW_ADMIN_TOKEN turns the admin API on (and overrides the file)."""
        other = "env-admin-token-abcdefghijkl"
        gw = make_gateway(wire.config(), env={"MCPGW_ADMIN_TOKEN": other})
        assert httpx.get(gw.url + "/admin/", headers={"authorization": f"Bearer {other}"}).status_code == 200
        assert httpx.get(gw.url + "/admin/", headers=AUTH).status_code == 401


@pytest.mark.integration
class TestEndpoints:
    def test_overview_and_unknown_paths(self, client):
        body = api(client, "GET", "").json()
        assert body["version"] and body["draining"] is False and body["accepting"] is True
        assert set(body["sessions"]) == {"total", "byTransport"}
        assert api(client, "GET", "nothing").status_code == 404
        r = api(client, "PUT", "drain")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, POST"

    def test_servers_children_stderr_crashes(self, client, gw):
        """A server lists its children (pid, uptime, session, in-flight), its stderr lines and crashes."""
        sid = wire.open_session(client)
        assert result_text(call(client, sid, wire.tool_call(2, "stderr", {"text": "hello from stderr"}))) == "wrote to stderr"
        done: list[httpx.Response] = []
        t = threading.Thread(target=lambda: done.append(call(client, sid, wire.tool_call(3, "sleep", {"seconds": 1.5}))))
        t.start()
        try:
            assert wait_until(lambda: api(client, "GET", "servers/fx").json()["inFlight"] == 1, 5)
            fx = api(client, "GET", "servers/fx").json()
            [child] = [c for c in fx["children"] if c["session"] == sid]
            assert child["pid"] in gw.child_pids() and child["inFlight"] == 1 and child["uptime"] >= 0
            assert child["transport"] == "streamable"
            assert fx["default"] is True and fx["health"] == "ok" and fx["sessions"] >= 1
            assert any(line["line"] == "hello from stderr" and line["pid"] == child["pid"] for line in fx["stderr"])
            listed = api(client, "GET", "servers").json()["servers"]
            assert [s["name"] for s in listed] == ["fx"]
        finally:
            t.join(10)
        assert result_text(done[0]) == "slept 1.5"
        before = api(client, "GET", "servers/fx").json()["crashes"]
        r = call(client, sid, wire.tool_call(4, "crash"))
        assert "error" in wire.messages_of(r)[0]
        assert wait_until(lambda: api(client, "GET", "servers/fx").json()["crashes"] == before + 1, 5)
        assert api(client, "GET", "servers/fx").json()["restarts"] == before + 1  # deprecated: the same count
        assert api(client, "GET", "servers/nope").status_code == 404

    def test_add_and_remove_server(self, client, gw):
        """POST adds a server reachable at once; DELETE ends its sessions and stops its children."""
        spec = {"name": "extra", **fixture_server(), "env": {"EXTRA": "1"}}
        r = api(client, "POST", "servers", json=spec)
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/admin/servers/extra" and r.json()["name"] == "extra"
        assert api(client, "POST", "servers", json=spec).status_code == 409
        assert api(client, "POST", "servers", json={"name": "bad", "command": "no-such-command-xyz"}).status_code == 400
        assert api(client, "POST", "servers", json={"name": "bad", "command": sys.executable, "nope": 1}).status_code == 400
        assert api(client, "POST", "servers", content=b"[1]").status_code == 400
        sid = wire.open_session(client, path="/servers/extra/mcp")
        assert result_text(call(client, sid, wire.tool_call(2, "echo", {"text": "new"}), "/servers/extra/mcp")) == "new"
        [child] = api(client, "GET", "servers/extra").json()["children"]
        r = api(client, "DELETE", "servers/extra")
        assert r.status_code == 200 and r.json() == {"removed": "extra", "sessionsEnded": 1}
        assert not pid_alive(child["pid"])  # the answer came after the child exited
        assert call(client, sid, wire.tool_call(3, "echo", {"text": "x"}), "/servers/extra/mcp").status_code == 404
        assert api(client, "GET", "servers/extra").status_code == 404
        assert api(client, "DELETE", "servers/extra").status_code == 404
        assert api(client, "DELETE", "servers/fx").status_code == 409  # the default server stays

    def test_filtered_server_keeps_its_stderr(self, client):
        """A server behind a tool filter (added at runtime with ``tools``) still reports its children's stderr."""
        spec = {"name": "filtered", **fixture_server(), "tools": {"deny": ["crash"]}}
        assert api(client, "POST", "servers", json=spec).status_code == 201
        try:
            path = "/servers/filtered/mcp"
            sid = wire.open_session(client, path=path)
            assert result_text(call(client, sid, wire.tool_call(2, "stderr", {"text": "filtered stderr"}), path))
            body = api(client, "GET", "servers/filtered").json()
            assert wait_until(lambda: any(line["line"] == "filtered stderr"
                                          for line in api(client, "GET", "servers/filtered").json()["stderr"]), 5)
            assert body["children"][0]["pid"] and body["starts"] == 1
        finally:
            assert api(client, "DELETE", "servers/filtered").status_code == 200

    def test_restart_server(self, client):
        """Restart ends the server's sessions (clients re-initialize) and stops their children."""
        sid = wire.open_session(client)
        pids = [c["pid"] for c in api(client, "GET", "servers/fx").json()["children"]]
        r = api(client, "POST", "servers/fx/restart")
        assert r.status_code == 200 and r.json()["restarted"] == "fx" and r.json()["sessionsEnded"] >= 1
        assert not any(pid_alive(p) for p in pids)
        assert call(client, sid, wire.tool_call(2, "echo", {"text": "x"})).status_code == 404
        assert api(client, "GET", "servers/fx").json()["children"] == []
        wire.open_session(client)  # a new one works

    def test_sessions_list_get_end(self, client):
        sid = wire.open_session(client)
        body = api(client, "GET", "sessions").json()
        [s] = [s for s in body["sessions"] if s["id"] == sid]
        assert s["server"] == "fx" and s["transport"] == "streamable" and s["inFlight"] == 0 and s["pid"]
        assert body["byTransport"]["streamable"] >= 1
        assert api(client, "GET", "sessions?server=nope").json()["sessions"] == []
        assert api(client, "GET", f"sessions/{sid}").json()["id"] == sid
        r = api(client, "DELETE", f"sessions/{sid}")
        assert r.status_code == 200 and r.json() == {"ended": sid}
        assert not pid_alive(s["pid"])
        assert call(client, sid, wire.tool_call(2, "echo", {"text": "x"})).status_code == 404
        assert api(client, "DELETE", f"sessions/{sid}").status_code == 404
        assert api(client, "GET", f"sessions/{sid}").status_code == 404

    def test_drain(self, client, gw):
        """Drain: new sessions get 503 (every transport), /ready is 503, the open session's call in flight
        finishes and the session goes on; DELETE resumes."""
        sid = wire.open_session(client)
        done: list[httpx.Response] = []
        t = threading.Thread(target=lambda: done.append(call(client, sid, wire.tool_call(2, "sleep", {"seconds": 1}))))
        t.start()
        try:
            assert wait_until(lambda: api(client, "GET", f"sessions/{sid}").json()["inFlight"] == 1, 5)
            r = api(client, "POST", "drain")
            assert r.status_code == 200 and r.json()["draining"] is True and r.json()["sessions"] >= 1
            r = client.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize())
            assert r.status_code == 503 and r.headers["retry-after"]
            assert client.get("/sse", headers={"accept": "text/event-stream"}).status_code == 503
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(gw.url.replace("http://", "ws://") + "/ws", open_timeout=10).close()
            assert refused.value.response.status_code == 503
            ready = client.get("/ready")
            assert ready.status_code == 503 and "draining" in ready.json()["problems"]
            assert api(client, "GET", "drain").json()["draining"] is True
        finally:
            t.join(10)
        assert result_text(done[0]) == "slept 1"
        assert result_text(call(client, sid, wire.tool_call(3, "echo", {"text": "still here"}))) == "still here"
        r = api(client, "DELETE", "drain")
        assert r.json()["draining"] is False and r.json()["accepting"] is True
        assert client.get("/ready").status_code == 200
        wire.open_session(client)

    def test_stats(self, client):
        """Samples every statsInterval: request and error rates, p50/p99, sessions by transport."""
        sid = wire.open_session(client)
        for i in range(5):
            result_text(call(client, sid, wire.tool_call(10 + i, "echo", {"text": "x"})))
        assert wait_until(lambda: any(s["p50"] is not None for s in api(client, "GET", "stats").json()["samples"]), 5)
        body = api(client, "GET", "stats").json()
        assert body["interval"] == 0.2 and body["window"] == 900 and body["metricsEnabled"] is True
        assert sum(s["requests"] for s in body["samples"]) >= 5
        busy = [s for s in body["samples"] if s["p50"] is not None]
        assert busy[0]["p99"] >= busy[0]["p50"] > 0
        assert {"time", "requestRate", "errorRate", "errors", "sessions"} <= set(busy[0])

    def test_console_files(self, client):
        """The console's files, with a CSP that allows nothing from elsewhere; /console redirects."""
        r = client.get("/console/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"] and "console.js" in r.text
        assert client.get("/console/console.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/console/console.css").status_code == 200
        assert client.get("/console/../admin/").status_code in (401, 404)
        assert client.get("/console/nope").status_code == 404
        r = client.get("/console")
        assert r.status_code == 301 and r.headers["location"] == "/console/"


# -- units --------------------------------------------------------------------------------------


class AdminAuthTests(SynchronousTestCase):
    def request(self, *values: bytes) -> DummyRequest:
        request = DummyRequest([b""])
        if values:
            request.requestHeaders.setRawHeaders(b"authorization", list(values))
        return request

    def test_bearer_token_only(self) -> None:
        """Only exactly ``Bearer <token>`` passes: not another token, not the bare token, not two headers."""
        auth = AdminAuth(TOKEN)
        self.assertTrue(auth.allows(self.request(f"Bearer {TOKEN}".encode())))
        self.assertTrue(auth.allows(self.request(f"bearer {TOKEN}".encode())))
        for values in ((), (TOKEN.encode(),), (b"Bearer " + TOKEN[:-1].encode(),), (b"Bearer ",),
                       (f"Bearer {TOKEN}".encode(), f"Bearer {TOKEN}".encode())):
            self.assertFalse(auth.allows(self.request(*values)), values)


class StatsTests(SynchronousTestCase):
    def test_quantile(self) -> None:
        """Interpolated within the bucket, as histogram_quantile does; None for no observations."""
        self.assertIsNone(quantile(0.5, [0] * 16))
        counts = [0] * 16
        counts[3] = 10  # (0.005, 0.01]
        self.assertAlmostEqual(quantile(0.5, counts), 0.0075)
        self.assertAlmostEqual(quantile(0.99, counts), 0.00995)

    def test_ring_of_samples_on_the_clock(self) -> None:
        """Each tick samples the rates since the last; the ring holds 15 minutes of them."""
        clock = Clock()
        metrics = Metrics(["fx"], process=False)
        sampler = StatsSampler(metrics, lambda: {"streamable": 1}, clock, interval=5)
        sampler.startService()
        self.addCleanup(sampler.stopService)
        self.assertEqual(list(sampler.samples), [])  # the first reading is the baseline
        bound = metrics.bound("streamable", "fx")
        for _ in range(10):
            bound.request("tools/call", 10)
            bound.answered("tools/call", 0.02)
        bound.error("upstream_error")
        clock.advance(5)
        [sample] = sampler.samples
        self.assertEqual((sample["requests"], sample["requestRate"], sample["errors"], sample["errorRate"]), (10, 2.0, 1.0, 0.2))
        self.assertEqual(sample["sessions"], {"streamable": 1})
        self.assertTrue(10 < sample["p50"] <= 25 and sample["p99"] <= 25)
        clock.advance(5)
        self.assertEqual(sampler.samples[-1]["requests"], 0)
        self.assertIsNone(sampler.samples[-1]["p50"])
        for _ in range(200):
            clock.advance(5)
        self.assertEqual(len(sampler.samples), 180)  # 15 min / 5 s
        self.assertEqual(sampler.snapshot()["window"], 900)


class AdminConfigTests(SynchronousTestCase):
    base: ClassVar[dict[str, Any]] = {"mcpServers": {"fx": {"command": sys.executable}}}

    def test_off_by_default(self) -> None:
        self.assertFalse(parse(self.base, {}).admin.enabled)

    def test_strict(self) -> None:
        for admin, key in (({"token": "short"}, "admin.token"), ({"token": 12345678901234567}, "admin.token"),
                           ({"tokn": TOKEN}, "admin.tokn"), ({"token": TOKEN, "statsInterval": 0}, "admin.statsInterval"),
                           ({"token": TOKEN, "statsInterval": 600}, "admin.statsInterval"), ([], "admin")):
            with self.assertRaises(ConfigError) as e:
                parse({**self.base, "admin": admin}, {})
            self.assertEqual(e.exception.key, key)

    def test_environment(self) -> None:
        """MCPGW_ADMIN_TOKEN sets (and overrides) the token; it is never passed to a child."""
        config = parse({**self.base, "admin": {"token": TOKEN}}, {"MCPGW_ADMIN_TOKEN": "from-the-environment-123"})
        self.assertEqual(config.admin.token, "from-the-environment-123")
        self.assertNotIn("from-the-environment-123", repr(config))
        self.assertIn("MCPGW_ADMIN_TOKEN", PRIVATE_ENV)
        with self.assertRaises(ConfigError) as e:
            parse(self.base, {"MCPGW_ADMIN_TOKEN": "short"})
        self.assertEqual(e.exception.key, "MCPGW_ADMIN_TOKEN")


class OpenApiTests(SynchronousTestCase):
    def test_every_endpoint_is_documented(self) -> None:
        """docs/admin-openapi.yaml names exactly the routes and methods AdminResource answers."""
        from pathlib import Path

        import yaml

        from mcpgw.admin import AdminResource

        doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "admin-openapi.yaml").read_text())
        documented = {(path, method.upper()) for path, item in doc["paths"].items()
                      for method in item if method in ("get", "post", "delete", "put", "patch")}
        resource = AdminResource(None, None, AdminAuth(TOKEN))  # type: ignore[arg-type]
        served = set()
        for path, _ in documented:
            parts = [p if not p.startswith("{") else "x" for p in path.strip("/").split("/") if p]
            for method in ("GET", "POST", "DELETE", "PUT", "PATCH"):
                handler, _, _ = resource._route(parts, method)
                if handler is not None:
                    served.add((path, method))
        self.assertEqual(served, documented)
        self.assertEqual(len(documented), 14)
