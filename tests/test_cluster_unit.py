"""Several gateway instances in one process, on one Clock and an in-memory bus (mcpgw.cluster.memory).

Layer: unit. Each instance is a whole gateway (tests/harness.py: its real site and channel, its
children played by FakeMcpServer), built by ``mcpgw.Gateway.from_config`` with a ``redis``
section; its ``Cluster`` stands on a ``MemoryWorld`` instead of Redis. They share one
``FakeProcessReactor``, so what one instance publishes reaches the others when the clock turns, and
waiting is virtual time. The same behaviours as tests/test_cluster.py (the integration layer, with
real processes and a real redis-server), plus the races a real Redis cannot be made to play:
a message in flight while its session ends, or while its owner dies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher

import mcpgw.cluster
from mcpgw import Gateway
from mcpgw.cluster import wire
from mcpgw.cluster.memory import MemoryWorld
from mcpgw.cluster.service import Cluster
from tests import wire as http
from tests.fake_process import UNREAL_PID, FakeMcpServer, FakeProcessReactor
from tests.harness import HOST, PORT, Connection, Harness, parse_responses
from tests.wire import LATEST, POST_HEADERS, SESSION_NOT_FOUND, messages_of, session_headers

SECRET = "cluster-unit-secret-0123456789abcdef"
HEARTBEAT = 0.3


class Instance(Harness):
    """One gateway of the cluster: a Harness on the cluster's shared clock."""

    def __init__(self, config: dict[str, Any], clock: FakeProcessReactor, world: MemoryWorld):
        self.clock = clock
        self.world = world
        self._events: list[dict[str, Any]] = []
        self._observer = cast(ILogObserver, self._events.append)
        globalLogPublisher.addObserver(self._observer)
        self.connections: list[Connection] = []
        self._next_peer_port = 40000
        self.gateway = Gateway.from_config({"host": HOST, "port": PORT, **config}, reactor=clock)
        self.gateway.start()
        self.cluster: Cluster = cast(Any, self.gateway.service).context.cluster
        self.instance = self.cluster.instance
        self.pump()

    def kill(self) -> None:
        """SIGKILL: the connection is gone at once; the heartbeat stays until it expires."""
        self.world.kill(self.instance)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], list[Instance]]]:
    clock = FakeProcessReactor(program=FakeMcpServer, first_pid=UNREAL_PID)
    world = MemoryWorld(clock)
    numbers = iter(range(100_000_001, 100_000_100))

    def memory_cluster(config: Any, reactor: Any, metrics: Any = None) -> Cluster:
        return Cluster(config, reactor, metrics, backend=world.backend(str(next(numbers))))

    monkeypatch.setattr(mcpgw.cluster, "Cluster", memory_cluster)  # what mcpgw.tap builds
    started: list[Instance] = []
    config = http.config(session={"secret": SECRET},
                         redis={"url": "redis://127.0.0.1:9/0", "heartbeat": HEARTBEAT, "timeout": 1.0})

    def start(n: int = 2, **extra: Any) -> list[Instance]:
        started.extend(Instance({**config, **extra}, clock, world) for _ in range(n))
        return started[-n:]

    yield start
    for instance in started:
        if instance.gateway.service.running:
            instance.close(check=False)
        else:
            globalLogPublisher.removeObserver(instance._observer)


def post(h: Instance, sid: str, message: Any, version: str = LATEST) -> Any:
    with h.client() as c:
        return c.post("/mcp", headers=session_headers(sid, version), json=message)


def open_session(h: Instance, version: str = LATEST) -> str:
    with h.client() as c:
        return http.open_session(c, version)


def raw_get(h: Instance, sid: str, last_event_id: str | None = None, version: str = LATEST) -> Connection:
    """A GET /mcp held open on ``h``, as raw bytes."""
    conn = h.connect()
    extra = b"" if last_event_id is None else b"last-event-id: %s\r\n" % last_event_id.encode()
    conn.send(b"GET /mcp HTTP/1.1\r\nhost: %s:%d\r\naccept: text/event-stream\r\nmcp-session-id: %s\r\n"
              b"mcp-protocol-version: %s\r\n%s\r\n" % (HOST.encode(), PORT, sid.encode(), version.encode(), extra))
    return conn


