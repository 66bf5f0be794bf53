"""``warmPool``: pre-spawned children that new sessions take (mcpgw.upstream.warm)."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import jsonrpc
from mcpgw.config import ConfigError, GatewayConfig, ServerConfig, SessionConfig, StdioServer, ToolFilter, parse_server
from mcpgw.session import SessionManager
from mcpgw.upstream import FilteredUpstream, stdio
from mcpgw.upstream.warm import BACKOFF_FIRST, REFILL_DELAY, SETTLED_DELAY, WarmChildren
from tests.fake_process import FakeProcessReactor
from tests.gateway_process import fixture_server, wait_until
from tests.mcp_raw import StreamableSession, result_text, tool_call

SERVER = StdioServer(name="time", command="time-server", executable="/opt/bin/time-server", warmPool=2)


class WarmChildrenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()
        self.warm = WarmChildren(SERVER, self.reactor)

    def test_start_spawns_n_children(self) -> None:
        self.warm.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual([c.pid for c in self.warm.ready], [4242, 4243])

    def test_take_gives_a_running_child_and_spawns_a_replacement(self) -> None:
        self.warm.start()
        child = self.warm.take()
        assert child is not None
        self.assertEqual(child.pid, 4242)
        self.assertFalse(child.ended)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(REFILL_DELAY)  # the replacement: just after the session's setup
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual([c.pid for c in self.warm.ready], [4243, 4244])

    def test_settled_refills_every_missing_child_at_once(self) -> None:
        """Back to back: two takes, then the second taker's initialize answer: both replacements
        are spawned together one reactor turn later, not REFILL_DELAY after the first take."""
        self.warm.start()
        self.warm.take()
        self.warm.take()
        self.assertEqual(self.warm.ready, [])
        self.warm.settled()
        self.assertEqual(len(self.reactor.spawned), 2)  # not on this turn: the answer is written first
        self.reactor.advance(SETTLED_DELAY)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual([c.pid for c in self.warm.ready], [4244, 4245])
        self.reactor.advance(REFILL_DELAY)
        self.assertEqual(len(self.reactor.spawned), 4)  # one refill for both takes

    def test_settled_does_not_hurry_a_backoff(self) -> None:
        """A replacement for a child that died waits out its backoff even if a session settles."""
        self.warm.start()
        self.reactor.spawned[0].exit(1)
        self.warm.settled()
        self.reactor.advance(SETTLED_DELAY)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_dead_child_is_replaced_after_a_doubling_backoff(self) -> None:
        self.warm.start()
        self.reactor.spawned[0].exit(1)
        self.assertEqual([c.pid for c in self.warm.ready], [4243])
        self.assertEqual(len(self.reactor.spawned), 2)  # not at once
        self.reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual([c.pid for c in self.warm.ready], [4243, 4244])
        # It keeps dying: the next wait is twice as long.
        self.reactor.spawned[2].exit(1)
        self.reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(len(self.warm.ready), 2)

    def test_take_skips_nothing_dead_and_returns_none_when_empty(self) -> None:
        warm = WarmChildren(StdioServer(name="t", command="t", executable="/t", warmPool=1), self.reactor)
        warm.start()
        self.reactor.spawned[0].exit(1)
        self.assertIsNone(warm.take())  # the replacement waits for its backoff

    def test_no_replacement_after_stop(self) -> None:
        self.warm.start()
        self.warm.take()
        self.warm.stop()
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_stops_every_child_and_fires_when_they_exited(self) -> None:
        self.warm.start()
        self.reactor.spawned[0].exit(1)  # a retry is pending
        d = self.warm.stop()
        self.assertNoResult(d)
        self.assertEqual(self.reactor.spawned[1].stdinClosed, 1)
        self.reactor.spawned[1].exit(0)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)  # no replacement after stop


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()

    def manager(self, server: ServerConfig) -> SessionManager:
        config = GatewayConfig(servers={server.name: server}, session=SessionConfig(secret="k"))
        manager = SessionManager(config, self.reactor)
        manager.startService()
        return manager

    def test_session_takes_a_warm_child(self) -> None:
        manager = self.manager(SERVER)
        self.assertEqual(len(self.reactor.spawned), 2)
        session = manager.create(SERVER, "streamable")
        self.assertTrue(session.prespawned)
        self.assertIs(session.upstream.delegate, session)
        self.assertEqual(session.upstream.pid, 4242)
        self.assertIs(session.upstream.activity, manager.activity_of("time"))
        self.reactor.advance(REFILL_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)  # the replacement
        # The session works through the taken child.
        seen: list[bytes] = []

        class Route:
            def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
                seen.append(raw)

        msg = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        session.request(msg, jsonrpc.dumps(msg), Route())
        self.assertEqual(self.reactor.spawned[0].written, [jsonrpc.dumps(msg) + b"\n"])
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":1,"result":{}}\n')
        self.assertEqual(len(seen), 1)
        # Its end ends the session, not the pool.
        self.reactor.spawned[0].exit(0)
        self.assertTrue(session.ended)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_end_of_handshake_refills_the_pool(self) -> None:
        """The replacement of a taken child is spawned once the session's handshake is over (its
        client's notifications/initialized, one reactor turn later), not REFILL_DELAY after the take."""
        manager = self.manager(SERVER)
        session = manager.create(SERVER, "streamable")
        seen: list[bytes] = []

        class Route:
            def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
                seen.append(raw)

        msg = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
        session.request(msg, jsonrpc.dumps(msg), Route())
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18"}}\n')
        self.assertEqual(len(seen), 1)
        self.reactor.advance(SETTLED_DELAY)
        self.assertEqual(len(self.reactor.spawned), 2)  # the answer alone: the handshake is not over
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        session.notify(note, jsonrpc.dumps(note))
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(SETTLED_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertIsNone(session.on_initialized)  # once

    def test_lazy_session_takes_a_warm_child_at_its_first_message(self) -> None:
        """A legacy SSE session (lazy) takes no child when its stream opens; its first message
        takes a warm one (no spawn on its path) and the pool is refilled."""
        manager = self.manager(SERVER)
        session = manager.create(SERVER, "sse", lazy=True)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(len(manager.warm["time"].ready), 2)
        self.assertIsNone(session.upstream.pid)
        msg = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
        session.request(msg, jsonrpc.dumps(msg), _Route())
        self.assertTrue(session.prespawned)
        self.assertEqual(session.upstream.pid, 4242)
        self.assertEqual(self.reactor.spawned[0].written, [jsonrpc.dumps(msg) + b"\n"])
        self.reactor.advance(REFILL_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_tool_filtered_server_takes_a_warm_child_behind_its_filter(self) -> None:
        server = StdioServer(name="f", command="t", executable="/t", warmPool=1, tools=ToolFilter(deny=("x",)))
        manager = self.manager(server)
        session = manager.create(server, "streamable")
        self.assertIsInstance(session.upstream, FilteredUpstream)
        self.assertIs(session.upstream.inner.delegate, session.upstream)
        self.assertEqual(session.upstream.pid, 4242)

    def test_no_warm_pool_spawns_per_session(self) -> None:
        server = StdioServer(name="cold", command="t", executable="/t")
        manager = self.manager(server)
        self.assertEqual(self.reactor.spawned, [])
        self.assertFalse(manager.create(server, "streamable").prespawned)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stop_service_stops_warm_children(self) -> None:
        manager = self.manager(SERVER)
        manager.create(SERVER, "streamable")
        self.reactor.advance(REFILL_DELAY)
        d = manager.stopService()
        self.assertEqual([t.stdinClosed for t in self.reactor.spawned], [1, 1, 1])
        self.reactor.spawned[0].exit(0)
        self.reactor.spawned[1].exit(0)
        self.assertNoResult(d)
        self.reactor.spawned[2].exit(0)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 3)


def _parse(server: dict[str, Any]) -> ServerConfig:
    return parse_server("fx", {"command": "sh", **server}, {"PATH": "/bin:/usr/bin"})


@pytest.mark.parametrize("value", [-1, 65, 1.5, True, "2"])
def test_config_rejects_bad_warm_pool(value) -> None:
    with pytest.raises(ConfigError, match="warmPool"):
        _parse({"warmPool": value})


def test_config_warm_pool() -> None:
    assert _parse({}).warmPool == 0
    assert _parse({"warmPool": 3}).warmPool == 3
    with pytest.raises(ConfigError, match="warmPool"):
        _parse({"warmPool": 1, "sessions": "pooled"})
    with pytest.raises(ConfigError, match="warmPool"):
        parse_server("r", {"url": "http://127.0.0.1:1/mcp", "warmPool": 1}, {})


@pytest.mark.integration
def test_gateway_with_warm_pool(make_gateway) -> None:
    gw = make_gateway({"mcpServers": {"fx": fixture_server(warmPool=2)}})
    assert wait_until(lambda: len(gw.child_pids()) == 2, timeout=10), gw.child_pids()
    warm = set(gw.child_pids())

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            sessions = [StreamableSession(client, f"{gw.url}/mcp") for _ in range(2)]
            for i, session in enumerate(sessions):
                await session.initialize()
                reply = await session.post(tool_call(1, "echo", {"text": f"hello {i}"}))
                assert result_text(reply[-1]) == f"hello {i}", reply

    anyio.run(main)
    # Both sessions run on the children that were warm; two replacements wait for the next ones.
    assert wait_until(lambda: len(gw.child_pids()) == 4, timeout=10), gw.child_pids()
    assert warm <= set(gw.child_pids())


class _Route:
    def __init__(self) -> None:
        self.answers: list[bytes] = []

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.answers.append(raw)

    def deliver(self, raw: bytes) -> None:
        self.answers.append(raw)

    def forget(self, id: Any) -> None:
        pass
