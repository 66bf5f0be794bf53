"""Issue 4, step 1: the Redis connection, session store and instance registry against a real redis-server.

Every server is private (tests/redis_server.py: a free port, no persistence);
the machine's Redis on 6379 is never touched. The code under test runs on the
real reactor (it talks to a real server); waiting is on Deferreds that the
code fires itself (state listeners, replies), and the registry's own timer runs
on a ``task.Clock``.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from zope.interface.verify import verifyObject

from mcpgw.store import ISessionStore, SessionRecord
from mcpgw.store.memory import MemorySessionStore
from mcpgw.store.redis import (
    InstanceRegistry,
    Keys,
    RedisAddress,
    RedisConnection,
    RedisSessionStore,
    RedisUnavailable,
    new_instance_id,
    parse_url,
)
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.integration

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary (.ci/run installs it)")


# -- helpers ----------------------------------------------------------------------


def changed(conn: RedisConnection, available: bool) -> defer.Deferred[None]:
    """Fires when ``conn.available`` becomes ``available`` (at once if it is)."""
    if conn.available == available:
        return defer.succeed(None)
    d: defer.Deferred[None] = defer.Deferred()

    def listener(now: bool) -> None:
        if now == available and not d.called:
            d.callback(None)

    conn.on_change(listener)
    return d.addTimeout(15, reactor)


def link_failed(conn: RedisConnection, text: str) -> defer.Deferred[None]:
    """Fires when the command link has reported a problem containing ``text`` (polled on the reactor)."""
    d: defer.Deferred[None] = defer.Deferred()

    def check() -> None:
        problem = conn.problem() or ""
        if text in problem and not d.called:
            loop.stop()
            d.callback(None)

    loop = task.LoopingCall(check)
    loop.start(0.01)
    return d.addTimeout(15, reactor)


async def connect(url: str, password: str | None = None, timeout: float = 2.0) -> RedisConnection:
    conn = RedisConnection(parse_url(url, password), reactor, timeout=timeout)
    conn.startService()
    await changed(conn, True)
    return conn


def resp_int(reply: bytes) -> int:
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r\n")[0])


@pytest.fixture(scope="module")
def redis_with_password():
    server = RedisServer(password="s3cret pass:word")
    yield server
    server.close()


# -- URLs -------------------------------------------------------------------------


class TestParseUrl:
    def test_plain(self):
        """host, port and database number from a redis:// URL; defaults 127.0.0.1:6379/0."""
        assert parse_url("redis://cache.example:6380/4") == RedisAddress(host="cache.example", port=6380, db=4)
        assert parse_url("redis://") == RedisAddress()

    def test_password_in_url_and_override(self):
        """A password in the URL is used; redis.password / REDIS_PASSWORD wins over it."""
        a = parse_url("redis://:p%40ss@h/1")
        assert (a.password, a.username, a.db) == ("p@ss", None, 1)
        assert parse_url("redis://:url@h", "config").password == "config"
        assert parse_url("redis://alice:pw@h").username == "alice"

    def test_password_not_in_repr(self):
        """The password never shows in a repr or describe()."""
        a = parse_url("redis://:topsecret@h:1/2")
        assert "topsecret" not in repr(a) and "topsecret" not in a.describe()

    def test_tls_and_unix(self):
        """rediss:// is TLS (certificate checked unless ssl_cert_reqs=none); unix:// a socket path with ?db=."""
        a = parse_url("rediss://h:6390/0?ssl_ca_certs=/ca.pem")
        assert a.tls and a.verify and a.ca_file == "/ca.pem"
        assert not parse_url("rediss://h?ssl_cert_reqs=none").verify
        u = parse_url("unix:///run/redis.sock?db=3")
        assert (u.path, u.db) == ("/run/redis.sock", 3)

    @pytest.mark.parametrize("url, text", [
        ("http://h", "must start with"),
        ("redis://h/x", "integer"),
        ("redis://h:99999", "not a valid URL"),
        ("redis://h?foo=1", "unknown URL parameter"),
        ("unix://", "socket path"),
    ])
    def test_bad(self, url, text):
        """A bad URL is a ValueError naming the problem (the config turns it into redis.url: ...)."""
        with pytest.raises(ValueError, match=text):
            parse_url(url)

    def test_config_error_names_key(self):
        """redis.url problems stop config loading with the key named."""
        from mcpgw.config import ConfigError, parse

        with pytest.raises(ConfigError, match=r"^redis.url: .*integer"):
            parse({"mcpServers": {"t": {"command": "sh"}}, "redis": {"url": "redis://h/db"}}, environ={})

    def test_instance_ids(self):
        """Instance ids are 9 digits (the high part of SSE stream numbers) and random."""
        ids = {new_instance_id() for _ in range(50)}
        assert len(ids) == 50 and all(len(i) == 9 and i.isdigit() for i in ids)


