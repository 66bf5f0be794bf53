"""Issue 15, finding 5: DNS rebinding and foreign origins against the Host / Origin policy.

MCP basic/transports (2025-11-25, Streamable HTTP "Security Warning"): servers MUST validate the
Origin header on all incoming connections to prevent DNS rebinding attacks (403 when present and
invalid) and SHOULD bind only to localhost when running locally. A rebinding page's requests carry
the attacker's name in ``Host`` and an ``Origin`` that matches it, so only a Host the gateway knows
to be its own (mcpgw.origin.HostPolicy) tells them apart.

``PolicyMatrixTests`` decide the whole matrix in memory (listen endpoints x config x requests);
the integration tests run the attack against three real ``twistd mcpgw`` processes, one per kind
of bind, while a legitimate SDK client keeps calling tools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ConfigError, CorsConfig, GatewayConfig, StdioServer, parse
from mcpgw.origin import HostPolicy, host_name, listen_interface
from tests.gateway_process import (
    ACTIVATED_LISTEN,
    ACTIVATION_ENV,
    TWISTD,
    Gateway,
    fixture_server,
    loopback_listener,
    socket_activated,
)
from tests.hostile import LegitClient, proc_stats
from tests.mcp_raw import ACCEPT_BOTH, initialize_request

EVIL = "https://evil.example"
REBIND = "rebind.evil"

# -- the decision, in memory ------------------------------------------------------------------

#: (name, config host, listen endpoints or None, allowedHosts, cors.origins)
CONFIGS: dict[str, tuple[str, list[str] | None, tuple[str, ...], tuple[str, ...]]] = {
    # Finding 5 as reported: the file's host is 0.0.0.0, --listen puts it on loopback, origins "*".
    "listen-loopback-star": ("0.0.0.0", ["tcp:3000:interface=127.0.0.1"], (), ("*",)),
    "host-loopback-star": ("127.0.0.1", None, (), ("*",)),
    "listen-ipv6-loopback": ("0.0.0.0", ["tcp6:3000:interface=\\:\\:1"], (), ("*",)),
    "unix-socket": ("0.0.0.0", ["unix:/run/mcpgw.sock"], (), ("*",)),
    "loopback-exact": ("127.0.0.1", None, (), ("http://localhost:5173",)),
    "loopback-allowed-hosts": ("127.0.0.1", None, ("mcp.example.test",), ("https://mcp.example.test",)),
    # The second half of finding 5: an exact list on a non-loopback bind.
    "any-exact": ("0.0.0.0", None, (), ("https://app.example.test",)),
    "listen-any-exact": ("127.0.0.1", ["tcp:3000"], (), ("https://app.example.test",)),
    "bind-address-exact": ("10.0.0.5", None, (), ("https://app.example.test",)),
    "any-allowed-hosts": ("0.0.0.0", None, ("mcp.example.test", "*.apps.example.test"), ("https://app.example.test",)),
    "any-star": ("0.0.0.0", None, (), ("*",)),
}

#: (name, Host header or None, Origin header or None)
REQUESTS: dict[str, tuple[str | None, str | None]] = {
    "evil-origin": ("127.0.0.1:3000", EVIL),
    "rebind-matching-origin": (f"{REBIND}:3000", f"http://{REBIND}:3000"),
    "rebind-no-origin": (f"{REBIND}:3000", None),
    "localhost": ("localhost:3000", None),
    "ipv4-loopback": ("127.0.0.1:3000", None),
    "ipv4-loopback-other": ("127.0.0.2:3000", None),
    "ipv6-loopback": ("[::1]:3000", None),
    "same-origin-localhost": ("localhost:3000", "http://localhost:3000"),
    "loopback-page": ("127.0.0.1:3000", "http://localhost:5173"),
    "userinfo-host": ("evil.example@127.0.0.1:3000", None),
    "no-host": (None, None),
    "bind-address": ("10.0.0.5:3000", "http://10.0.0.5:3000"),
    "allowed-host-same-origin": ("mcp.example.test", "https://mcp.example.test"),
    "allowed-suffix-same-origin": ("a.apps.example.test", "https://a.apps.example.test"),
    "listed-origin": ("127.0.0.1:3000", "https://app.example.test"),
}

OK, HOST, ORIGIN = "ok", "host", "origin"

#: What each request gets under each config (anything not listed: OK).
EXPECTED: dict[str, dict[str, str]] = {
    # A loopback bind: loopback names only, '*' means loopback origins only.
    **{name: {"evil-origin": ORIGIN, "rebind-matching-origin": HOST, "rebind-no-origin": HOST,
              "userinfo-host": HOST, "no-host": HOST, "bind-address": HOST, "allowed-host-same-origin": HOST,
              "allowed-suffix-same-origin": HOST, "listed-origin": ORIGIN}
       for name in ("listen-loopback-star", "host-loopback-star", "listen-ipv6-loopback", "unix-socket")},
    "loopback-exact": {"evil-origin": ORIGIN, "rebind-matching-origin": HOST, "rebind-no-origin": HOST,
                       "userinfo-host": HOST, "no-host": HOST, "bind-address": HOST,
                       "allowed-host-same-origin": HOST, "allowed-suffix-same-origin": HOST,
                       "listed-origin": ORIGIN},  # and loopback-page: listed exactly
    "loopback-allowed-hosts": {"evil-origin": ORIGIN, "rebind-matching-origin": HOST, "rebind-no-origin": HOST,
                               "userinfo-host": HOST, "no-host": HOST, "bind-address": HOST,
                               "allowed-suffix-same-origin": HOST, "loopback-page": ORIGIN,
                               "listed-origin": ORIGIN},
    # Non-loopback bind, no allowedHosts: Host unchecked, but never trusted for same-origin.
    **{name: {"evil-origin": ORIGIN, "rebind-matching-origin": ORIGIN, "loopback-page": ORIGIN,
              "bind-address": ORIGIN, "allowed-host-same-origin": ORIGIN, "allowed-suffix-same-origin": ORIGIN}
       for name in ("any-exact", "listen-any-exact")},
    "bind-address-exact": {"evil-origin": ORIGIN, "rebind-matching-origin": ORIGIN, "loopback-page": ORIGIN,
                           "same-origin-localhost": ORIGIN, "allowed-host-same-origin": ORIGIN,
                           "allowed-suffix-same-origin": ORIGIN},
    "any-allowed-hosts": {"evil-origin": ORIGIN, "rebind-matching-origin": HOST, "rebind-no-origin": HOST,
                          "userinfo-host": HOST, "no-host": HOST, "bind-address": HOST, "loopback-page": ORIGIN},
    # '*' on a non-loopback bind is every origin, deliberately (the operator's choice, documented).
    "any-star": {},
}


def policy_for(name: str) -> HostPolicy:
    host, listens, allowed, origins = CONFIGS[name]
    config = GatewayConfig(servers={"fx": StdioServer(name="fx", command="fx")}, host=host,
                           cors=CorsConfig(origins=origins), allowedHosts=allowed)
    return HostPolicy.for_listens(config, listens)


def decide(policy: HostPolicy, host: str | None, origin: str | None) -> str:
    """What mcpgw.web.Guard does with the two headers: Host first, then Origin."""
    host_b = host.encode() if host is not None else None
    if not policy.host_allowed(host_b):
        return HOST
    if origin is not None and not policy.origin_allowed(origin, host_b):
        return ORIGIN
    return OK


class PolicyMatrixTests(SynchronousTestCase):
    def test_matrix(self) -> None:
        """Every config against every request; one assertion listing every cell that differs."""
        wrong = []
        for config in CONFIGS:
            policy = policy_for(config)
            for request, (host, origin) in REQUESTS.items():
                want = EXPECTED[config].get(request, OK)
                got = decide(policy, host, origin)
                if got != want:
                    wrong.append(f"{config} / {request}: {got}, expected {want}")
        self.assertEqual(wrong, [])

    def test_star_never_turns_rebinding_protection_off_on_loopback(self) -> None:
        """origins ["*"] on a loopback bind: a foreign origin is still 403, a foreign Host too."""
        policy = policy_for("listen-loopback-star")
        self.assertTrue(policy.loopback)
        self.assertFalse(policy.literal_wildcard(EVIL))
        self.assertEqual(decide(policy, "127.0.0.1:3000", EVIL), ORIGIN)

    def test_listen_interfaces(self) -> None:
        """The interface of each kind of strports description (escaped colons included)."""
        self.assertEqual(listen_interface("tcp:3000:interface=127.0.0.1:backlog=1024"), "127.0.0.1")
        self.assertEqual(listen_interface("tcp6:3000:interface=\\:\\:1"), "::1")
        self.assertEqual(listen_interface("tcp:3000"), "0.0.0.0")
        self.assertEqual(listen_interface("tcp6:3000"), "::")
        self.assertEqual(listen_interface("unix:/run/x.sock:mode=660"), "unix")
        self.assertEqual(listen_interface("systemd:domain=INET:index=0"), "0.0.0.0")

    def test_host_names(self) -> None:
        """Only ``host[:port]``: userinfo, spaces and paths parse to nothing."""
        self.assertEqual(host_name("[::1]:3000"), "::1")
        self.assertEqual(host_name("LocalHost:3000"), "localhost")
        self.assertEqual(host_name("evil@127.0.0.1"), "")
        self.assertEqual(host_name("127.0.0.1 evil"), "")
        self.assertEqual(host_name("127.0.0.1/x"), "")

    def test_every_listen_endpoint_counts(self) -> None:
        """``--listen`` given twice: the site listens on both, and Host is judged against both."""
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet.task import Clock

        from mcpgw import tap
        from mcpgw.config import parse

        config = parse({"mcpServers": {"fx": {"command": sys.executable}}, "metrics": {"enabled": False}}, {})

        def built(*listens: str) -> tuple[int, HostPolicy]:
            options = tap.Options()
            options.parseOptions([arg for listen in listens for arg in ("--listen", listen)])
            top = tap.build_service(config, Clock(), options["listen"])
            services = [s for s in top if isinstance(s, StreamServerEndpointService)]
            return len(services), top.context.hosts  # type: ignore[attr-defined]

        count, both_loopback = built("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1")
        self.assertEqual(count, 2)
        self.assertTrue(both_loopback.loopback)
        self.assertTrue(both_loopback.host_allowed(b"[::1]:3000") and both_loopback.host_allowed(b"127.0.0.1:3000"))
        self.assertFalse(both_loopback.host_allowed(b"rebind.evil:3000"))
        self.assertTrue(tap.listens_on_loopback_only(config, ["tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock"]))
        count, mixed = built("tcp:0:interface=127.0.0.1", "tcp:0:interface=10.0.0.5")
        self.assertEqual(count, 2)
        self.assertFalse(mixed.loopback)  # reachable from the network: no longer a loopback-only gateway
        self.assertTrue(mixed.own_name("10.0.0.5"))
        self.assertFalse(tap.listens_on_loopback_only(config, ["tcp:0:interface=127.0.0.1", "tcp:0:interface=10.0.0.5"]))

    def test_without_listens_the_config_host_decides(self) -> None:
        """A Guard built without build_service (an embedded gateway, a unit test): config.host."""
        config = GatewayConfig(servers={"fx": StdioServer(name="fx", command="fx")}, host="127.0.0.1")
        self.assertTrue(HostPolicy.for_listens(config).loopback)
        self.assertFalse(HostPolicy.for_listens(config, ["tcp:3000:interface=0.0.0.0"]).loopback)

    def test_memo_is_bounded(self) -> None:
        """Random Host headers never grow the memo of answers past its size."""
        policy = policy_for("host-loopback-star")
        for i in range(2000):
            policy.host_allowed(b"h%d.evil:3000" % i)
        self.assertLessEqual(len(policy._memo), 256)

    def test_allowed_hosts_config(self) -> None:
        """allowedHosts: names, *.domain and IP addresses; never '*', a URL or a port."""
        doc = {"mcpServers": {"fx": {"command": "sh"}}}
        self.assertEqual(parse({**doc, "allowedHosts": ["MCP.example.test", "*.example.test", "10.0.0.5", "[::1]"]},
                               {}).allowedHosts, ("mcp.example.test", "*.example.test", "10.0.0.5", "[::1]"))
        for bad in ["*", "https://mcp.example.test", "mcp.example.test:443", "a/b", "", "cafe:80"]:
            with self.assertRaises(ConfigError) as e:
                parse({**doc, "allowedHosts": [bad]}, {})
            self.assertEqual(e.exception.key, "allowedHosts[0]")


# -- the attack, against real gateways --------------------------------------------------------


class ListenGateway(Gateway):
    """tests.gateway_process.Gateway with the listen endpoint chosen by the test (None: the
    config's host and port, as a deployment without --listen; ACTIVATED_LISTEN: a 127.0.0.1
    socket handed over as systemd does, which the gateway treats as a public bind)."""

    def __init__(self, config: dict[str, Any], listen: str | None):  # noqa: D107 - the parent's, one argument more
        self._dir = tempfile.TemporaryDirectory(prefix="mcpgw-test-")
        self.config_path = os.path.join(self._dir.name, "gateway.json")
        with open(self.config_path, "w") as f:
            json.dump({"port": 0, **config}, f)
        args = [*TWISTD, "mcpgw", "--config", self.config_path, "--metrics-listen", "tcp:0:interface=127.0.0.1"]
        if listen is not None:
            args += ["--listen", listen]
        if listen == ACTIVATED_LISTEN:
            with loopback_listener() as sock:
                self.proc = subprocess.Popen(socket_activated(sock, args), stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, cwd=self._dir.name, pass_fds=(sock.fileno(),),
                                             env={**os.environ, **ACTIVATION_ENV})
        else:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self._dir.name)
        self.lines: list[str] = []
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()


@pytest.fixture
def gateways():
    started: list[Gateway] = []

    def start(config: dict[str, Any], listen: str | None) -> Gateway:
        gw = ListenGateway({"mcpServers": {"fx": fixture_server()}, **config}, listen)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def post(gw: Gateway, host: str | None, origin: str | None, path: str = "/mcp") -> httpx.Response:
    """An ``initialize`` with these Host / Origin headers (Host None: the URL's own)."""
    headers = {"accept": ACCEPT_BOTH, "content-type": "application/json"}
    if host is not None:
        headers["host"] = host.replace("PORT", str(gw.port))
    if origin is not None:
        headers["origin"] = origin.replace("PORT", str(gw.port))
    return httpx.post(gw.url + path, content=json.dumps(initialize_request()), headers=headers, timeout=10)


def get(gw: Gateway, host: str, path: str) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"host": host.replace("PORT", str(gw.port))}, timeout=10)


