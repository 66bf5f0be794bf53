"""mcpgw.pool: pooled children driven by a fake process reactor and a Clock (no processes, no real time)."""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.trial import unittest

from mcpgw import jsonrpc
from mcpgw.config import ConfigError, ServerConfig, StdioServer, parse
from mcpgw.pool import BACKOFF_FIRST, ChildPool, PoolFull, PoolManager, StateRejected
from tests.fake_process import FakeProcessReactor


def server(**kw: Any) -> StdioServer:
    base = {"name": "p", "command": sys.executable, "executable": sys.executable, "sessions": "pooled",
            "poolSize": 2, "poolQueue": 3}
    return StdioServer(**{**base, **kw})


class Route:
    """Records what a pool hands back to one client request."""

    def __init__(self) -> None:
        self.answers: list[tuple[Any, dict[str, Any]]] = []
        self.delivered: list[dict[str, Any]] = []

    def answer(self, id: Any, raw: bytes, msg: Any = None) -> None:
        self.answers.append((id, json.loads(raw)))

    def deliver(self, raw: bytes) -> None:
        self.delivered.append(json.loads(raw))

    def forget(self, id: Any) -> None:
        pass


def written(transport: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for chunk in transport.written for line in chunk.splitlines() if line.strip()]


def reply(transport: Any, msg: dict[str, Any]) -> None:
    transport.proto.outReceived(json.dumps(msg).encode() + b"\n")


def retry(pool: ChildPool, state: str, id: Any, responses: Any, route: Any, owner: str | None = None,
          method: str = "tools/call", name: Any = None) -> Any:
    """A client's retry with requestState: the parked call it claims, resumed on ``route``."""
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": {} if name is None else {"name": name}}
    return pool.resume(pool.claim(state, msg, owner), msg, responses, route)


def rejected(pool: ChildPool, state: Any, owner: str | None = None, method: str = "tools/call", name: Any = None) -> str:
    """Why the pool refuses a retry with this requestState (StateRejected.kind)."""
    msg = {"jsonrpc": "2.0", "id": 9, "method": method, "params": {} if name is None else {"name": name}}
    try:
        pool.claim(state, msg, owner)
    except StateRejected as e:
        return e.kind
    raise AssertionError("the requestState was honoured")