# -- the connection ---------------------------------------------------------------


@needs_redis
class TestConnection:
    @pytest_twisted.ensureDeferred
    async def test_commands_and_database_number(self, redis):
        """Commands run on the configured database; binary values round-trip."""
        conn = await connect(redis.url_for(5))
        try:
            assert await conn.execute("SET", "k", b"a\x00\xffb") == "OK"
            assert await conn.execute("GET", "k") == b"a\x00\xffb"
            assert resp_int(redis.command("EXISTS", "k")) == 0  # not in db 0
            assert resp_int(redis.command("EXISTS", "k", db=5)) == 1
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_password(self, redis_with_password):
        """AUTH with the configured password (a space and a colon in it) before anything else."""
        conn = await connect(redis_with_password.url_for(0), redis_with_password.password)
        try:
            assert conn.problem() is None
            assert await conn.execute("PING") == "PONG"
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_wrong_password_reported_and_retried(self, redis_with_password):
        """A wrong password: not available, the problem says authentication failed, it keeps trying."""
        conn = RedisConnection(parse_url(redis_with_password.url, "wrong"), reactor, timeout=1)
        conn.startService()
        try:
            await link_failed(conn, "authentication failed")
            assert not conn.available and conn.commands.attempts >= 1
            with pytest.raises(RedisUnavailable, match="authentication failed"):
                await conn.execute("PING")
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_no_password_given(self, redis_with_password):
        """No password for a Redis that wants one: the problem says so."""
        conn = RedisConnection(parse_url(redis_with_password.url), reactor, timeout=1)
        conn.startService()
        try:
            await link_failed(conn, "authentication failed")
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_down_at_start_then_up(self):
        """Redis down at start: 'connection refused', retries with backoff, available once it is up."""
        server = RedisServer()
        port = server.port
        server.stop()
        conn = RedisConnection(parse_url(f"redis://127.0.0.1:{port}/0"), reactor, timeout=1)
        conn.startService()
        try:
            await link_failed(conn, "connection refused")
            assert not conn.available
            failed = conn.execute("GET", "x")  # fails at once, does not wait for a connection
            assert failed.called
            with pytest.raises(RedisUnavailable, match="connection refused"):
                await failed
            server.start()
            await changed(conn, True)
            assert conn.problem() is None
            assert await conn.execute("PING") == "PONG"
        finally:
            await conn.stopService()
            server.close()

    def test_backoff_doubles_to_a_cap(self):
        """Reconnect delays double from initial_delay up to max_delay (with +-20% jitter)."""
        conn = RedisConnection(RedisAddress(), reactor)
        delays = [conn.backoff(n) for n in range(1, 12)]
        assert 0.15 < delays[0] < 0.25 and 0.3 < delays[1] < 0.5
        assert all(d <= conn.max_delay * 1.2 for d in delays) and delays[-1] >= conn.max_delay * 0.8

    @pytest_twisted.ensureDeferred
    async def test_silent_server_times_out(self):
        """A server that accepts but never answers: the handshake times out, reported as such."""
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        conn = RedisConnection(parse_url(f"redis://127.0.0.1:{port.getHost().port}"), reactor, timeout=0.2,
                               connect_timeout=0.5)
        conn.startService()
        try:
            await link_failed(conn, "timed out")
        finally:
            await conn.stopService()
            await port.stopListening()

    @pytest_twisted.ensureDeferred
    async def test_command_timeout_reconnects(self):
        """A command Redis does not answer within the timeout fails with RedisUnavailable; the
        connection is re-opened and works once Redis answers again (SIGSTOP/SIGCONT)."""
        server = RedisServer()
        conn = await connect(server.url, timeout=0.3)
        try:
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(RedisUnavailable, match="did not answer GET within 0.3s"):
                    await conn.execute("GET", "x")
                await changed(conn, False)  # the connection is dropped...
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            await changed(conn, True)  # ...and made again
            assert await conn.execute("PING") == "PONG"
        finally:
            await conn.stopService()
            server.close()

    @pytest_twisted.ensureDeferred
    async def test_pubsub_and_resubscribe_after_restart(self):
        """PUBLISH reaches the subscribed handler and counts it; after a Redis restart the
        subscription is made again by itself."""
        server = RedisServer()
        conn = await connect(server.url)
        try:
            got: list[bytes] = []
            arrived: list[defer.Deferred[None]] = [defer.Deferred()]

            def handler(message: bytes) -> None:
                got.append(message)
                arrived[0].callback(None)

            await conn.subscribe("mcpgw:to:1", handler)
            assert await conn.publish("mcpgw:to:1", b"one\nline two") == 1
            await arrived[0]
            assert await conn.publish("mcpgw:to:nobody", b"x") == 0
            server.restart()
            await changed(conn, False)
            await changed(conn, True)
            arrived[0] = defer.Deferred()
            assert await conn.publish("mcpgw:to:1", b"two") == 1
            await arrived[0]
            assert got == [b"one\nline two", b"two"]
        finally:
            await conn.stopService()
            server.close()