def raw_post(h: Instance, sid: str, message: Any) -> Connection:
    conn = h.connect()
    body = json.dumps(message).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in session_headers(sid).items())
    conn.send(b"POST /mcp HTTP/1.1\r\nhost: %s:%d\r\n%scontent-length: %d\r\n\r\n%s"
              % (HOST.encode(), PORT, head.encode(), len(body), body))
    return conn


def status(conn: Connection) -> int:
    return parse_responses(conn.received)[0].status if conn.received else 0


def sse(conn: Connection) -> list[tuple[str, Any]]:
    """(id, message) of every event with data on a raw SSE response so far."""
    [response] = parse_responses(conn.received)[:1]
    body = response.take_body()
    return [(m[1].decode(), json.loads(m[2])) for m in re.finditer(rb"id: ([^\r\n]*)\r?\ndata: ([^\r\n]+)\r?\n", body)]


def ended(conn: Connection) -> bool:
    """The response is complete (a chunked body's last chunk) or the connection closed."""
    responses = parse_responses(conn.received)
    return conn.closed or bool(responses and responses[0].complete)


# -- Streamable HTTP across instances ---------------------------------------------------


def test_post_to_another_instance(cluster):
    """Requests, notifications and a progress stream through B for a session owned by A: every
    reply comes back to the POST that asked, on B."""
    a, b = cluster(2)
    sid = open_session(a)
    for i in range(1, 4):
        r = post(b, sid, http.tool_call(i, "echo", {"text": f"via B {i}"}))
        assert r.status_code == 200, r.text
        assert r.json()["id"] == i and r.json()["result"]["content"][0]["text"] == f"via B {i}"
    r = post(b, sid, http.notification("notifications/progress", {"progressToken": "x", "progress": 1}))
    assert r.status_code == 202
    r = post(b, sid, http.request(9, "ping"))
    assert r.status_code == 200 and r.json() == {"jsonrpc": "2.0", "id": 9, "result": {}}
    r = post(b, sid, http.tool_call(7, "sleep", {"seconds": 0.2}, progress="tok"))
    messages = messages_of(r)
    assert [m.get("method") for m in messages] == ["notifications/progress", "notifications/progress", None]
    assert messages[-1]["id"] == 7
    assert b.cluster.routes.routes == {} and a.cluster.owner.routes_out == {}


def test_the_registry_refreshes_the_records_of_this_instances_sessions(cluster):
    """``Cluster.bind`` gives the instance registry the SessionManager's live sessions: the ones whose
    records its heartbeat loop keeps from expiring."""
    a, b = cluster(2)
    sid = open_session(a)
    assert [s.id for s in a.cluster.backend.registry.sessions()] == [sid]
    assert list(b.cluster.backend.registry.sessions()) == []