def init_result(version: str = "2025-11-25") -> dict[str, Any]:
    return {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": {"name": "fake", "version": "1"}}


class PoolTestCase(unittest.TestCase):
    def make(self, **kw: Any) -> tuple[ChildPool, FakeProcessReactor]:
        reactor = FakeProcessReactor()
        pool = ChildPool(server(**kw), reactor)
        pool.start()
        self.addCleanup(self.shut, pool, reactor)
        return pool, reactor

    def shut(self, pool: ChildPool, reactor: FakeProcessReactor) -> None:
        """Stop the pool and play every child's exit (the Deferred would otherwise wait for them)."""
        d = pool.stop()
        for t in reactor.spawned:
            if t.pid is not None:
                t.exit(0)
        self.successResultOf(d)

    def ready_all(self, pool: ChildPool, reactor: FakeProcessReactor) -> None:
        for t in list(reactor.spawned):
            init = written(t)[0]
            if init["method"] == "initialize" and not any(c.upstream.transport is t and c.ready for c in pool.children):
                reply(t, {"jsonrpc": "2.0", "id": init["id"], "result": init_result()})

    def child_requests(self, t: Any) -> list[dict[str, Any]]:
        return [m for m in written(t) if "id" in m and m.get("method") not in ("initialize",)]


class StartupTests(PoolTestCase):
    def test_gateway_initializes_each_child(self) -> None:
        """Each child gets initialize (the gateway as its client) and, once answered, notifications/initialized."""
        pool, reactor = self.make()
        self.assertEqual(len(reactor.spawned), 2)
        first = written(reactor.spawned[0])
        self.assertEqual(first[0]["method"], "initialize")
        self.assertEqual(first[0]["params"]["protocolVersion"], "2025-11-25")
        d = pool.ready()
        self.assertNoResult(d)
        self.ready_all(pool, reactor)
        self.assertEqual(written(reactor.spawned[0])[-1], {"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.assertEqual(self.successResultOf(d)["serverInfo"]["name"], "fake")
        self.assertTrue(all(c.ready for c in pool.children))

    def test_request_before_ready_waits(self) -> None:
        """A request that arrives while the children initialize is sent once one is ready."""
        pool, reactor = self.make()
        route = Route()
        pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, route)
        self.assertEqual(self.child_requests(reactor.spawned[0]) + self.child_requests(reactor.spawned[1]), [])
        self.ready_all(pool, reactor)
        sent = self.child_requests(reactor.spawned[0]) + self.child_requests(reactor.spawned[1])
        self.assertEqual([m["method"] for m in sent], ["tools/list"])


class IdRewritingTests(PoolTestCase):
    def test_colliding_ids_return_to_their_own_route(self) -> None:
        """Two clients both using id 1 (and one using "1"): unique ids in the child, each answer to its sender."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        routes = [Route(), Route(), Route()]
        ids = [1, 1, "1"]
        for route, id in zip(routes, ids):
            pool.request({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo"}}, route)
        sent = self.child_requests(reactor.spawned[0])
        self.assertEqual(len({m["id"] for m in sent}), 3)
        for n, m in reversed(list(enumerate(sent))):
            reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": m["id"], "result": {"n": n}})
        for n, (route, id) in enumerate(zip(routes, ids)):
            self.assertEqual(route.answers, [(id, {"jsonrpc": "2.0", "id": id, "result": {"n": n}})])
            self.assertIs(type(route.answers[0][1]["id"]), type(id))

    def test_progress_token_rewritten_and_restored(self) -> None:
        """A progress token is made unique too; the child's progress reaches its request's route with the client's token."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        a, b = Route(), Route()
        for route in (a, b):
            pool.request({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"_meta": {"progressToken": "t"}}}, route)
        sent = self.child_requests(reactor.spawned[0])
        tokens = [m["params"]["_meta"]["progressToken"] for m in sent]
        self.assertNotEqual(tokens[0], tokens[1])
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": tokens[1], "progress": 1}})
        self.assertEqual(a.delivered, [])
        self.assertEqual(b.delivered[0]["params"], {"progressToken": "t", "progress": 1})

    def test_progress_with_an_object_token_from_the_child_is_dropped(self) -> None:
        """A child's ``notifications/progress`` whose token is a list or object (never a token the
        pool gave it: those are strings) is dropped; it used to raise ``unhashable type`` in the
        child's line handler. The pool keeps answering (MCP basic/utilities/progress: the token is
        a string or an integer)."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        route = Route()
        pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"_meta": {"progressToken": "t"}}}, route)
        for token in ([1, 2], {"a": 1}):
            reply(reactor.spawned[0], {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": token, "progress": 1}})
        self.assertEqual(route.delivered, [])
        sent = self.child_requests(reactor.spawned[0])
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": sent[0]["id"], "result": {}})
        self.assertEqual(route.answers, [(1, {"jsonrpc": "2.0", "id": 1, "result": {}})])


class DispatchTests(PoolTestCase):
    def test_least_loaded_child(self) -> None:
        """Requests alternate onto the child with the fewest in flight."""
        pool, reactor = self.make()
        self.ready_all(pool, reactor)
        for i in range(4):
            pool.request({"jsonrpc": "2.0", "id": i, "method": "tools/list"}, Route())
        self.assertEqual([c.load for c in pool.children], [2, 2])

    def test_full_pool_refuses(self) -> None:
        """poolQueue requests in flight on every child: PoolFull (the transport answers 503 + Retry-After)."""
        pool, reactor = self.make()
        self.ready_all(pool, reactor)
        for i in range(6):
            pool.request({"jsonrpc": "2.0", "id": i, "method": "tools/list"}, Route())
        with self.assertRaises(PoolFull):
            pool.request({"jsonrpc": "2.0", "id": 99, "method": "tools/list"}, Route())

    def test_cancel_sends_notifications_cancelled(self) -> None:
        """A caller that goes away: the child gets notifications/cancelled for the gateway id; a late answer is dropped."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        route = Route()
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, route)
        pool.cancel(pending)
        last = written(reactor.spawned[0])[-1]
        self.assertEqual(last["method"], "notifications/cancelled")
        self.assertEqual(last["params"]["requestId"], pending.gid)
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": pending.gid, "result": {}})
        self.assertEqual(route.answers, [])
        self.assertEqual(pool.in_flight(), 0)

    def test_timeout(self) -> None:
        """limits.requestTimeout: the client gets -32001 and the child a cancellation."""
        reactor = FakeProcessReactor()
        pool = ChildPool(server(poolSize=1), reactor, request_timeout=5)
        pool.start()
        self.addCleanup(self.shut, pool, reactor)
        self.ready_all(pool, reactor)
        route = Route()
        pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, route)
        reactor.advance(5)
        self.assertEqual(route.answers[0][1]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertEqual(written(reactor.spawned[0])[-1]["method"], "notifications/cancelled")

    def test_one_timer_follows_the_oldest_request(self) -> None:
        """One timer for the pool, not one per request: calls at t=0, 2 and 3 s with a 5 s timeout, the
        first answered at 1 s; the others each time out at their own 5 s."""
        reactor = FakeProcessReactor()
        pool = ChildPool(server(poolSize=1), reactor, request_timeout=5)
        pool.start()
        self.addCleanup(self.shut, pool, reactor)
        self.ready_all(pool, reactor)
        timers = lambda: [d for d in reactor.getDelayedCalls() if getattr(d.func, "__name__", "") == "_expire"]  # noqa: E731
        route = Route()
        first = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, route)
        reactor.advance(1)
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": first.gid, "result": {}})
        reactor.advance(1)
        pool.request({"jsonrpc": "2.0", "id": 2, "method": "tools/call"}, route)
        reactor.advance(1)
        pool.request({"jsonrpc": "2.0", "id": 3, "method": "tools/call"}, route)
        self.assertEqual(len(timers()), 1)
        reactor.advance(3.9)  # t=6.9
        self.assertEqual([id for id, _ in route.answers], [1])
        reactor.advance(0.2)  # t=7.1
        self.assertEqual([id for id, _ in route.answers], [1, 2])
        reactor.advance(1.0)  # t=8.1
        self.assertEqual([(id, a.get("error", {}).get("code")) for id, a in route.answers],
                         [(1, None), (2, jsonrpc.REQUEST_TIMEOUT), (3, jsonrpc.REQUEST_TIMEOUT)])
        self.assertEqual(timers(), [])