# -- the store ----------------------------------------------------------------------


@needs_redis
class TestSessionStore:
    @pytest_twisted.ensureDeferred
    async def test_interface(self, redis):
        """RedisSessionStore provides ISessionStore (every method Deferred-returning)."""
        conn = RedisConnection(parse_url(redis.url), reactor)
        store = RedisSessionStore(conn, Keys(), "111111111", 60.0, reactor)
        assert verifyObject(ISessionStore, store)

    @pytest_twisted.ensureDeferred
    async def test_record_seen_by_another_instance(self, redis):
        """A record added by one instance is read whole by another: server, transport, version,
        owning instance, created, last seen, identity."""
        a, b = await connect(redis.url), await connect(redis.url)
        try:
            mine = RedisSessionStore(a, Keys(), "111111111", 60.0, reactor)
            theirs = RedisSessionStore(b, Keys(), "222222222", 60.0, reactor)
            now = reactor.seconds()
            await mine.add(SessionRecord("sid-1", "time", "streamable", now, owner="alice"))
            await mine.update("sid-1", protocol_version="2025-06-18")
            record = await theirs.get("sid-1")
            assert record == SessionRecord("sid-1", "time", "streamable", now, "2025-06-18", "111111111", now, "alice")
            assert await theirs.get("unknown") is None
        finally:
            await a.stopService()
            await b.stopService()

    @pytest_twisted.ensureDeferred
    async def test_idle_expiry_from_max_age(self, redis):
        """A record's TTL is session.maxAge (minus the idle time so far) plus the grace."""
        conn = await connect(redis.url)
        clock = task.Clock()
        clock.advance(1000)
        try:
            store = RedisSessionStore(conn, Keys(), "111111111", 60.0, clock, grace=5)
            await store.add(SessionRecord("fresh", "time", "streamable", 1000.0))
            await store.add(SessionRecord("idle", "time", "streamable", 970.0))
            await store.add(SessionRecord("sse", "time", "sse", 900.0))
            fresh = await conn.execute("PTTL", "mcpgw:session:fresh")
            idle = await conn.execute("PTTL", "mcpgw:session:idle")
            sse = await conn.execute("PTTL", "mcpgw:session:sse")
            assert 64_000 < fresh <= 65_000
            assert 34_000 < idle <= 35_000
            assert 64_000 < sse <= 65_000  # connected transports: never idle while owned
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_touch_refreshes_and_rewrites_lost_records(self, redis):
        """touch() refreshes seen and TTL in one script; a record Redis lost is written whole again."""
        conn = await connect(redis.url)
        clock = task.Clock()
        clock.advance(1000)
        try:
            store = RedisSessionStore(conn, Keys(), "111111111", 60.0, clock, grace=0)
            await store.add(SessionRecord("a", "time", "streamable", 1000.0))
            await store.add(SessionRecord("b", "time", "streamable", 1000.0))
            clock.advance(50)
            await conn.execute("DEL", "mcpgw:session:b")
            calls = []
            execute = conn.execute
            conn.execute = lambda *args: calls.append(args[0]) or execute(*args)  # type: ignore[method-assign]
            await store.touch({"a": 1049.0, "b": 1049.0, "not-mine": 1049.0})
            assert calls[0] == "EVALSHA"
            ttl = await execute("PTTL", "mcpgw:session:a")
            assert 58_000 < ttl <= 59_000
            assert (await RedisSessionStore(conn, Keys(), "x", 0.001, clock).get("b")).last_seen == 1049.0
            assert await execute("EXISTS", "mcpgw:session:not-mine") == 0
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_remove_deletes_record_and_event_logs(self, redis):
        """remove() deletes the record and every event-log key listed for the session; twice is harmless."""
        conn = await connect(redis.url)
        try:
            store = RedisSessionStore(conn, Keys(), "111111111", 60.0, reactor)
            await store.add(SessionRecord("s", "time", "streamable", reactor.seconds()))
            await conn.execute("XADD", "mcpgw:events:s:5", "1-0", "e", b"x")
            await conn.execute("SADD", "mcpgw:streams:s", "mcpgw:events:s:5")
            await store.remove("s")
            await store.remove("s")
            assert await conn.execute("EXISTS", "mcpgw:session:s", "mcpgw:events:s:5", "mcpgw:streams:s") == 0
            assert await store.get("s") is None
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_own_records_without_round_trip(self, redis):
        """The owning instance reads its own records from memory: get() works with Redis down."""
        conn = await connect(redis.url)
        store = RedisSessionStore(conn, Keys(), "111111111", 60.0, reactor)
        await store.add(SessionRecord("s", "time", "streamable", reactor.seconds()))
        await conn.stopService()
        record = await store.get("s")
        assert record is not None and record.instance == "111111111"
        with pytest.raises(RedisUnavailable):
            await store.get("someone-elses")

    @pytest_twisted.ensureDeferred
    async def test_key_prefix(self, redis):
        """redis.keyPrefix prefixes every key."""
        conn = await connect(redis.url)
        try:
            store = RedisSessionStore(conn, Keys("blue:"), "111111111", 60.0, reactor)
            await store.add(SessionRecord("s", "time", "ws", reactor.seconds()))
            assert await conn.execute("EXISTS", "blue:session:s") == 1
        finally:
            await conn.stopService()


