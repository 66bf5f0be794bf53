"""mcpgw.session: routing between client streams and one child, session ids, the session manager."""

from __future__ import annotations

import string
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import jsonrpc
from mcpgw.config import GatewayConfig, SessionConfig, StdioServer
from mcpgw.session import Session, SessionIds, SessionManager
from mcpgw.store import SessionRecord
from mcpgw.store.memory import MemorySessionStore
from mcpgw.upstream import stdio
from tests.fake_process import FakeProcessReactor
from tests.fakes import FakeChildSession, FakeUpstream, RecordingRoute

SERVER = StdioServer(name="time", command="time-server", executable="/opt/bin/time-server")


def req(id: Any, method: str = "tools/call", token: Any = None, **params: Any) -> tuple[dict[str, Any], bytes]:
    """A client request and its raw bytes."""
    if token is not None:
        params["_meta"] = {"progressToken": token}
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params}
    return msg, jsonrpc.dumps(msg)


def note(method: str, **params: Any) -> tuple[dict[str, Any], bytes]:
    """A notification and its raw bytes."""
    msg = {"jsonrpc": "2.0", "method": method, "params": params}
    return msg, jsonrpc.dumps(msg)


def resp(id: Any, result: Any = None) -> tuple[bytes, dict[str, Any]]:
    """A child's response in upstreamMessage's argument order (raw, msg)."""
    msg = {"jsonrpc": "2.0", "id": id, "result": {} if result is None else result}
    return jsonrpc.dumps(msg), msg