class ChildDeathTests(PoolTestCase):
    def test_inflight_fail_at_once_others_untouched_and_refill(self) -> None:
        """A child exits: its requests get a JSON-RPC error at once, the other child's requests are
        answered normally, and a replacement is spawned after the backoff."""
        pool, reactor = self.make()
        self.ready_all(pool, reactor)
        routes = [Route() for _ in range(4)]
        for i, route in enumerate(routes):
            pool.request({"jsonrpc": "2.0", "id": i, "method": "tools/call"}, route)
        dead, alive = reactor.spawned
        dead_ids = {m["id"] for m in self.child_requests(dead)}
        dead.exit(1)
        failed = [r for r in routes if r.answers]
        self.assertEqual(len(failed), 2)
        for r in failed:
            self.assertEqual(r.answers[0][1]["error"]["code"], jsonrpc.CONNECTION_CLOSED)
        for m in self.child_requests(alive):
            self.assertNotIn(m["id"], dead_ids)
            reply(alive, {"jsonrpc": "2.0", "id": m["id"], "result": {"ok": True}})
        self.assertTrue(all(r.answers for r in routes))
        self.assertEqual(sum(1 for r in routes if "result" in r.answers[0][1]), 2)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(reactor.spawned), 3)
        self.ready_all(pool, reactor)
        self.assertEqual(sum(1 for c in pool.children if c.ready), 2)

    def test_backoff_doubles(self) -> None:
        """A child that dies again before initializing waits twice as long to be replaced."""
        _pool, reactor = self.make(poolSize=1)
        reactor.spawned[0].exit(1)
        reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.spawned[1].exit(1)
        reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.advance(BACKOFF_FIRST)
        self.assertEqual(len(reactor.spawned), 3)


class ServerRequestTests(PoolTestCase):
    def test_child_request_without_bridge_is_refused_at_once(self) -> None:
        """sampling/createMessage from a child whose caller cannot be asked: a JSON-RPC error to the child, no hang."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route())
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {}})
        last = written(reactor.spawned[0])[-1]
        self.assertEqual(last["id"], 5)
        self.assertEqual(last["error"]["code"], jsonrpc.METHOD_NOT_FOUND)

    def test_ping_and_idle_roots_answered(self) -> None:
        """The gateway answers its children's ping, and roots/list outside any call with no roots."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": "p", "method": "ping"})
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": "r", "method": "roots/list"})
        self.assertEqual(written(reactor.spawned[0])[-2:], [{"jsonrpc": "2.0", "id": "p", "result": {}},
                                                            {"jsonrpc": "2.0", "id": "r", "result": {"roots": []}}])