def assert_refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert what in r.text, r.text
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.integration
def test_loopback_listen_with_star_origins_refuses_rebinding(gateways):
    """Finding 5 as reported: the file's host 0.0.0.0, ``--listen tcp:PORT:interface=127.0.0.1``,
    ``origins: ["*"]``, no auth. A foreign Origin and a rebinding Host (with a matching Origin)
    are 403 on every transport, start no child, cost nothing measurable; loopback hosts and a
    loopback page still work, and a legitimate SDK client sees no failure meanwhile."""
    gw = gateways({"host": "0.0.0.0", "cors": {"origins": ["*"]}}, "tcp:0:interface=127.0.0.1")
    with LegitClient(gw.url + "/mcp") as legit:
        children = len(gw.child_pids())
        before = proc_stats(gw.proc.pid)
        slowest = 0.0
        for _ in range(50):  # bounded: 50 rounds of the three refused requests
            for host, origin, what in ((None, EVIL, "Origin"),
                                       (f"{REBIND}:PORT", f"http://{REBIND}:PORT", "Host"),
                                       (f"{REBIND}:PORT", None, "Host")):
                started = time.monotonic()
                assert_refused(post(gw, host, origin), what)
                slowest = max(slowest, time.monotonic() - started)
        for path in ("/sse", "/ws", "/servers/fx/mcp"):
            assert_refused(get(gw, f"{REBIND}:PORT", path), "Host")
        # Refused before any session exists: no child was started for them.
        assert len(gw.child_pids()) == children
        grew = proc_stats(gw.proc.pid).grew(before)
        # 150 refused requests: no more than allocator noise (4 MiB), no descriptor kept.
        print(f"150 refused requests: RSS {grew.rss / 1024:+.0f} KiB, fds {grew.fds:+d}, slowest 403 {slowest * 1000:.1f} ms")
        assert grew.rss < 4 * 1024 * 1024, grew
        assert grew.fds <= 4, grew  # the legitimate client's and the last refused connections may still be open
        assert slowest < 1.0, slowest
        # What stays allowed: loopback Host names, and a loopback page under "*" (CORS echoed).
        for host in ("127.0.0.1:PORT", "localhost:PORT", "[::1]:PORT"):
            assert post(gw, host, None).status_code == 200, host
        r = post(gw, "localhost:PORT", "http://localhost:5173")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        # The metrics port listens on loopback too: a rebinding page cannot read /metrics.
        metrics = gw.metrics_url
        assert httpx.get(metrics, headers={"host": f"{REBIND}:9091"}).status_code == 403
        assert httpx.get(metrics).status_code == 200
    legit.assert_healthy()