def test_delete_through_another_instance(cluster):
    """DELETE through B ends the session on A (its child stops); both answer 404 after."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.tool_call(1, "echo", {"text": "x"})).status_code == 200
    with b.client() as c:
        assert c.delete("/mcp", headers={"mcp-session-id": sid}).status_code == 200
    a.pump()
    assert "client ended the session (DELETE)" in a.log()
    for h in (a, b):
        r = post(h, sid, http.tool_call(2, "echo", {"text": "after"}))
        http.assert_jsonrpc_error(r, 404, SESSION_NOT_FOUND)


def test_unknown_and_forged_sessions(cluster, monkeypatch):
    """A well-formed but unknown id is 404 on every instance after a lookup; a forged one is 404
    without a lookup."""
    a, b = cluster(2)
    sid = open_session(b)
    with b.client() as c:
        c.delete("/mcp", headers={"mcp-session-id": sid})
    lookups: list[str] = []
    store = a.cluster.directory.store
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda session_id: (lookups.append(session_id), real_get(session_id))[1])
    for h in (a, b):
        http.assert_jsonrpc_error(post(h, sid, http.request(1, "ping")), 404, SESSION_NOT_FOUND)
    assert lookups == [sid]
    forged = "x" * 22 + "." + "y" * 22
    for h in (a, b):
        http.assert_jsonrpc_error(post(h, forged, http.request(1, "ping")), 404, SESSION_NOT_FOUND)
    assert lookups == [sid]


def test_concurrent_first_requests_share_one_lookup(cluster, monkeypatch):
    """Two POSTs for a session B has not seen yet, both waiting for its record: one lookup, two answers."""
    a, b = cluster(2)
    sid = open_session(a)
    b.world.bus.hold()
    lookups: list[str] = []
    store = b.cluster.directory.store
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda session_id: (lookups.append(session_id), real_get(session_id))[1])
    first = raw_post(b, sid, http.tool_call(1, "echo", {"text": "one"}))
    second = raw_post(b, sid, http.tool_call(2, "echo", {"text": "two"}))
    b.world.bus.release()
    assert b.run_until(lambda: ended(first) and ended(second), 5)
    assert lookups == [sid]
    assert (status(first), status(second)) == (200, 200)


# -- HTTP+SSE across instances ---------------------------------------------------------


def test_legacy_messages_to_another_instance(cluster):
    """GET /sse on A, POST /messages through B: 202 from B, the replies on A's stream."""
    a, b = cluster(2)
    stream = a.open_sse()
    with b.client() as c:
        r = c.post(stream.endpoint, headers=POST_HEADERS, json=http.initialize(version="2024-11-05"))
        assert r.status_code == 202, r.text
        assert a.run_until(lambda: b'"protocolVersion"' in stream.received, 5)
        r = c.post(stream.endpoint, headers=POST_HEADERS, json=http.tool_call(3, "echo", {"text": "legacy via B"}))
        assert r.status_code == 202
        assert a.run_until(lambda: b"legacy via B" in stream.received, 5)
        r = c.post(stream.endpoint, headers=POST_HEADERS, json=http.request(50, "server/discover"))
        assert r.status_code == 202
        assert a.run_until(lambda: b"-32601" in stream.received, 5), stream.received
    stream.close()


def test_legacy_tools_list_through_another_instance_hides_what_the_token_may_not_call(cluster, monkeypatch):
    """auth.oauth.toolScopes across instances: the answer goes out on the owner's stream, so the
    forwarding instance sends what the token may not see with the request and the owner leaves it out."""
    from tests.test_oauth_unit import ISSUER, FakeHttp, as_routes
    from tests.test_oauth_unit import token as signed

    http_client = FakeHttp(as_routes())
    monkeypatch.setattr("mcpgw.auth.TreqHttp", lambda reactor: http_client)
    gw = f"http://{HOST}:{PORT}"
    a, b = cluster(2, auth={"oauth": {"resource": gw, "authorizationServers": [ISSUER],
                                      "toolScopes": {"fx": {"sleep": ["files:write"]}}}})
    now = a.clock.seconds()
    reader = {"authorization": "Bearer " + signed(aud=gw, scope="files:read", iat=now, exp=now + 600)}
    stream = a.open_sse("/sse", reader)
    with b.client() as c:
        headers = {**POST_HEADERS, **reader}
        assert c.post(stream.endpoint, headers=headers, json=http.initialize(version="2024-11-05")).status_code == 202
        assert a.run_until(lambda: b'"protocolVersion"' in stream.received, 5)
        assert c.post(stream.endpoint, headers=headers, json=http.request(7, "tools/list")).status_code == 202
        assert a.run_until(lambda: b'"id":7' in stream.received, 5)
    listed = [line for line in stream.received.split(b"\n") if b'"id":7' in line]
    assert b'"echo"' in listed[0] and b'"sleep"' not in listed[0]
    stream.close()


# -- GET streams and resumption across instances ---------------------------------------