class TestMemoryStore:
    def test_update_and_touch(self):
        """The memory store's update() and touch() change the record; every method has fired."""
        store = MemorySessionStore()
        record = SessionRecord("s", "time", "streamable", 1.0)
        assert store.add(record).called
        store.update("s", protocol_version="2025-11-25")
        store.touch({"s": 9.0, "other": 1.0})
        assert (record.protocol_version, record.last_seen) == ("2025-11-25", 9.0)


# -- the registry -------------------------------------------------------------------


class FakeSession:
    def __init__(self, id: str, transport: str = "streamable", last_seen: float = 0.0):
        self.id = id
        self.transport = transport
        self.last_seen = last_seen


@needs_redis
class TestRegistry:
    @pytest_twisted.ensureDeferred
    async def test_heartbeat_key_with_ttl_and_alive(self, redis):
        """Each beat SETs PREFIX instance:ID with a TTL of 3 heartbeats; alive() reads it; stopping
        deletes it at once."""
        conn = await connect(redis.url)
        clock = task.Clock()
        try:
            store = RedisSessionStore(conn, Keys(), "123456789", 60.0, clock)
            registry = InstanceRegistry(conn, store, clock, interval=0.5)
            registry.startService()
            ttl = await conn.execute("PTTL", "mcpgw:instance:123456789")
            assert 1000 < ttl <= 1500
            heartbeat = json.loads(await conn.execute("GET", "mcpgw:instance:123456789"))
            assert heartbeat["redis"] == conn.run_id and heartbeat["pid"] == os.getpid()
            other = InstanceRegistry(conn, RedisSessionStore(conn, Keys(), "999999999", 0.001, clock), clock)
            assert await other.alive("123456789") is True
            assert await other.alive("555555555") is False
            await registry.stopService()
            assert await other.alive("123456789") is False
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_killed_instance_is_dead_before_its_heartbeat_expires(self, redis):
        """alive(connected=True): an instance whose heartbeat key is still there but which holds no
        connection to Redis (its process was killed) is dead; one whose pub/sub connection alone
        is gone is alive. A heartbeat from an earlier run of Redis: the heartbeat alone decides."""
        conn = await connect(redis.url)
        conn.client_name = "mcpgw:instance:123456789"
        clock = task.Clock()
        owner = RedisConnection(parse_url(redis.url), reactor)
        owner.client_name = "mcpgw:instance:123456789"
        owner.startService()
        await changed(owner, True)
        try:
            registry = InstanceRegistry(conn, RedisSessionStore(conn, Keys(), "999999999", 0.001, clock), clock, interval=0.5)
            # Heartbeats written before Redis restarted (another run_id): only the heartbeat is trusted.
            for instance in ("123456789", "555555555"):
                await conn.execute("SET", f"mcpgw:instance:{instance}", '{"redis": "an-earlier-run"}', "PX", 60_000)
            assert await registry.alive("555555555", connected=True) is True
            assert conn.run_id
            for instance in ("123456789", "555555555"):
                await conn.execute("SET", f"mcpgw:instance:{instance}", f'{{"redis": "{conn.run_id}"}}', "PX", 60_000)
            assert await registry.alive("555555555", connected=True) is False  # killed: no connection
            assert await registry.alive("555555555") is True  # the heartbeat alone still says alive
            assert await registry.alive("123456789", connected=True) is True
            # The owner loses its pub/sub connection only: still alive.
            await owner.pubsub.stop()
            assert await registry.alive("123456789", connected=True) is True
            await owner.stopService()
            assert await registry.alive("123456789", connected=True) is False
            # A Redis that refuses CLIENT LIST: the heartbeat decides.
            conn.client_list_refused = True
            assert await registry.alive("555555555", connected=True) is True
        finally:
            await owner.stopService()
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_touches_are_batched(self, redis):
        """However often sessions are used, the registry refreshes their records once per
        touch interval, in one script, and only the ones used since (SSE/WS always)."""
        conn = await connect(redis.url)
        clock = task.Clock()
        try:
            store = RedisSessionStore(conn, Keys(), "123456789", 60.0, clock)
            sessions = [FakeSession(f"s{i}") for i in range(20)] + [FakeSession("sse", "sse")]
            for s in sessions:
                await store.add(SessionRecord(s.id, "time", s.transport, 0.0))
            registry = InstanceRegistry(conn, store, clock, interval=1.0, sessions=lambda: sessions, touch_interval=10)
            calls: list[tuple[Any, ...]] = []
            execute = conn.execute
            conn.execute = lambda *args: calls.append(args) or execute(*args)  # type: ignore[method-assign]
            registry.startService()
            for second in range(1, 10):
                for s in sessions[:5]:
                    s.last_seen = float(second)  # 5 sessions used every second
                clock.advance(1)
            assert [c for c in calls if c[0] == "EVALSHA"] == []
            clock.advance(1)  # 10 s: the touch
            touches = [c for c in calls if c[0] == "EVALSHA"]
            assert len(touches) == 1
            touched = [k for k in touches[0][3:3 + touches[0][2]]]
            assert sorted(touched) == sorted([f"mcpgw:session:s{i}" for i in range(5)] + ["mcpgw:session:sse"])
            await registry.stopService()
            assert (await store.get("s0")).last_seen == 9.0
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_restart_restores_heartbeat_and_records(self):
        """Redis restarted empty: when the connection is back the registry writes the heartbeat
        and every owned record again."""
        server = RedisServer()
        conn = await connect(server.url)
        clock = task.Clock()
        try:
            store = RedisSessionStore(conn, Keys(), "123456789", 60.0, clock)
            await store.add(SessionRecord("s", "time", "streamable", 0.0))
            registry = InstanceRegistry(conn, store, clock, interval=1.0)
            registry.startService()
            server.restart()
            await changed(conn, False)
            await changed(conn, True)
            await registry.restoring
            assert await conn.execute("EXISTS", "mcpgw:session:s") == 1
            assert await conn.execute("EXISTS", "mcpgw:instance:123456789") == 1
            await registry.stopService()
        finally:
            await conn.stopService()
            server.close()