@pytest.mark.integration
def test_exact_origins_on_a_non_loopback_bind_refuse_rebinding(gateways):
    """Finding 5, second half: a non-loopback bind (host 0.0.0.0), an exact origin list. ``Origin ==
    Host`` is same-origin only for a Host that is the gateway's own: the rebinding pair is 403,
    the listed origin and a page served from the gateway's loopback address are not. The bind is
    a socket-activated 127.0.0.1 socket, which the gateway takes for a wildcard bind as it takes
    host 0.0.0.0 (HostPolicyTests' "any-exact" checks that the config's host gives the same
    policy): tests bind loopback only."""
    gw = gateways({"host": "0.0.0.0", "cors": {"origins": ["https://app.example.test"]}}, ACTIVATED_LISTEN)
    assert_refused(post(gw, f"{REBIND}:PORT", f"http://{REBIND}:PORT"), "Origin")
    assert_refused(post(gw, None, EVIL), "Origin")
    r = post(gw, None, "https://app.example.test")
    assert r.status_code == 200 and r.headers["access-control-allow-credentials"] == "true"
    assert post(gw, "127.0.0.1:PORT", "http://127.0.0.1:PORT").status_code == 200
    # No Origin at all (a non-browser client): a non-loopback bind does not check Host.
    assert post(gw, f"{REBIND}:PORT", None).status_code == 200


@pytest.mark.integration
def test_allowed_hosts_on_a_loopback_bind_behind_a_proxy(gateways):
    """host 127.0.0.1 (no --listen), allowedHosts for the name a local nginx forwards: that name
    with its own origin works; a rebinding name does not, nor does a foreign origin."""
    gw = gateways({"host": "127.0.0.1", "allowedHosts": ["mcp.example.test"],
                   "cors": {"origins": ["https://mcp.example.test"]}}, None)
    assert post(gw, "mcp.example.test", "https://mcp.example.test").status_code == 200
    assert post(gw, "mcp.example.test", None).status_code == 200
    assert_refused(post(gw, f"{REBIND}:PORT", f"http://{REBIND}:PORT"), "Host")
    assert_refused(post(gw, "mcp.example.test", EVIL), "Origin")
    assert post(gw, "localhost:PORT", None).status_code == 200