def test_get_stream_on_another_instance(cluster):
    """The GET stream opened on B carries A's session notifications; a second GET on A is 409."""
    a, b = cluster(2)
    sid = open_session(a)
    get = raw_get(b, sid)
    assert b.run_until(lambda: status(get) == 200, 5)
    second = raw_get(a, sid)
    assert a.run_until(lambda: ended(second), 5) and status(second) == 409
    replies = messages_of(post(a, sid, http.tool_call(3, "notify", {"message": "hi"})))
    assert [m.get("method") for m in replies] == ["notifications/message", None]
    assert b.run_until(lambda: any(m.get("method") == "notifications/tools/list_changed" for _, m in sse(get)), 5)


def test_resume_on_another_instance(cluster):
    """A call through B becomes a stream; the client drops it mid-call and resumes with
    Last-Event-ID on C: the reply arrives exactly once, after the events it missed."""
    a, b, c = cluster(3)
    sid = open_session(a)
    call = raw_post(b, sid, http.tool_call(5, "sleep", {"seconds": 1.0}, progress="p"))
    assert b.run_until(lambda: any(m.get("method") == "notifications/progress" for _, m in sse(call)), 5)
    last_id = [i for i, m in sse(call) if m.get("method") == "notifications/progress"][0]
    call.hang_up()
    resumed = raw_get(c, sid, last_event_id=last_id)
    assert c.run_until(lambda: ended(resumed), 5)
    assert status(resumed) == 200
    messages = [m for _, m in sse(resumed)]
    finals = [m for m in messages if m.get("id") == 5]
    assert len(finals) == 1 and finals[0]["result"]["content"][0]["text"] == "slept 1.0", messages
    assert messages[-1]["id"] == 5


def test_get_stream_resumed_on_third_instance(cluster):
    """The GET stream held on B is dropped with two events unread; resumed on C, they arrive (from
    the event log) exactly once, and later ones follow live from B."""
    a, b, c = cluster(3)
    sid = open_session(a)
    get = raw_get(b, sid)
    assert b.run_until(lambda: status(get) == 200, 5)

    def notify(text: str) -> None:
        assert messages_of(post(a, sid, http.tool_call(text, "notify", {"message": text})))[-1]["result"]

    notify("one")
    assert b.run_until(lambda: len(sse(get)) == 1, 5)
    [(last_id, _)] = sse(get)
    notify("two")  # written to B's response; the client does not read them
    notify("three")
    assert b.run_until(lambda: len(sse(get)) == 3, 5)
    get.hang_up()
    resumed = raw_get(c, sid, last_event_id=last_id)
    assert c.run_until(lambda: len(sse(resumed)) == 2, 5), resumed.received
    notify("four")
    assert c.run_until(lambda: len(sse(resumed)) == 3, 5), resumed.received
    events = sse(resumed)
    assert [m["method"] for _, m in events] == ["notifications/tools/list_changed"] * 3
    ids = [i for i, _ in events]
    assert len(set(ids)) == 3 and last_id not in ids


def test_unknown_stream_on_resume_opens_a_fresh_get(cluster):
    """Last-Event-ID naming a stream of an instance that does not know it (and nothing logged):
    as for an unknown id on one instance, a new GET stream."""
    a, b = cluster(2)
    sid = open_session(a)
    unknown = f"{int(a.instance) * mcpgw.cluster.STREAM_BASE + 999}_3"
    get = raw_get(b, sid, last_event_id=unknown)
    assert b.run_until(lambda: status(get) == 200, 5)
    assert not ended(get)
    messages_of(post(a, sid, http.tool_call(1, "notify", {"message": "x"})))
    assert b.run_until(lambda: any(m.get("method") == "notifications/tools/list_changed" for _, m in sse(get)), 5)


# -- an owner that goes away --------------------------------------------------------------


def test_get_stream_ends_when_owner_dies(cluster):
    """A GET stream held on B for a session owned by A ends when A's heartbeat runs out (the
    sweep notices); the session is then 404 on B."""
    a, b = cluster(2)
    sid = open_session(a)
    get = raw_get(b, sid)
    assert b.run_until(lambda: status(get) == 200, 5)
    a.kill()
    b.advance(2 * HEARTBEAT)
    assert not ended(get)  # the heartbeat is still there
    a.world.expire(a.instance)
    assert b.run_until(lambda: ended(get), 5)
    http.assert_jsonrpc_error(post(b, sid, http.request(1, "ping")), 404, SESSION_NOT_FOUND)