class ManagerTests(unittest.TestCase):
    def test_only_pooled_servers_get_a_pool_and_stop_waits_for_children(self) -> None:
        """PoolManager starts a pool per pooled server; stopService fires when every child has exited."""
        config = parse({"mcpServers": {
            "a": {"command": sys.executable, "sessions": "pooled", "poolSize": 2},
            "b": {"command": sys.executable},
        }}, environ={})
        reactor = FakeProcessReactor()
        manager = PoolManager(config, reactor)
        manager.startService()
        self.assertEqual(list(manager.pools), ["a"])
        self.assertEqual(len(reactor.spawned), 2)
        d = manager.stopService()
        self.assertNoResult(d)
        for t in reactor.spawned:
            self.assertEqual(t.stdinClosed, 1)
            t.exit(0)
        self.successResultOf(d)

    def test_session_factory_injected_into_the_session_manager(self) -> None:
        """A pooled server's sessions are PooledSessions whose upstream is a lease on the pool (no child
        of their own); the lease holds the session's subscriptions and gives them back when it ends."""
        from mcpgw.pool import PooledSession, PoolLease
        from mcpgw.session import Session, SessionManager

        config = parse({"mcpServers": {
            "a": {"command": sys.executable, "sessions": "pooled", "poolSize": 1},
            "b": {"command": sys.executable},
        }}, environ={})
        reactor = FakeProcessReactor()
        pools = PoolManager(config, reactor)
        sessions = SessionManager(config, reactor, pooled=pools.session_factory)
        self.assertIsNone(pools.session_factory(config.servers["b"]))
        plain = sessions.create(config.servers["b"], "streamable")
        self.assertIs(type(plain), Session)
        pooled = sessions.create(config.servers["a"], "streamable")
        self.assertIsInstance(pooled, PooledSession)
        lease = pooled.upstream
        self.assertIsInstance(lease, PoolLease)
        self.assertEqual(len(reactor.spawned), 1)  # b's child; a's session spawned nothing
        pool = pools.pools["a"]
        self.assertEqual(pool.listeners, {pooled._notification})
        route = Route()
        pooled.request({"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": "file:///x"}},
                       b"{}", route)
        self.assertEqual(pool._subscriptions, {"file:///x": 1})
        self.successResultOf(pooled.close())
        self.assertTrue(lease.ended)
        self.assertEqual((pool.listeners, pool._subscriptions), (set(), {}))
        self.assertNotIn(pooled.id, sessions.sessions)


class ConfigTests(unittest.TestCase):
    def parse_server(self, **kw: Any) -> ServerConfig:
        return parse({"mcpServers": {"s": {"command": sys.executable, **kw}}}, environ={}).servers["s"]

    def test_defaults(self) -> None:
        """per-client by default; a pooled server gets 4 children of 256 requests each unless told."""
        self.assertEqual(self.parse_server().sessions, "per-client")
        pooled = self.parse_server(sessions="pooled")
        self.assertEqual((pooled.poolSize, pooled.poolQueue, pooled.poolInputWait), (4, 256, 60.0))
        self.assertEqual(self.parse_server(sessions="pooled", poolInputWait=2.5).poolInputWait, 2.5)

    def test_strict(self) -> None:
        """Bad modes, sizes, and pool options on a per-client server are errors naming the key."""
        for kw, key in [({"sessions": "shared"}, "mcpServers.s.sessions"),
                        ({"sessions": "pooled", "poolSize": 0}, "mcpServers.s.poolSize"),
                        ({"sessions": "pooled", "poolSize": True}, "mcpServers.s.poolSize"),
                        ({"sessions": "pooled", "poolSize": 1000}, "mcpServers.s.poolSize"),
                        ({"sessions": "pooled", "poolQueue": "8"}, "mcpServers.s.poolQueue"),
                        ({"sessions": "pooled", "poolInputWait": 0}, "mcpServers.s.poolInputWait"),
                        ({"poolInputWait": 10}, "mcpServers.s.poolInputWait"),
                        ({"poolSize": 2}, "mcpServers.s.poolSize")]:
            with self.assertRaises(ConfigError) as e:
                self.parse_server(**kw)
            self.assertEqual(e.exception.key, key, kw)