# -- shared rate-limit counters --------------------------------------------------------


@needs_redis
class TestRedisRateLimiter:
    def test_interface(self):
        """RedisRateLimiter provides mcpgw.ratelimit.IRateLimiter."""
        from mcpgw.ratelimit import IRateLimiter
        from mcpgw.store.redis import RedisRateLimiter

        limiter = RedisRateLimiter(RedisConnection(RedisAddress(), reactor), Keys(), 5, 60.0, task.Clock())
        assert verifyObject(IRateLimiter, limiter)

    @pytest_twisted.ensureDeferred
    async def test_one_window_for_all_instances(self, redis):
        """Two instances' limiters count the same key in one window: the limit holds for the
        cluster; the decision carries remaining hits and the time left in the window."""
        from mcpgw.store.redis import RedisRateLimiter

        a, b = await connect(redis.url), await connect(redis.url)
        try:
            one = RedisRateLimiter(a, Keys(), 3, 60.0, task.Clock())
            two = RedisRateLimiter(b, Keys(), 3, 60.0, task.Clock())
            decisions = [await one.hit("ip:10.0.0.1"), await two.hit("ip:10.0.0.1"), await one.hit("ip:10.0.0.1"),
                         await two.hit("ip:10.0.0.1")]
            assert [(d.allowed, d.remaining) for d in decisions] == [(True, 2), (True, 1), (True, 0), (False, 0)]
            assert all(59.0 < d.reset_after <= 60.0 and d.window == 60.0 and d.limit == 3 for d in decisions)
            other = await two.hit("ip:10.0.0.2")
            assert (other.allowed, other.remaining) == (True, 2)
            ttl = await a.execute("PTTL", "mcpgw:rate:ip:10.0.0.1")
            assert 59_000 < ttl <= 60_000
        finally:
            await a.stopService()
            await b.stopService()

    @pytest_twisted.ensureDeferred
    async def test_new_window_after_expiry(self, redis):
        """When the window's key has expired the count starts again."""
        from mcpgw.store.redis import RedisRateLimiter

        conn = await connect(redis.url)
        try:
            limiter = RedisRateLimiter(conn, Keys(), 1, 60.0, task.Clock())
            assert (await limiter.hit("k")).allowed
            assert not (await limiter.hit("k")).allowed
            await conn.execute("DEL", "mcpgw:rate:k")  # as when Redis expires it at the window's end
            assert (await limiter.hit("k")).allowed
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_redis_down_counts_locally(self, redis):
        """Redis unavailable: the limiter decides at once from a per-instance count (no errback,
        no waiting), and goes back to Redis when it returns."""
        from mcpgw.store.redis import RedisRateLimiter

        conn = await connect(redis.url)
        limiter = RedisRateLimiter(conn, Keys(), 2, 60.0, task.Clock())
        await conn.stopService()
        decisions = [limiter.hit("k") for _ in range(3)]
        assert all(d.called for d in decisions)
        assert [(await d).allowed for d in decisions] == [True, True, False]