def from_child(msg: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    return jsonrpc.dumps(msg), msg


class RecordingOutlet:
    def __init__(self) -> None:
        self.unbound_messages: list[bytes] = []
        self.ended: list[str] = []

    def unbound(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.unbound_messages.append(raw)

    def session_ended(self, reason: str) -> None:
        self.ended.append(reason)


class SessionTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ended_sessions: list[Session] = []
        self.outlet = RecordingOutlet()
        self.session = FakeChildSession("sid", SERVER, "streamable", self.clock, self.ended_sessions.append,
                                        outlet=lambda s: self.outlet)
        self.upstream = cast(FakeUpstream, self.session.upstream)

    def send(self, route: RecordingRoute, id: Any, method: str = "tools/call", token: Any = None) -> bytes:
        msg, raw = req(id, method, token)
        self.session.request(msg, raw, route)
        return raw


class RequestRoutingTests(SessionTestCase):
    def test_requestForwarded(self) -> None:
        """A client request goes to the child as its exact raw bytes."""
        raw = self.send(RecordingRoute(), 1)
        self.assertEqual(self.upstream.sent, [raw])

    def test_responseReachesItsRoute(self) -> None:
        """Each response goes to the route that carried its request id, and nowhere else."""
        a, b = RecordingRoute(), RecordingRoute()
        self.send(a, 1)
        self.send(b, "two")
        raw_b, msg_b = resp("two")
        raw_a, msg_a = resp(1)
        self.session.upstreamMessage(raw_b, msg_b)
        self.session.upstreamMessage(raw_a, msg_a)
        self.assertEqual(a.answers, [(1, raw_a)])
        self.assertEqual(b.answers, [("two", raw_b)])
        self.assertEqual(self.outlet.unbound_messages, [])
        self.assertFalse(self.session.has_pending())

    def test_answerCarriesWhatTheUpstreamDecoded(self) -> None:
        """The route gets the child's answer decoded as well as its bytes (IRoute.answer's ``msg``): a
        route that reads it (the tracer's and the audit trail's outcome) does not decode it again."""
        route = RecordingRoute()
        self.send(route, 3)
        raw, msg = resp(3)
        self.session.upstreamMessage(raw, msg)
        self.assertEqual(route.answers, [(3, raw)])
        self.assertIs(route.decoded[0], msg)

    def test_stringAndIntegerIdsDistinct(self) -> None:
        """Ids 1 and "1" are different requests."""
        a, b = RecordingRoute(), RecordingRoute()
        self.send(a, 1)
        self.send(b, "1")
        self.session.upstreamMessage(*resp("1"))
        self.assertEqual((a.answers, [id for id, _ in b.answers]), ([], ["1"]))

    def test_errorResponseReachesItsRoute(self) -> None:
        """An error response is routed like a result."""
        route = RecordingRoute()
        self.send(route, 7)
        self.session.upstreamMessage(*from_child(jsonrpc.error(7, -32601, "nope")))
        self.assertEqual(route.errors(), [(7, -32601, "nope")])

    def test_unknownResponseDropped(self) -> None:
        """A response to no pending request goes nowhere (not to the outlet)."""
        self.session.upstreamMessage(*resp(99))
        self.assertEqual(self.outlet.unbound_messages, [])

    def test_responseAnsweredOnce(self) -> None:
        """A second response with the same id is dropped."""
        route = RecordingRoute()
        self.send(route, 1)
        self.session.upstreamMessage(*resp(1))
        self.session.upstreamMessage(*resp(1))
        self.assertEqual(len(route.answers), 1)

    def test_duplicateInFlightId(self) -> None:
        """A second request with an id already in flight gets a JSON-RPC error and is not forwarded."""
        first, second = RecordingRoute(), RecordingRoute()
        raw = self.send(first, 5)
        self.send(second, 5)
        self.assertEqual(second.errors(), [(5, jsonrpc.INVALID_REQUEST, "request id 5 is already in flight")])
        self.assertEqual(self.upstream.sent, [raw])
        self.session.upstreamMessage(*resp(5))
        self.assertEqual(len(first.answers), 1)

    def test_idReusableAfterResponse(self) -> None:
        """Once answered, an id may be used again."""
        route = RecordingRoute()
        self.send(route, 5)
        self.session.upstreamMessage(*resp(5))
        self.send(route, 5)
        self.assertEqual(len(self.upstream.sent), 2)

    def test_sendRefused(self) -> None:
        """A request the child can no longer take is answered with a connection-closed error at once."""
        self.upstream.stopping = True
        route = RecordingRoute()
        self.send(route, 1)
        self.assertEqual(route.errors(), [(1, jsonrpc.CONNECTION_CLOSED, "MCP server is stopping")])
        self.assertFalse(self.session.has_pending())

    def test_requestAfterEnd(self) -> None:
        """A request to an ended session is answered with the end reason and not forwarded."""
        self.upstream.exit("exited with status 2")
        route = RecordingRoute()
        self.send(route, 1)
        self.assertEqual(route.errors(), [(1, jsonrpc.CONNECTION_CLOSED, "MCP server exited with status 2")])
        self.assertEqual(self.upstream.sent, [])

    def test_requestAfterClose(self) -> None:
        """A request to a closed session is answered with the close reason as it is."""
        self.session.close("client ended the session (DELETE)")
        route = RecordingRoute()
        self.send(route, 1)
        self.assertEqual(route.errors(), [(1, jsonrpc.CONNECTION_CLOSED, "client ended the session (DELETE)")])

    def test_requestUpdatesLastSeen(self) -> None:
        """Client traffic moves last_seen to the reactor's time."""
        self.clock.advance(42)
        self.send(RecordingRoute(), 1)
        self.assertEqual(self.session.last_seen, 42)


class ProgressRoutingTests(SessionTestCase):
    def progress(self, token: Any) -> bytes:
        raw, msg = from_child({"jsonrpc": "2.0", "method": "notifications/progress",
                               "params": {"progressToken": token, "progress": 1}})
        self.session.upstreamMessage(raw, msg)
        return raw

    def test_progressReachesTokenRoute(self) -> None:
        """A progress notification goes to the route whose request carried the progressToken."""
        a, b = RecordingRoute(), RecordingRoute()
        self.send(a, 1, token="tok-a")
        self.send(b, 2, token=17)
        raw = self.progress(17)
        self.assertEqual((a.delivered, b.delivered), ([], [raw]))
        self.assertEqual(self.outlet.unbound_messages, [])

    def test_unknownTokenToOutlet(self) -> None:
        """Progress with a token no pending request carried goes to the outlet."""
        self.send(RecordingRoute(), 1, token="mine")
        raw = self.progress("other")
        self.assertEqual(self.outlet.unbound_messages, [raw])

    def test_tokenForgottenAfterResponse(self) -> None:
        """After the response, the request's token no longer routes to its route."""
        route = RecordingRoute()
        self.send(route, 1, token="t")
        self.session.upstreamMessage(*resp(1))
        raw = self.progress("t")
        self.assertEqual(route.delivered, [])
        self.assertEqual(self.outlet.unbound_messages, [raw])

    def test_unhashableTokenFromClient(self) -> None:
        """A request whose progressToken is not a string or integer is still forwarded (the token is ignored)."""
        route = RecordingRoute()
        raw = self.send(route, 1, token={"not": "hashable"})
        self.assertEqual(self.upstream.sent, [raw])
        self.session.upstreamMessage(*resp(1))
        self.assertEqual(len(route.answers), 1)

    def test_unhashableTokenFromChild(self) -> None:
        """Progress whose token is an object goes to the outlet instead of raising."""
        raw = self.progress(["x"])
        self.assertEqual(self.outlet.unbound_messages, [raw])


class UnboundMessageTests(SessionTestCase):
    def test_serverRequestToOutlet(self) -> None:
        """A request from the child (sampling, elicitation, ping) goes to the outlet."""
        raw, msg = from_child({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {}})
        self.send(RecordingRoute(), "s1")  # the same id on the client side does not capture it
        self.session.upstreamMessage(raw, msg)
        self.assertEqual(self.outlet.unbound_messages, [raw])

    def test_notificationToOutlet(self) -> None:
        """A notification from the child goes to the outlet."""
        raw, msg = from_child({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        self.session.upstreamMessage(raw, msg)
        self.assertEqual(self.outlet.unbound_messages, [raw])

    def test_noOutlet(self) -> None:
        """Without an outlet an unbound message is dropped quietly."""
        session = FakeChildSession("sid", SERVER, "streamable", self.clock, self.ended_sessions.append)
        self.assertIsNone(session.outlet)
        session.upstreamMessage(*from_child({"jsonrpc": "2.0", "method": "notifications/message"}))

    def test_responseWithUnhashableId(self) -> None:
        """A child response whose id is an object or array is dropped instead of raising."""
        self.send(RecordingRoute(), 1)
        self.session.upstreamMessage(*from_child({"jsonrpc": "2.0", "id": [1], "result": {}}))
        self.assertEqual(self.outlet.unbound_messages, [])


class CancellationTests(SessionTestCase):
    def test_cancelledForgetsId(self) -> None:
        """notifications/cancelled makes the route forget the id and is relayed to the child."""
        route = RecordingRoute()
        self.send(route, 3, token="t")
        msg, raw = note("notifications/cancelled", requestId=3, reason="user")
        self.session.notify(msg, raw)
        self.assertEqual(route.forgotten, [3])
        self.assertEqual(self.upstream.sent[-1], raw)
        self.assertFalse(self.session.has_pending())

    def test_lateResponseDropped(self) -> None:
        """A response that arrives after the cancellation reaches neither the route nor the outlet."""
        route = RecordingRoute()
        self.send(route, 3)
        self.session.notify(*note("notifications/cancelled", requestId=3))
        self.session.upstreamMessage(*resp(3))
        self.assertEqual((route.answers, self.outlet.unbound_messages), ([], []))

    def test_cancelUnknownId(self) -> None:
        """Cancelling an id that is not pending forgets nothing and still reaches the child."""
        route = RecordingRoute()
        self.send(route, 3)
        msg, raw = note("notifications/cancelled", requestId=4)
        self.session.notify(msg, raw)
        self.assertEqual(route.forgotten, [])
        self.assertTrue(self.session.has_pending())
        self.assertEqual(self.upstream.sent[-1], raw)

    def test_cancelUnhashableId(self) -> None:
        """A cancellation whose requestId is an object is relayed without raising."""
        self.send(RecordingRoute(), 1)
        msg, raw = note("notifications/cancelled", requestId={"x": 1})
        self.session.notify(msg, raw)
        self.assertEqual(self.upstream.sent[-1], raw)
        self.assertTrue(self.session.has_pending())


class InitializeTests(SessionTestCase):
    def test_protocolVersionRecorded(self) -> None:
        """The initialize response's protocolVersion is recorded on the session."""
        self.send(RecordingRoute(), 0, method="initialize")
        self.session.upstreamMessage(*resp(0, {"protocolVersion": "2025-06-18", "capabilities": {}}))
        self.assertEqual(self.session.protocol_version, "2025-06-18")

    def test_otherResponseIgnored(self) -> None:
        """A protocolVersion in some other response does not change the session's version."""
        self.send(RecordingRoute(), 1)
        self.session.upstreamMessage(*resp(1, {"protocolVersion": "1999-01-01"}))
        self.assertIsNone(self.session.protocol_version)

    def test_errorResponseRecordsNothing(self) -> None:
        """A failed initialize records no version."""
        self.send(RecordingRoute(), 0, method="initialize")
        self.session.upstreamMessage(*from_child(jsonrpc.error(0, -32602, "bad version")))
        self.assertIsNone(self.session.protocol_version)


class LargeMessageTests(SessionTestCase):
    """Messages from the child as ``jsonrpc.route_view`` gives them (large values undecoded)."""

    BIG = "b" * 200_000

    def viewed(self, msg: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        raw = jsonrpc.dumps(msg)
        view = jsonrpc.route_view(raw)
        self.assertTrue(any(isinstance(v, jsonrpc.Undecoded) for v in view.values()))
        return raw, view

    def test_sessionRoutesOnViews(self) -> None:
        """The Session asks its StdioUpstream for views of large lines."""
        self.assertTrue(Session.routes_on_view)

    def test_largeResponseReachesItsRoute(self) -> None:
        """A large response reaches its route raw."""
        route = RecordingRoute()
        self.send(route, 4)
        raw, view = self.viewed({"jsonrpc": "2.0", "id": 4, "result": {"text": self.BIG}})
        self.session.upstreamMessage(raw, view)
        self.assertEqual(route.answers, [(4, raw)])
        self.assertFalse(self.session.has_pending())

    def test_largeInitializeResultRecordsVersion(self) -> None:
        """An initialize result too large to decode for routing is decoded for its protocolVersion."""
        self.send(RecordingRoute(), 0, method="initialize")
        raw, view = self.viewed({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2025-06-18",
                                                                         "instructions": self.BIG}})
        self.session.upstreamMessage(raw, view)
        self.assertEqual(self.session.protocol_version, "2025-06-18")

    def test_largeProgressReachesTokenRoute(self) -> None:
        """A large progress notification still goes to its token's route."""
        route = RecordingRoute()
        self.send(route, 1, token="t")
        raw, view = self.viewed({"jsonrpc": "2.0", "method": "notifications/progress",
                                 "params": {"progressToken": "t", "message": self.BIG}})
        self.session.upstreamMessage(raw, view)
        self.assertEqual(route.delivered, [raw])

    def test_largeErrorReachesItsRoute(self) -> None:
        """A large error response is answered and its code logged."""
        route = RecordingRoute()
        self.send(route, 2)
        raw, view = self.viewed(jsonrpc.error(2, -32603, "boom", {"trace": self.BIG}))
        self.session.upstreamMessage(raw, view)
        self.assertEqual(route.answers, [(2, raw)])

    def test_largeServerRequestToOutlet(self) -> None:
        """A large request from the child that no route claims goes to the outlet."""
        raw, view = self.viewed({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage",
                                 "params": {"messages": [{"content": self.BIG}]}})
        self.session.upstreamMessage(raw, view)
        self.assertEqual(self.outlet.unbound_messages, [raw])


class EndingTests(SessionTestCase):
    def test_childExitFailsInFlight(self) -> None:
        """When the child exits every in-flight request gets a connection-closed error at once."""
        a, b = RecordingRoute(), RecordingRoute()
        self.send(a, 1)
        self.send(a, 2)
        self.send(b, "x")
        self.upstream.exit("killed by signal 9")
        message = "MCP server killed by signal 9"
        self.assertEqual(sorted(a.errors()), [(1, jsonrpc.CONNECTION_CLOSED, message), (2, jsonrpc.CONNECTION_CLOSED, message)])
        self.assertEqual(b.errors(), [("x", jsonrpc.CONNECTION_CLOSED, message)])
        self.assertFalse(self.session.has_pending())

    def test_childExitEndsOutlet(self) -> None:
        """The child's exit calls outlet.session_ended with the reason and the manager's on_end once."""
        self.upstream.exit("exited with status 0")
        self.assertEqual(self.outlet.ended, ["MCP server exited with status 0"])
        self.assertEqual(self.ended_sessions, [self.session])
        self.assertTrue(self.session.ended)

    def test_closeStopsChild(self) -> None:
        """close() ends the session at once and its Deferred fires when the child has exited."""
        route = RecordingRoute()
        self.send(route, 1)
        d = self.session.close("client ended the session")
        self.assertEqual(route.errors(), [(1, jsonrpc.CONNECTION_CLOSED, "client ended the session")])
        self.assertEqual(self.outlet.ended, ["client ended the session"])
        self.assertNoResult(d)
        self.upstream.exit("exited with status 0")
        self.successResultOf(d)
        self.assertEqual(self.outlet.ended, ["client ended the session"])
        self.assertEqual(self.ended_sessions, [self.session])

    def test_protocolErrorCloses(self) -> None:
        """A protocol error from the child (an overlong line) ends the session with that reason."""
        self.session.upstreamProtocolError("message from the MCP server exceeds 10 bytes")
        self.assertEqual(self.session.end_reason, "message from the MCP server exceeds 10 bytes")
        self.assertTrue(self.upstream.stopping)

    def test_endResumesPausedChild(self) -> None:
        """Ending a session lifts any backpressure pause so the child can drain and exit."""
        self.session.pauseProducing()
        self.session.pauseProducing()
        self.session.close()
        self.assertEqual(self.upstream.paused, 0)


class BackpressureTests(SessionTestCase):
    def test_pausesCounted(self) -> None:
        """The child is paused by the first pause and resumed only after the last resume."""
        self.session.pauseProducing()
        self.session.pauseProducing()
        self.assertEqual(self.upstream.paused, 1)
        self.session.resumeProducing()
        self.assertEqual(self.upstream.paused, 1)
        self.session.resumeProducing()
        self.assertEqual(self.upstream.paused, 0)

    def test_extraResumeIgnored(self) -> None:
        """A resume without a pause does nothing."""
        self.session.resumeProducing()
        self.assertEqual(self.upstream.paused, 0)


class SessionIdsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ids = SessionIds("secret")
        self.sid = self.ids.new()

    def test_newIdValid(self) -> None:
        """An id the gateway made verifies."""
        self.assertTrue(self.ids.valid(self.sid))

    def test_validAcrossInstancesWithSameSecret(self) -> None:
        """Another SessionIds with the same secret (another process) accepts the id."""
        self.assertTrue(SessionIds("secret").valid(self.sid))

    def test_otherSecretRejects(self) -> None:
        """A SessionIds with another secret rejects the id."""
        self.assertFalse(SessionIds("other").valid(self.sid))

    def test_randomSecretWhenNone(self) -> None:
        """Without a secret each instance picks its own key."""
        self.assertFalse(SessionIds(None).valid(SessionIds(None).new()))

    def test_idsUnique(self) -> None:
        """New ids do not repeat."""
        self.assertEqual(len({self.ids.new() for _ in range(200)}), 200)

    def test_visibleAscii(self) -> None:
        """Ids use visible ASCII only (0x21..0x7E), as the spec requires of Mcp-Session-Id."""
        for _ in range(50):
            sid = self.ids.new()
            self.assertTrue(all(0x21 <= ord(ch) <= 0x7E for ch in sid), sid)

    def test_alteredTagRejected(self) -> None:
        """Changing any one character of the id makes it fail."""
        for i in range(len(self.sid)):
            if self.sid[i] == ".":
                continue
            ch = "A" if self.sid[i] != "A" else "B"
            self.assertFalse(self.ids.valid(self.sid[:i] + ch + self.sid[i + 1:]), i)

    def test_forgedRejected(self) -> None:
        """Ids of the right shape with a made-up tag fail."""
        nonce = self.sid.split(".")[0]
        self.assertFalse(self.ids.valid(nonce + "." + "A" * 22))

    def test_malformedRejected(self) -> None:
        """Ids without a dot, with wrong part lengths, or empty fail."""
        nonce, tag = self.sid.split(".")
        for bad in ["", ".", nonce, nonce + tag, nonce + "." + tag[:-1], nonce[:-1] + "." + tag, self.sid + "x", self.sid + ".x"]:
            self.assertFalse(self.ids.valid(bad), bad)

    def test_nonAsciiRejected(self) -> None:
        """An id with non-ASCII characters (a latin-1 decoded header) is rejected, not an exception."""
        nonce, tag = self.sid.split(".")
        self.assertFalse(self.ids.valid(nonce + "." + "é" * 22))
        self.assertFalse(self.ids.valid("é" * 22 + "." + tag))

    def test_controlCharactersRejected(self) -> None:
        """An id with whitespace or control characters fails."""
        for ch in " \t\x00\x7f":
            self.assertFalse(self.ids.valid(self.sid[:-1] + ch))

    def test_alphabet(self) -> None:
        """Ids are URL-safe base64 around one dot."""
        allowed = set(string.ascii_letters + string.digits + "-_")
        nonce, tag = self.sid.split(".")
        self.assertTrue(set(nonce + tag) <= allowed)


# -- the manager -----------------------------------------------------------------


class ManagerTestCase(SynchronousTestCase):
    idle_seconds = 10.0

    def setUp(self) -> None:
        self.patch(stdio, "_SETSID", None)
        self.reactor = FakeProcessReactor()
        config = GatewayConfig(servers={"time": SERVER}, session=SessionConfig(secret="k", idleSeconds=self.idle_seconds))
        self.manager = SessionManager(config, self.reactor)

    def child_of(self, session: Session) -> Any:
        [child] = [t for t in self.reactor.spawned if t.proto is session.upstream]
        return child


class SessionManagerTests(ManagerTestCase):
    def test_createSpawnsAndRecords(self) -> None:
        """create() spawns the child, registers the session and adds a store record."""
        session = self.manager.create(SERVER, "streamable")
        self.assertIs(self.child_of(session).proto, session.upstream)
        self.assertIs(self.manager.get(session.id), session)
        record = self.successResultOf(self.manager.store.get(session.id))
        self.assertEqual((record.server, record.transport), ("time", "streamable"))

    def test_a_factory_gets_every_setting_at_construction(self) -> None:
        """A session is complete when constructed: the factory is given the owner, quota key, limits and
        hooks, so nothing about the session is configured after it exists (mcpgw.interfaces.ILocalSession)."""
        seen: dict[str, Any] = {}
        outlets: list[tuple[Session, RecordingOutlet]] = []

        def outlet(session: Session) -> RecordingOutlet:
            outlets.append((session, RecordingOutlet()))
            return outlets[-1][1]

        def factory(*args: Any, **kw: Any) -> Session:
            session = Session(*args, **kw)
            seen.update(owner=session.owner, quota_key=session.quota_key, max_pending=session.max_pending,
                        request_timeout=session.request_timeout, on_version=session.on_version,
                        outlet=session.outlet, recorded=session.recorded)
            return session

        self.manager.config = attrs.evolve(self.manager.config, limits=attrs.evolve(
            self.manager.config.limits, maxPendingRequests=7, requestTimeout=9.0))
        session = self.manager.create(SERVER, "streamable", owner="alice", factory=factory, outlet=outlet)
        self.assertEqual({k: v for k, v in seen.items() if k not in ("on_version", "outlet", "recorded")},
                         {"owner": "alice", "quota_key": "id:alice", "max_pending": 7, "request_timeout": 9.0})
        self.assertIsNotNone(seen["on_version"])
        self.assertEqual(outlets, [(session, seen["outlet"])])  # made once, by the session, for itself
        self.assertIs(seen["recorded"], session.recorded)

    def test_recorded_fires_once_the_store_has_the_record(self) -> None:
        """``recorded`` exists from construction and fires (with None) when the store's write ends, however
        it ends: a transport waits on it to let the client use the session elsewhere."""
        writes: list[defer.Deferred[None]] = []

        class SlowStore(MemorySessionStore):
            def add(self, record: SessionRecord) -> defer.Deferred[None]:
                super().add(record)
                writes.append(defer.Deferred())
                return writes[-1]

        manager = SessionManager(self.manager.config, self.reactor, store=SlowStore())
        stored, failed = manager.create(SERVER, "streamable"), manager.create(SERVER, "sse")
        self.assertNoResult(stored.recorded)
        writes[0].callback(None)
        writes[1].errback(ConnectionError("store unavailable"))
        self.assertIsNone(self.successResultOf(stored.recorded))
        self.assertIsNone(self.successResultOf(failed.recorded))

    def test_getForged(self) -> None:
        """get() with a forged, empty or missing id returns None."""
        self.manager.create(SERVER, "streamable")
        for bad in [None, "", "x.y", SessionIds("other").new()]:
            self.assertIsNone(self.manager.get(bad))

    def test_endedSessionForgotten(self) -> None:
        """When a child exits its session leaves the manager and the store."""
        session = self.manager.create(SERVER, "streamable")
        self.child_of(session).exit(1)
        self.assertIsNone(self.manager.get(session.id))
        self.assertIsNone(self.successResultOf(self.manager.store.get(session.id)))
        self.assertEqual(self.manager.count(), 0)

    def test_count(self) -> None:
        """count() counts live sessions, in all or per server."""
        other = StdioServer(name="other", command="x", executable="/bin/x")
        self.manager.create(SERVER, "streamable")
        self.manager.create(SERVER, "sse")
        self.manager.create(other, "sse")
        self.assertEqual((self.manager.count(), self.manager.count("time"), self.manager.count("other")), (3, 2, 1))


class LazyStartTests(ManagerTestCase):
    """Legacy SSE sessions (``create(lazy=True)``): the child is started by the first message."""

    def test_streamOpensWithoutAChild(self) -> None:
        """A lazy session exists, is found, and has spawned nothing."""
        session = self.manager.create(SERVER, "sse", lazy=True)
        self.assertIs(self.manager.get(session.id), session)
        self.assertEqual(self.reactor.spawned, [])
        self.assertIsNotNone(session.start_child)

    def test_firstRequestSpawnsAndIsSent(self) -> None:
        """The first request spawns the child and reaches it; later ones spawn nothing more."""
        session = self.manager.create(SERVER, "sse", lazy=True)
        route = RecordingRoute()
        msg, raw = req(0, "initialize")
        session.request(msg, raw, route)
        child = self.child_of(session)
        self.assertEqual(child.written, [raw + b"\n"])
        msg, raw = req(1, "ping")
        session.request(msg, raw, route)
        self.assertEqual(len(self.reactor.spawned), 1)
        session.upstream.outReceived(b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2024-11-05"}}\n')
        self.assertEqual([id for id, _ in route.answers], [0])
        self.assertIsNone(session.start_child)

    def test_firstNotificationSpawns(self) -> None:
        """A notification as first message starts the child too, and reaches it."""
        session = self.manager.create(SERVER, "sse", lazy=True)
        msg, raw = note("notifications/initialized")
        session.notify(msg, raw)
        self.assertEqual(self.child_of(session).written, [raw + b"\n"])

    def test_spawnFailureAnsweredThenSessionEnds(self) -> None:
        """A child that cannot be started: the first request gets a JSON-RPC error naming why, on
        its route (the SSE stream), and then the session ends (the stream is closed)."""
        def fail(*a: Any, **kw: Any) -> None:
            raise FileNotFoundError(2, "No such file or directory", "/opt/bin/time-server")

        self.reactor.spawnProcess = fail  # type: ignore[method-assign]
        outlet = RecordingOutlet()
        session = self.manager.create(SERVER, "sse", lazy=True, outlet=lambda s: outlet)
        route = RecordingRoute()
        msg, raw = req(0, "initialize")
        session.request(msg, raw, route)
        [(id, code, message)] = route.errors()
        self.assertEqual((id, code), (0, jsonrpc.CONNECTION_CLOSED))
        self.assertIn("could not be started", message)
        self.assertIn("No such file or directory", message)
        self.assertTrue(session.ended)
        self.assertEqual(len(outlet.ended), 1)
        self.assertIsNone(self.manager.get(session.id))

    def test_closeBeforeFirstMessage(self) -> None:
        """A stream closed before any message: no child was started, the stop fires at once."""
        session = self.manager.create(SERVER, "sse", lazy=True)
        d = session.close("SSE stream closed")
        self.successResultOf(d)
        self.assertEqual(self.reactor.spawned, [])
        self.assertIsNone(self.manager.get(session.id))
        self.successResultOf(self.manager.stopService())

    def test_notLazyForOtherTransports(self) -> None:
        """Without lazy=True (Streamable HTTP, WebSocket) the child is spawned at create()."""
        self.manager.create(SERVER, "streamable")
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_createFailureForgetsTheSession(self) -> None:
        """A spawn that fails in create() leaves no session behind."""
        def fail(*a: Any, **kw: Any) -> None:
            raise OSError("boom")

        self.reactor.spawnProcess = fail  # type: ignore[method-assign]
        self.assertRaises(OSError, self.manager.create, SERVER, "streamable")
        self.assertEqual(self.manager.sessions, {})


class ReapTests(ManagerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def test_idleSessionReaped(self) -> None:
        """A session idle for longer than session.maxAge is ended (within one reaper interval) and its child stopped."""
        session = self.manager.create(SERVER, "streamable")
        self.reactor.advance(10)
        self.assertIs(self.manager.get(session.id), session)
        self.reactor.advance(10)
        self.assertIsNone(self.manager.get(session.id))
        self.assertEqual(session.end_reason, "idle for longer than session.maxAge")
        self.assertEqual(self.child_of(session).stdinClosed, 1)

    def test_activeSessionKept(self) -> None:
        """Client traffic restarts the idle clock."""
        session = self.manager.create(SERVER, "streamable")
        self.reactor.advance(10)
        self.reactor.advance(5)
        session.notify(*note("notifications/initialized"))
        self.reactor.advance(5)
        self.assertIs(self.manager.get(session.id), session)
        self.reactor.advance(10)
        self.assertIsNone(self.manager.get(session.id))

    def test_pendingRequestKeepsSession(self) -> None:
        """A session with a request in flight is not reaped, however long the call runs."""
        session = self.manager.create(SERVER, "streamable")
        session.request(*req(1), RecordingRoute())
        self.reactor.advance(100)
        self.assertIs(self.manager.get(session.id), session)

    def test_sseSessionNotReaped(self) -> None:
        """An HTTP+SSE session lives as long as its stream; the reaper leaves it alone."""
        session = self.manager.create(SERVER, "sse")
        self.reactor.advance(100)
        self.assertIs(self.manager.get(session.id), session)


class StopServiceTests(ManagerTestCase):
    def test_noSessions(self) -> None:
        """With no sessions stopService fires at once."""
        self.manager.startService()
        self.successResultOf(self.manager.stopService())

    def test_waitsForEveryChild(self) -> None:
        """stopService fires only after every child has exited."""
        self.manager.startService()
        a = self.manager.create(SERVER, "streamable")
        b = self.manager.create(SERVER, "sse")
        d = self.manager.stopService()
        self.assertEqual((self.child_of(a).stdinClosed, self.child_of(b).stdinClosed), (1, 1))
        self.assertNoResult(d)
        self.child_of(a).exit(0)
        self.assertNoResult(d)
        self.child_of(b).exit(0)
        self.successResultOf(d)

    def test_waitsForChildOfEndedSession(self) -> None:
        """A session that already ended but whose child is still stopping is waited for."""
        self.manager.startService()
        session = self.manager.create(SERVER, "streamable")
        session.close("client ended the session (DELETE)")
        d = self.manager.stopService()
        self.assertNoResult(d)
        self.child_of(session).exit(0)
        self.successResultOf(d)

    def test_signalsDriveShutdown(self) -> None:
        """A child that ignores stdin EOF is signalled on the clock and shutdown completes when it dies."""
        self.manager.startService()
        session = self.manager.create(SERVER, "streamable")
        d = self.manager.stopService()
        self.reactor.advance(2 * SERVER.stopGrace)
        child = self.child_of(session)
        self.assertEqual([int(s) for s in child.signals], [15, 9])
        self.assertNoResult(d)
        child.exit(signal=9)
        self.successResultOf(d)

    def test_stopsAccepting(self) -> None:
        """After stopService the manager refuses new sessions and the reaper has stopped."""
        self.manager.startService()
        self.manager.stopService()
        self.assertFalse(self.manager.accepting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