def test_owner_killed_gives_404_and_record_cleaned(cluster):
    """The owner is killed: its heartbeat is still there, but the very next request through B is
    404 (nobody listens on its channel, and it holds no connection); the record is deleted; a new
    initialize through B works."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.tool_call(1, "echo", {"text": "x"})).status_code == 200
    a.kill()
    assert a.instance in a.world.heartbeats
    http.assert_jsonrpc_error(post(b, sid, http.tool_call(2, "echo", {"text": "y"})), 404, SESSION_NOT_FOUND)
    assert sid not in a.world.records
    new = open_session(b)
    assert post(b, new, http.tool_call(3, "echo", {"text": "new"})).status_code == 200


def test_owner_without_pubsub_is_not_taken_for_dead(cluster):
    """Only the owner's pub/sub connection is lost: it still holds a connection, so a request
    through B meanwhile is 503 + Retry-After, never 404; once it is back, served."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.tool_call(1, "echo", {"text": "x"})).status_code == 200
    a.world.pubsubs[a.instance].set_available(False, notify=False)
    r = post(b, sid, http.tool_call(2, "echo", {"text": "y"}))
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    a.world.pubsubs[a.instance].set_available(True, notify=False)
    assert post(b, sid, http.tool_call(3, "echo", {"text": "z"})).status_code == 200


def test_owner_stopped_cleanly_gives_404_at_once(cluster):
    """The owner stops: it deletes its records and heartbeat on the way out, so through B the
    session is 404 at once, and B's own waiting stream for it ends."""
    a, b = cluster(2)
    sid = open_session(a)
    get = raw_get(b, sid)
    assert b.run_until(lambda: status(get) == 200, 5)
    a.close(check=True)
    assert sid not in a.world.records and a.instance not in a.world.heartbeats
    b.pump()
    assert ended(get)  # the owner told B the session ended
    http.assert_jsonrpc_error(post(b, sid, http.request(2, "ping")), 404, SESSION_NOT_FOUND)


def test_redis_lost_while_running(cluster):
    """B loses the bus: A's own session keeps working on A; through B it is a clear 503; once the
    bus is back, B reaches A's session again."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.tool_call(1, "echo", {"text": "x"})).status_code == 200
    b.world.pubsubs[b.instance].set_available(False)
    assert post(a, sid, http.tool_call(2, "echo", {"text": "local"})).status_code == 200
    r = post(b, sid, http.tool_call(3, "echo", {"text": "remote"}))
    assert r.status_code == 503 and "Redis" in r.text and r.headers["retry-after"], r.text
    assert b.cluster.problem() is not None
    b.world.pubsubs[b.instance].set_available(True)
    assert post(b, sid, http.tool_call(4, "echo", {"text": "back"})).status_code == 200


# -- races: a message in flight ------------------------------------------------------------


def test_session_ends_while_a_post_is_in_flight(cluster):
    """A POST through B is on its way when the session ends on A: A answers ``Gone`` for its
    route, and B's client gets 404 (not a hang)."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.request(1, "ping")).status_code == 200
    a.world.bus.hold()
    call = raw_post(b, sid, http.tool_call(2, "echo", {"text": "late"}))
    with a.client() as c:
        assert c.delete("/mcp", headers={"mcp-session-id": sid}).status_code == 200
    a.world.bus.release()
    assert b.run_until(lambda: ended(call), 5)
    assert status(call) == 404
    assert b.cluster.directory.remote == {} and b.cluster.routes.routes == {}