@pytest.fixture(scope="class")
def tls_redis():
    """A TLS redis-server for TestTls (a module-level function: pytest 10 refuses class-scoped fixtures defined as
    methods)."""
    server = RedisServer(password="tls pw", tls=True)
    yield server
    server.close()


@needs_redis
class TestTls:
    @pytest_twisted.ensureDeferred
    async def test_rediss_with_ca_file(self, tls_redis):
        """rediss:// with ssl_ca_certs: TLS, the certificate checked against that CA, AUTH inside."""
        conn = await connect(tls_redis.url, tls_redis.password)
        try:
            assert await conn.execute("PING") == "PONG"
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_rediss_untrusted_certificate_refused(self, tls_redis):
        """rediss:// without the CA: the self-signed certificate is refused (reported, retried)."""
        conn = RedisConnection(parse_url(f"rediss://127.0.0.1:{tls_redis.port}/0", tls_redis.password), reactor, timeout=1)
        conn.startService()
        try:
            await link_failed(conn, "certificate")
            assert not conn.available
        finally:
            await conn.stopService()

    @pytest_twisted.ensureDeferred
    async def test_rediss_without_verification(self, tls_redis):
        """ssl_cert_reqs=none: TLS without checking the certificate."""
        url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=none"
        conn = await connect(url, tls_redis.password)
        try:
            assert await conn.execute("PING") == "PONG"
        finally:
            await conn.stopService()