class InputBridgeTests(PoolTestCase):
    def test_park_and_resume(self) -> None:
        """A child's sampling request during the only call it runs goes to the call's on_input hook; the
        parked call, resumed with the client's input, answers the child's request and reaches the new route
        under the retry's id."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        first, second = Route(), Route()
        keys: list[str] = []

        def on_input(pending: Any, request: dict[str, Any]) -> bool:
            keys.append(pool.park(pending, request))
            return True

        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, first, on_input=on_input)
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 77, "method": "sampling/createMessage", "params": {}})
        self.assertEqual(len(keys), 1)
        resumed = retry(pool, keys[0], 2, {"sampling": {"role": "assistant"}}, second)
        self.assertIs(resumed, pending)
        self.assertEqual(written(child)[-1], {"jsonrpc": "2.0", "id": 77, "result": {"role": "assistant"}})
        reply(child, {"jsonrpc": "2.0", "id": pending.gid, "result": {"done": True}})
        self.assertEqual(first.answers, [])
        self.assertEqual(second.answers, [(2, {"jsonrpc": "2.0", "id": 2, "result": {"done": True}})])
        self.assertEqual(rejected(pool, keys[0]), "replayed")

    def test_abandoned_parked_call_is_cancelled(self) -> None:
        """No retry within INPUT_WAIT (the default poolInputWait): the child's request gets an error and the
        call is cancelled."""
        from mcpgw.pool import INPUT_WAIT

        reactor = FakeProcessReactor()
        pool = ChildPool(server(poolSize=1), reactor)
        pool.start()
        self.addCleanup(self.shut, pool, reactor)
        self.ready_all(pool, reactor)
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(),
                               on_input=lambda p, r: bool(pool.park(p, r)))
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": 5, "method": "elicitation/create", "params": {}})
        reactor.advance(INPUT_WAIT)
        sent = written(reactor.spawned[0])
        self.assertEqual(sent[-2]["id"], 5)
        self.assertIn("error", sent[-2])
        self.assertEqual(sent[-1]["params"]["requestId"], pending.gid)
        self.assertEqual(pool.in_flight(), 0)
        self.assertEqual(pool.parked(), 0)

    def ask_all(self, pool: ChildPool, flushed: list[Any]) -> Any:
        """An on_input hook that gathers like mcpgw.transports.modern does."""
        return lambda p, r: bool(pool.ask(p, r, lambda inputs, state: flushed.append((p, inputs, state))))

    def test_requests_back_to_back_gathered_under_their_keys(self) -> None:
        """Three requests of one call within INPUT_GATHER: one InputRequiredResult, keys from the child's
        _meta hint (taken out of what the client sees) or from the method (made unique); the retry answers
        each under its own id, a key the client left out gets an error."""
        from mcpgw.pool import INPUT_GATHER

        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        flushed: list[Any] = []
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(), on_input=self.ask_all(pool, flushed))
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create",
                      "params": {"message": "name?", "_meta": {"mcpgw/inputKey": "user_name"}}})
        reply(child, {"jsonrpc": "2.0", "id": 8, "method": "roots/list"})
        reply(child, {"jsonrpc": "2.0", "id": 9, "method": "roots/list", "params": {}})
        self.assertEqual(flushed, [])
        reactor.advance(INPUT_GATHER)
        [(p, inputs, state)] = flushed
        self.assertIs(p, pending)
        self.assertEqual(inputs, {"user_name": {"method": "elicitation/create", "params": {"message": "name?"}},
                                  "roots": {"method": "roots/list"}, "roots_2": {"method": "roots/list", "params": {}}})
        self.assertIs(retry(pool, state, 2, {"user_name": {"action": "accept"}, "roots": {"roots": []}}, Route()), pending)
        answers = {m["id"]: m for m in written(child)[-3:]}
        self.assertEqual(answers[7]["result"], {"action": "accept"})
        self.assertEqual(answers[8]["result"], {"roots": []})
        self.assertEqual(answers[9]["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_parked_call_does_not_block_other_calls_on_its_child(self) -> None:
        """A call parked on an InputRequiredResult nobody retries does not make a later call's request on the
        same child unattributable: that call gets its own InputRequiredResult."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        flushed: list[Any] = []
        first = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(), on_input=self.ask_all(pool, flushed))
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create", "params": {}})
        reactor.advance(1)
        second = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(), on_input=self.ask_all(pool, flushed))
        reply(child, {"jsonrpc": "2.0", "id": 8, "method": "elicitation/create", "params": {}})
        reactor.advance(1)
        self.assertEqual([p for p, _, _ in flushed], [first, second])
        self.assertNotIn(8, [m["id"] for m in written(child) if "error" in m])
        self.assertEqual(pool.parked(), 2)

    def test_configured_input_wait_then_errors_and_cancel(self) -> None:
        """poolInputWait: after it, every request the parked call asked gets an error, then the call is cancelled."""
        pool, reactor = self.make(poolSize=1, poolInputWait=5.0)
        self.ready_all(pool, reactor)
        flushed: list[Any] = []
        route = Route()
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, route, on_input=self.ask_all(pool, flushed))
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create", "params": {}})
        reply(child, {"jsonrpc": "2.0", "id": 8, "method": "sampling/createMessage", "params": {}})
        reactor.advance(1)  # the gathering time: the InputRequiredResult goes out, the wait starts
        self.assertEqual(len(flushed), 1)
        reactor.advance(4.9)
        self.assertEqual(pool.parked(), 1)
        reactor.advance(0.2)
        sent = written(child)
        self.assertEqual([(m["id"], m["error"]["code"]) for m in sent[-3:-1]], [(7, jsonrpc.REQUEST_CANCELLED), (8, jsonrpc.REQUEST_CANCELLED)])
        self.assertEqual(sent[-1]["method"], "notifications/cancelled")
        self.assertEqual(sent[-1]["params"]["requestId"], pending.gid)
        self.assertEqual((pool.parked(), pool.in_flight()), (0, 0))
        self.assertEqual(rejected(pool, flushed[0][2]), "expired")

    def test_call_gone_while_gathering_answers_the_child(self) -> None:
        """The caller goes away before the InputRequiredResult: the child's request is answered with an error."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        flushed: list[Any] = []
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(), on_input=self.ask_all(pool, flushed))
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create", "params": {}})
        pool.cancel(pending)
        reactor.advance(1)
        self.assertEqual(flushed, [])
        sent = written(child)
        self.assertEqual(sent[-2]["id"], 7)
        self.assertEqual(sent[-1]["method"], "notifications/cancelled")


class RequestStateTests(PoolTestCase):
    """requestState is the gateway's own token (2026-07-28 basic/utilities/mrtr, Server Requirements (Basic
    Workflow) 4-5): MAC-protected, bound to the identity that received it, the request it answers and an
    expiry, good for one retry; anything else is StateRejected (-32602 for the client) and no child sees it."""

    def parked(self, owner: str | None = "token:alice", name: str = "ask", **kw: Any) -> tuple[ChildPool, Any, Any, str]:
        pool, reactor = self.make(poolSize=1, **kw)
        self.ready_all(pool, reactor)
        issued: list[str] = []
        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}}, Route(),
                               on_input=lambda p, r: bool(issued.append(pool.park(p, r)) or True), owner=owner)
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": 5, "method": "elicitation/create", "params": {}})
        return pool, reactor, pending, issued[0]

    def assert_child_saw_nothing(self, reactor: Any, before: int) -> None:
        self.assertEqual(len(written(reactor.spawned[0])), before)

    def test_tampered_state_rejected(self) -> None:
        """Any change to the token, or a string the gateway never issued: "tampered"; the call stays parked."""
        pool, reactor, pending, state = self.parked()
        before = len(written(reactor.spawned[0]))
        nonce, expiry, tag = state.split(".")
        for forged in (state + "-TAMPERED", f"{nonce}.{int(expiry) + 1000}.{tag}", f"{nonce}.{expiry}.{'A' * 43}",
                       "x" * 22 + f".{expiry}.{tag}", "", "not-a-state", 12345, None, {"state": state}):
            self.assertEqual(rejected(pool, forged, "token:alice", name="ask"), "tampered", forged)
        self.assert_child_saw_nothing(reactor, before)
        self.assertEqual(pool.parked(), 1)
        self.assertIs(retry(pool, state, 2, {"elicitation": {"action": "decline"}}, Route(), "token:alice", name="ask"), pending)

    def test_foreign_state_rejected_and_the_owner_still_resumes(self) -> None:
        """Issue 15 finding 9: bob presents alice's requestState: "foreign"; alice's retry then works."""
        pool, reactor, pending, state = self.parked(owner="token:alice")
        before = len(written(reactor.spawned[0]))
        self.assertEqual(rejected(pool, state, "token:bob", name="ask"), "foreign")
        self.assertEqual(rejected(pool, state, None, name="ask"), "foreign")  # anonymous is another identity too
        self.assert_child_saw_nothing(reactor, before)
        alice = Route()
        self.assertIs(retry(pool, state, 2, {"elicitation": {"action": "accept"}}, alice, "token:alice", name="ask"), pending)
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": pending.gid, "result": {"ok": 1}})
        self.assertEqual(alice.answers, [(2, {"jsonrpc": "2.0", "id": 2, "result": {"ok": 1}})])

    def test_state_for_another_request_rejected(self) -> None:
        """The token names the originating request (method and name): presented on another one, "mismatch"."""
        pool, reactor, _, state = self.parked()
        self.assertEqual(rejected(pool, state, "token:alice", name="other_tool"), "mismatch")
        self.assertEqual(rejected(pool, state, "token:alice", method="prompts/get", name="ask"), "mismatch")

    def test_replayed_state_rejected(self) -> None:
        """A token is good for one retry: the second use is "replayed" and reaches no child."""
        pool, reactor, _, state = self.parked()
        retry(pool, state, 2, {"elicitation": {"action": "accept"}}, Route(), "token:alice", name="ask")
        before = len(written(reactor.spawned[0]))
        self.assertEqual(rejected(pool, state, "token:alice", name="ask"), "replayed")
        self.assertEqual(rejected(pool, state, "token:bob", name="ask"), "foreign")
        self.assert_child_saw_nothing(reactor, before)

    def test_expired_state_rejected_after_input_wait(self) -> None:
        """poolInputWait over: the call was abandoned in the child; a retry is "expired", not a fresh call."""
        pool, reactor, _, state = self.parked(poolInputWait=5.0)
        reactor.advance(4.9)
        self.assertEqual(pool.parked(), 1)
        reactor.advance(0.1)
        self.assertEqual(pool.parked(), 0)
        before = len(written(reactor.spawned[0]))
        self.assertEqual(rejected(pool, state, "token:alice", name="ask"), "expired")
        self.assert_child_saw_nothing(reactor, before)

    def test_state_of_a_call_that_ended_is_unknown(self) -> None:
        """A genuine, unexpired token whose call is gone (its child exited): "unknown"."""
        pool, reactor, _, state = self.parked()
        reactor.spawned[0].exit(1)
        self.assertEqual(pool.parked(), 0)
        self.assertEqual(rejected(pool, state, "token:alice", name="ask"), "unknown")

    def test_state_of_another_server_or_secret_is_tampered(self) -> None:
        """The MAC covers the server and uses a key derived from session.secret: another pool's token is forged here."""
        pool, reactor, _, state = self.parked()
        other = ChildPool(server(name="q", poolSize=1), FakeProcessReactor(), secret="another secret")
        self.assertEqual(rejected(other, state, "token:alice", name="ask"), "tampered")

    def test_spent_tokens_forgotten_once_expired(self) -> None:
        """Used tokens are remembered (to tell a replay from a forgery) only until their expiry."""
        pool, reactor, first, state = self.parked(poolInputWait=2.0)
        retry(pool, state, 2, {}, Route(), "token:alice", name="ask")
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": first.gid, "result": {}})
        self.assertEqual(len(pool._spent), 1)
        reactor.advance(3)
        issued: list[str] = []
        pending = pool.request({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "ask"}}, Route(),
                               on_input=lambda p, r: bool(issued.append(pool.park(p, r)) or True), owner="token:alice")
        reply(reactor.spawned[0], {"jsonrpc": "2.0", "id": 6, "method": "roots/list"})
        retry(pool, issued[0], 4, {}, Route(), "token:alice", name="ask")
        self.assertEqual(list(pool._spent), [issued[0].split(".")[0]])
        self.assertIsNotNone(pending)

    def test_offered_input_answers_the_child_at_once(self) -> None:
        """inputResponses sent with the call itself (no requestState, SEP-2322 Error Handling): a child request
        of that key is answered from them; one of another key is left to the caller's hook."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        hooked: list[str] = []

        def on_input(p: Any, r: dict[str, Any]) -> bool:
            if pool.answer_offered(p, r):
                return True
            hooked.append(r["method"])
            return True

        pending = pool.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, Route(), on_input=on_input)
        pending.offered = {"user_name": {"action": "accept", "content": {"name": "A"}}, "extra": {"x": 1}}
        child = reactor.spawned[0]
        reply(child, {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create",
                      "params": {"_meta": {"mcpgw/inputKey": "user_name"}}})
        self.assertEqual(written(child)[-1], {"jsonrpc": "2.0", "id": 7, "result": {"action": "accept", "content": {"name": "A"}}})
        reply(child, {"jsonrpc": "2.0", "id": 8, "method": "elicitation/create",
                      "params": {"_meta": {"mcpgw/inputKey": "user_name"}}})
        self.assertEqual(hooked, ["elicitation/create"])  # each offered answer is used once


class ToolHeaderTests(PoolTestCase):
    def test_annotations_parsed(self) -> None:
        """x-mcp-header: names lower-cased, reachable through properties only, primitive non-number types;
        a tool whose header names collide has none."""
        from mcpgw.pool import header_annotations

        schema = {"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "f": {"type": "number", "x-mcp-header": "F"},
            "bad": {"type": "string", "x-mcp-header": "a b"},
            "outer": {"type": "object", "properties": {"flag": {"type": "boolean", "x-mcp-header": "Flag"}}},
            "list": {"type": "array", "items": {"type": "string", "x-mcp-header": "Item"}}}}
        self.assertEqual(header_annotations(schema), [(("region",), "region", "string"), (("n",), "n", "integer"),
                                                      (("outer", "flag"), "flag", "boolean")])
        self.assertEqual(header_annotations({"properties": {"a": {"type": "string", "x-mcp-header": "X"},
                                                            "b": {"type": "string", "x-mcp-header": "x"}}}), [])

    def test_fetched_once_every_page_and_dropped_on_list_changed(self) -> None:
        """headers_of_tools: one tools/list (following nextCursor) however many callers wait; cached until a child
        sends notifications/tools/list_changed."""
        pool, reactor = self.make(poolSize=1)
        self.ready_all(pool, reactor)
        child = reactor.spawned[0]
        got: list[Any] = []
        pool.headers_of_tools().addCallback(got.append)
        pool.headers_of_tools().addCallback(got.append)
        [first] = [m for m in self.child_requests(child) if m["method"] == "tools/list"]
        tool = {"name": "t", "inputSchema": {"type": "object", "properties": {"r": {"type": "string", "x-mcp-header": "R"}}}}
        reply(child, {"jsonrpc": "2.0", "id": first["id"], "result": {"tools": [], "nextCursor": "c2"}})
        second = [m for m in self.child_requests(child) if m["method"] == "tools/list"][-1]
        self.assertEqual(second["params"], {"cursor": "c2"})
        reply(child, {"jsonrpc": "2.0", "id": second["id"], "result": {"tools": [tool]}})
        self.assertEqual(got, [{"t": [(("r",), "r", "string")]}] * 2)
        self.assertIs(self.successResultOf(pool.headers_of_tools()), pool.tool_headers)
        reply(child, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        self.assertIsNone(pool.tool_headers)


class BridgeCapabilityTests(unittest.TestCase):
    """Every bridge refuses a server's request for a client capability the client did not declare (2025-11-25
    basic/lifecycle Capability Negotiation) with what an SDK client without it answers, never forwarding it:
    aggregate members and remote upstreams (the pooled bridges: RequestStateTests, tests/test_request_state.py,
    tests/test_modern_clients.py)."""

    def test_undeclared_and_refusal(self) -> None:
        from mcpgw.pool import capability_refusal, undeclared

        self.assertEqual(undeclared("sampling/createMessage", {}), "sampling")
        self.assertEqual(undeclared("elicitation/create", {"sampling": {}}), "elicitation")
        self.assertEqual(undeclared("roots/list", None), "roots")
        self.assertIsNone(undeclared("roots/list", {"roots": {"listChanged": True}}))
        self.assertIsNone(undeclared("ping", {}))
        refusal = json.loads(capability_refusal(7, "sampling"))
        self.assertEqual(refusal["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertEqual(refusal["error"]["message"], "Sampling not supported: the client did not declare the sampling capability")

    def test_aggregate_member_asking_for_undeclared_capability(self) -> None:
        """A member's elicitation/create in a session whose client declared only sampling: answered to the member,
        never delivered to the client; its sampling request is delivered."""
        from tests.test_aggregate import _aggregate, _send

        agg, fakes, client = _aggregate()
        _send(agg, {"id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}}}})
        for fake in fakes.values():
            fake.reply({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}})
        seen = len(client.messages)
        fakes["a"].say({"jsonrpc": "2.0", "id": 5, "method": "elicitation/create", "params": {}})
        self.assertEqual(len(client.messages), seen)
        self.assertEqual((fakes["a"].sent[-1]["id"], fakes["a"].sent[-1]["error"]["code"]), (5, jsonrpc.INVALID_REQUEST))
        fakes["a"].say({"jsonrpc": "2.0", "id": 6, "method": "sampling/createMessage", "params": {}})
        self.assertEqual(client.messages[-1]["method"], "sampling/createMessage")

    def test_remote_asking_for_undeclared_capability(self) -> None:
        """A remote server's roots/list (on its GET stream) to a client that declared nothing: the gateway POSTs
        the refusal upstream, the client never sees the request."""
        from tests.test_remote_upstream import INITIALIZED, _msg, _wire

        upstream, fake, stub, delegate = _wire()
        fake.stream = b'id: s1\ndata: {"jsonrpc":"2.0","id":"srv-1","method":"roots/list"}\n\n'
        upstream.send(_msg(1, "initialize"))
        stub.flush()
        upstream.send(INITIALIZED)
        stub.flush()
        self.assertEqual([m.get("method") for m in delegate.messages[1:]], [])
        posted = [body for method, _, body in fake.seen if method == b"POST"]
        self.assertEqual(posted[-1]["id"], "srv-1")
        self.assertEqual(posted[-1]["error"]["code"], jsonrpc.INVALID_REQUEST)
        upstream.stop()
        stub.flush()