def test_owner_dies_while_a_post_is_in_flight(cluster):
    """A POST through B reached the bus, then its owner died before reading it: B waits while the
    owner's heartbeat lasts, then the sweep fails the POST (Session not found) and forgets the session."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.request(1, "ping")).status_code == 200
    a.world.bus.hold()
    call = raw_post(b, sid, http.tool_call(2, "sleep", {"seconds": 5}))
    a.kill()
    a.world.bus.release()
    b.advance(3 * HEARTBEAT)
    assert not ended(call)
    a.world.expire(a.instance)
    assert b.run_until(lambda: ended(call), 5)
    # Past a keepalive tick the answer is a stream already: the error comes on it.
    assert status(call) == 200 and [m["error"]["code"] for _, m in sse(call) if m.get("id") == 2] == [SESSION_NOT_FOUND]
    assert sid not in a.world.records and b.cluster.directory.remote == {}


def test_client_gone_while_the_answer_is_in_flight(cluster):
    """B's client hangs up while A's answer is on its way: the answer is dropped on B, A forgets
    the route, nothing is left waiting on either side."""
    a, b = cluster(2)
    sid = open_session(a)
    call = raw_post(b, sid, http.tool_call(1, "sleep", {"seconds": 0.5}))
    b.advance(0.1)
    call.hang_up()
    b.advance(1.0)
    assert a.cluster.owner.routes_out == {} and b.cluster.routes.routes == {}
    assert post(b, sid, http.request(2, "ping")).status_code == 200


def test_idle_remote_session_is_forgotten_and_found_again(cluster):
    """B forgets a remote session unused for session.maxAge (the owner keeps it); the next request
    looks it up again."""
    a, b = cluster(2)
    sid = open_session(a)
    assert post(b, sid, http.request(1, "ping")).status_code == 200
    b.cluster.sweeper.max_age = 1.0
    b.advance(2.0)
    assert sid not in b.cluster.directory.remote
    assert post(b, sid, http.request(2, "ping")).status_code == 200
    assert sid in b.cluster.directory.remote


# -- the wire ----------------------------------------------------------------------------

#: Messages as the code before mcpgw.cluster.wire wrote them (its header dicts through
#: jsonrpc.dumps): a rolling upgrade mixes old and new instances on one Redis.
RECORDED = [
    (b'{"t":"post","s":"S1","f":"123456789","r":4}\n{"jsonrpc":"2.0","id":1,"method":"ping"}',
     wire.Post("S1", "123456789", 4, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')),
    (b'{"t":"post","s":"S1","f":"123456789","r":null}\n{"jsonrpc":"2.0","method":"n"}',
     wire.Post("S1", "123456789", None, b'{"jsonrpc":"2.0","method":"n"}')),
    # A newer instance's optional field (what a token's tools/list leaves out): old ones ignore it.
    (b'{"t":"post","s":"S1","f":"123456789","r":null,"ht":["sleep"]}\n{"jsonrpc":"2.0","id":2,"method":"tools/list"}',
     wire.Post("S1", "123456789", None, b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}', hidden=["sleep"])),
    (b'{"t":"emit","s":"S1","f":"123456789","r":null}\nraw', wire.Emit("S1", "123456789", None, b"raw")),
    (b'{"t":"del","s":"S1","f":"123456789","r":null}\nbye', wire.Delete("S1", "123456789", None, b"bye")),
    (b'{"t":"rc","s":"S1","f":"123456789","r":7}\n', wire.RouteClosed("S1", "123456789", 7)),
    (b'{"t":"get","s":"S1","f":"123456789","r":8}\n', wire.OpenGet("S1", "123456789", 8)),
    (b'{"t":"gl","s":"S1","f":"123456789","r":8}\n', wire.GetLive("S1", "123456789", 8)),
    (b'{"t":"gx","s":"S1","f":"123456789","r":8}\n', wire.GetGone("S1", "123456789", 8)),
    (b'{"t":"att","s":"S1","n":12345678900000001,"after":3,"f":"123456789","r":9}\n',
     wire.Attach("S1", 12345678900000001, 3, "123456789", 9)),
    (b'{"t":"lx","f":"123456789","r":9}\n', wire.LiveGone("123456789", 9)),
    (b'{"t":"w","r":9}\nid: 1_2\ndata: {}\n\n', wire.Write(9, b"id: 1_2\ndata: {}\n\n")),
    (b'{"t":"fin","r":9}\n', wire.Finish(9)),
    (b'{"t":"a","r":4,"id":"x"}\n{"jsonrpc":"2.0","id":"x","result":{}}',
     wire.Answer(4, "x", b'{"jsonrpc":"2.0","id":"x","result":{}}')),
    (b'{"t":"d","r":4}\n{"jsonrpc":"2.0","method":"p"}', wire.Deliver(4, b'{"jsonrpc":"2.0","method":"p"}')),
    (b'{"t":"f","r":4,"id":2}\n', wire.Forget(4, 2)),
    (b'{"t":"u","r":8}\n{"jsonrpc":"2.0","method":"m"}', wire.Unbound(8, b'{"jsonrpc":"2.0","method":"m"}')),
    (b'{"t":"gone","s":"S1","r":null}\n', wire.Gone("S1", None)),
    (b'{"t":"end","s":"S1"}\nsession ended', wire.Ended("S1", b"session ended")),
    (b'{"t":"ack","r":8,"status":"conflict"}\n', wire.Ack(8, "conflict")),
]


@pytest.mark.parametrize(("data", "message"), RECORDED, ids=[m.TYPE for _, m in RECORDED])
def test_wire_reads_and_writes_the_old_format(data, message):
    assert wire.decode(data) == message
    assert wire.encode(message) == data


def test_every_message_type_is_recorded():
    assert {m.TYPE for _, m in RECORDED} == set(wire.TYPES)


@pytest.mark.parametrize("data", [
    b"not json\n",
    b'["t","post"]\n',
    b'{"t":"zz","r":1}\n',
    b'{"s":"S1"}\n',
    b'{"t":"post","s":"S1","f":"1"}\n',  # r missing
    b'{"t":"a","r":"4","id":1}\n',  # r not a number
    b'{"t":"a","r":true,"id":1}\n',
    b'{"t":"a","r":4,"id":null}\n',
    b'{"t":"rc","s":"S1","f":"1","r":null}\n',  # r required here
    b'{"t":"ack","r":8,"status":"maybe"}\n',
    b'{"t":"att","s":"S1","n":1.5,"after":3,"f":"1","r":9}\n',
    b"\xff\xfe\n",
])
def test_wire_refuses_what_it_cannot_read(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)


def test_wire_ignores_keys_it_does_not_know():
    """A newer instance may add a header key: this one still reads the message."""
    assert wire.decode(b'{"t":"fin","r":9,"trace":"abc"}\n') == wire.Finish(9)


def test_backends_provide_their_interfaces():
    from twisted.internet.task import Clock
    from zope.interface.verify import verifyObject

    from mcpgw.cluster.eventlog import IEventLog, MemoryEventLog, RedisEventLog
    from mcpgw.cluster.pubsub import IPubSub, MemoryBus, RedisPubSub
    from mcpgw.store.redis import Keys, RedisConnection, parse_url

    redis = RedisConnection(parse_url("redis://127.0.0.1:9/0", None), Clock())
    assert verifyObject(IPubSub, RedisPubSub(redis))
    assert verifyObject(IPubSub, MemoryBus(Clock()).connect())
    assert verifyObject(IEventLog, RedisEventLog(redis, Keys("p:"), lambda: 10, 60.0))
    assert verifyObject(IEventLog, MemoryEventLog())


def test_a_bad_message_is_dropped_and_the_next_one_is_read(cluster):
    """Garbage (or a type from a newer release) on an instance's channel is logged and dropped;
    its subscription goes on."""
    a, b = cluster(2)
    sid = open_session(a)
    channel = f"to:{b.instance}"
    for junk in (b"garbage", b'{"t":"zz"}\n', b'{"t":"a","r":"x","id":1}\n'):
        a.world.pubsubs[a.instance].publish(channel, junk)
    b.pump()
    assert b.log().count("cluster: message dropped") == 3
    assert post(b, sid, http.request(1, "ping")).status_code == 200
