"""Issue 15, finding 7: one identity could open ``limits.maxSessions`` sessions and every other
identity got 503 (keepalives hold them for ``session.maxLifetime``, 24 h by default).

``limits.maxSessionsPerIdentity`` caps the sessions one identity holds at once, on every transport
together; anonymous clients are keyed by their address as the rate limiter keys them (an IPv4
address, an IPv6 /64). Past it: 503 with ``Retry-After``, as the gateway's own caps answer (nginx's
``limit_conn`` answers 503 too), and no child is started.

In memory: the SessionManager's accounting. Against a real ``twistd mcpgw``: an attacker with a
token of its own (then anonymous, by address) opens sessions until refused, over Streamable HTTP,
HTTP+SSE and WebSocket, while a legitimate SDK client with another identity keeps calling tools.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mcpgw.auth import Principal
from mcpgw.config import ConfigError, GatewayConfig, LimitsConfig, SessionConfig, StdioServer, parse
from mcpgw.session import SessionManager, SessionRefused
from mcpgw.upstream import stdio
from tests import wire
from tests.fake_process import FakeProcessReactor
from tests.gateway_process import fixture_server, wait_until
from tests.hostile import LegitClient, proc_stats

SERVER = StdioServer(name="fx", command="fx", executable="/opt/bin/fx")
QUOTA = 3


class QuotaTests(SynchronousTestCase):
    """SessionManager with limits.maxSessionsPerIdentity, children on a fake reactor."""

    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()
        limits = LimitsConfig(maxSessions=10, maxSessionsPerIdentity=QUOTA)
        self.manager = SessionManager(GatewayConfig(servers={"fx": SERVER}, limits=limits,
                                                    session=SessionConfig(secret="k")), self.reactor)

    def fill(self, owner: str | None, principal: Principal | None = None) -> list[Any]:
        return [self.manager.create(SERVER, "streamable", owner, principal=principal) for _ in range(QUOTA)]

    def test_identityRefusedAtItsQuota(self) -> None:
        self.fill("mallory", Principal("mallory", "127.0.0.1"))
        with self.assertRaises(SessionRefused) as e:
            self.manager.create(SERVER, "ws", "mallory", principal=Principal("mallory", "127.0.0.1"))
        self.assertIn("limits.maxSessionsPerIdentity=3", e.exception.reason)
        self.assertEqual(e.exception.retry_after, 5)
        self.assertEqual(len(self.reactor.spawned), QUOTA)  # no child for the refused one

    def test_otherIdentitiesUnaffected(self) -> None:
        """Another identity from the very same address has a quota of its own."""
        self.fill("mallory", Principal("mallory", "127.0.0.1"))
        self.assertIsNone(self.manager.room_for(SERVER, "alice", Principal("alice", "127.0.0.1")))
        self.manager.create(SERVER, "streamable", "alice", principal=Principal("alice", "127.0.0.1"))

    def test_anonymousByAddress(self) -> None:
        """Anonymous: one quota per IPv4 address, one per IPv6 /64."""
        self.fill(None, Principal(None, "10.0.0.1"))
        self.assertIsNotNone(self.manager.room_for(SERVER, None, Principal(None, "10.0.0.1")))
        self.assertIsNone(self.manager.room_for(SERVER, None, Principal(None, "10.0.0.2")))
        self.fill(None, Principal(None, "2001:db8::1"))
        self.assertIsNotNone(self.manager.room_for(SERVER, None, Principal(None, "2001:db8::ffff")))
        self.assertIsNone(self.manager.room_for(SERVER, None, Principal(None, "2001:db8:0:1::1")))

    def test_endingASessionGivesTheSlotBack(self) -> None:
        sessions = self.fill("mallory")
        sessions[0].close("client ended the session (DELETE)")
        self.manager.create(SERVER, "streamable", "mallory")
        self.assertEqual(self.manager.per_identity, {"id:mallory": QUOTA})
        for s in list(self.manager.sessions.values()):
            s.close("bye")
        self.assertEqual(self.manager.per_identity, {})

    def test_failedSpawnTakesNoSlot(self) -> None:
        def broken(*a: Any, **kw: Any) -> Any:
            raise OSError("no such file")
        self.patch(self.reactor, "spawnProcess", broken)
        for _ in range(QUOTA + 1):
            with self.assertRaises(OSError):
                self.manager.create(SERVER, "streamable", "mallory")
        self.assertEqual(self.manager.per_identity, {})

    def test_noQuotaByDefault(self) -> None:
        manager = SessionManager(GatewayConfig(servers={"fx": SERVER}), self.reactor)
        for _ in range(QUOTA + 2):
            manager.create(SERVER, "streamable", "mallory")

    def test_config(self) -> None:
        base = {"mcpServers": {"fx": fixture_server()}}
        self.assertIsNone(parse(base, {}).limits.maxSessionsPerIdentity)
        self.assertEqual(parse({**base, "limits": {"maxSessionsPerIdentity": 4}}, {}).limits.maxSessionsPerIdentity, 4)
        for bad in (0, -1, "4", True):
            with self.assertRaises(ConfigError) as e:
                parse({**base, "limits": {"maxSessionsPerIdentity": bad}}, {})
            self.assertIn("limits.maxSessionsPerIdentity", str(e.exception))


# -- against a real gateway ---------------------------------------------------------

MALLORY, ALICE, BOB = "mallory-token-0123456789", "alice-token-0123456789ab", "bob-token-0123456789abcd"
#: Session attempts the attacker makes past its quota (bounded in count, and in time below).
ATTEMPTS = 200
MIB = 1024 * 1024


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def refused(r: httpx.Response) -> dict[str, Any]:
    error = wire.assert_jsonrpc_error(r, 503)
    assert r.headers["retry-after"] == "5" and "limits.maxSessionsPerIdentity" in error["message"], r.text
    return error


def ws_status(gw: Any, headers: dict[str, str]) -> int:
    async def go() -> int:
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{gw.port}/ws", subprotocols=["mcp"], additional_headers=headers):
                pass
        assert info.value.response.headers["retry-after"] == "5"
        return info.value.response.status_code
    return asyncio.run(go())


@pytest.mark.integration
def test_one_identity_cannot_take_every_session(make_gateway) -> None:
    """Mallory (a token of its own) opens sessions until refused, then tries 200 more on every
    transport: each is 503 + Retry-After at once and starts no child. Alice's SDK client keeps
    calling tools (p99 < 1 s, no failure) and Bob still opens sessions, although the gateway's
    cap (maxSessions 8) would have let Mallory take every one."""
    gw = make_gateway(wire.config(
        auth={"bearerTokens": [{"name": "mallory", "token": MALLORY}, {"name": "alice", "token": ALICE},
                               {"name": "bob", "token": BOB}]},
        limits={"maxSessions": 8, "maxSessionsPerIdentity": QUOTA}))
    with wire.http_client(gw.url) as c, LegitClient(gw.url + "/mcp", headers=bearer(ALICE)) as legit:
        before = proc_stats(gw.proc.pid)
        children = len(gw.child_pids())
        held = []
        for _ in range(QUOTA):
            r = c.post("/mcp", headers={**wire.POST_HEADERS, **bearer(MALLORY)}, json=wire.initialize())
            assert r.status_code == 200, r.text
            held.append(r.headers["mcp-session-id"])
        slowest = 0.0
        deadline = time.monotonic() + 60
        for i in range(ATTEMPTS):
            assert time.monotonic() < deadline
            started = time.monotonic()
            if i % 4 == 3:
                r = c.get("/sse", headers={"accept": "text/event-stream", **bearer(MALLORY)})
            else:
                r = c.post("/mcp", headers={**wire.POST_HEADERS, **bearer(MALLORY)}, json=wire.initialize())
            slowest = max(slowest, time.monotonic() - started)
            refused(r)
        assert ws_status(gw, bearer(MALLORY)) == 503
        assert len(gw.child_pids()) == children + QUOTA  # no child for any refused attempt
        # Another identity still gets sessions; the first Mallory ends frees a slot for Mallory.
        bob = c.post("/mcp", headers={**wire.POST_HEADERS, **bearer(BOB)}, json=wire.initialize())
        assert bob.status_code == 200, bob.text
        assert c.delete("/mcp", headers={"mcp-session-id": held[0], **bearer(MALLORY)}).status_code == 200
        again = c.post("/mcp", headers={**wire.POST_HEADERS, **bearer(MALLORY)}, json=wire.initialize())
        assert again.status_code == 200, again.text
        after = proc_stats(gw.proc.pid)
        legit.assert_healthy()
    growth = after.grew(before)
    print(f"\nquota attack: {ATTEMPTS} refused in at most {slowest * 1000:.0f} ms each; RSS {growth.rss / MIB:+.1f} MiB, "
          f"fds {growth.fds:+d}; legit p99 {legit.report.p99 * 1000:.0f} ms over {len(legit.report.latencies)} calls")
    assert slowest < 1.0
    # Each live session costs its child's pipes (3 fds); refused attempts hold nothing.
    assert growth.fds <= 3 * (QUOTA + 1) + 4
    assert growth.rss < 16 * MIB


@pytest.mark.integration
def test_anonymous_clients_share_their_address_quota(make_gateway) -> None:
    """Without auth, the quota is per address: the legitimate SDK client shares 127.0.0.1 with the
    attacker, so it shares the attacker's quota (it holds one of the QUOTA sessions and keeps
    working; a new session from 127.0.0.1 is refused). A client from another address (127.0.0.2,
    loopback too) has a quota of its own."""
    gw = make_gateway(wire.config(limits={"maxSessions": 20, "maxSessionsPerIdentity": QUOTA}))
    with wire.http_client(gw.url) as c, LegitClient(gw.url + "/mcp") as legit:
        for _ in range(QUOTA - 1):  # the legitimate client holds the first slot
            wire.open_session(c)
        deadline = time.monotonic() + 60
        for _ in range(ATTEMPTS):
            assert time.monotonic() < deadline
            refused(c.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize()))
        assert ws_status(gw, {}) == 503
        other = httpx.Client(base_url=gw.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
        del other.headers["accept"]
        with other:
            r = other.post("/mcp", headers=wire.POST_HEADERS, json=wire.initialize())
            assert r.status_code == 200, r.text
        # The attack is over in well under a second now: the legitimate client keeps its own
        # pace until it has made the calls assert_healthy judges.
        assert wait_until(lambda: len(legit.report.latencies) >= 5, timeout=10)
        legit.assert_healthy()
