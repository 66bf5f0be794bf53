"""One MCP endpoint over several servers: the AggregateUpstream.

To a Session an aggregate is one more upstream (mcpgw.interfaces.IUpstream, ``pid`` None). Behind it
sits one upstream per member server (stdio child, remote server, each behind its tool filter),
for which the aggregate is the MCP client:

- ``initialize`` goes to every member with the client's own params (its capabilities, so
  sampling, elicitation and roots still reach the client end to end); the client gets one
  answer with the members' capabilities merged, the lowest protocol version a member chose, and
  the gateway's serverInfo. ``notifications/initialized`` and other client notifications go to
  every member.
- ``tools/list``, ``prompts/list``, ``resources/list``, ``resources/templates/list``: one member
  page per call; the cursor names the member and carries its own cursor, so paging walks the
  members in order. Names become ``member<separator>name`` (``prefix: "always"``) or only when
  two members share a name (``"on-collision"``; the aggregate crawls every member's full list
  first to know). Resource URIs are never rewritten (they are addresses, not names): reads,
  subscriptions and resource completions go to the member that listed the URI or a template
  matching it.
- ``tools/call``, ``prompts/get``, ``completion/complete`` go to the member the name belongs
  to, with its own name restored; ``logging/setLevel`` goes to all; ``ping`` is answered here.
- Member-to-client requests (sampling, elicitation, roots) get ids of the aggregate's own so two
  members cannot clash; the client's answer goes back to the asker with its original id. One for a
  capability the client did not declare in its ``initialize`` never reaches it: the aggregate
  answers the member as the client's SDK would (-32600 "Sampling not supported").
- ``notifications/*/list_changed`` from a member are forwarded (and drop the name index).
- A member that exits, fails or does not answer ``initialize`` in time is *down*: the others
  go on; list results carry ``_meta["mcpgw/unavailable"] = [{"server", "reason"}]``; ``/servers``
  counts it. The session ends only when every member is down.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import __version__, aggregate_members, jsonrpc, logs
from mcpgw.aggregate_members import (
    CHANGED,
    LISTS,
    Callback,
    _Call,
    _decode_cursor,
    _dict,
    _encode_cursor,
    _Member,
    _MemberDelegate,
    _params,
    _template_regex,
    merge_capabilities,
)
from mcpgw.config import AggregateServer
from mcpgw.interfaces import IUpstream, upstream_kind
from mcpgw.metrics import NULL_BOUND, BoundMetrics
from mcpgw.upstream import make_upstream
from mcpgw.versions import capability_refusal, undeclared

#: Seconds a member may take to answer initialize (or one page of an internal listing).
MEMBER_TIMEOUT = 30.0
#: Pages of one member's list the aggregate reads to learn its names (on-collision, URI routing).
MAX_CRAWL_PAGES = 50
UNAVAILABLE = "mcpgw/unavailable"


@upstream_kind("aggregate")
@implementer(IUpstream)
class AggregateUpstream:
    """Fans one client session out to one upstream per member server."""

    log = Logger(observer=logs.observer)
    pid: int | None = None

    def __init__(self, server: AggregateServer, delegate: Any, reactor: Any):
        self.server = server
        self.delegate = delegate
        self._reactor = reactor
        self._sep = server.separator
        self._always = server.prefix == "always"
        self.ended = False
        self.exit_reason = ""
        self._stopping = False
        self._metrics: BoundMetrics = NULL_BOUND
        self.members = [_Member(config, i) for i, config in enumerate(server.members)]
        for member in self.members:
            member.upstream = make_upstream(member.config, _MemberDelegate(self, member), reactor)
        self._by_name = {m.name: m for m in self.members}
        self._calls: dict[str, _Call] = {}
        self._next = 0
        #: ids the aggregate gave member-to-client requests -> (member, the member's own id)
        self._asked: dict[str, tuple[_Member, Any]] = {}
        #: list method -> callbacks waiting for the crawl in progress
        self._crawls: dict[str, list[Callable[[], None]]] = {}
        self._initialize: dict[str, Any] | None = None
        #: The capabilities the client declared in its initialize (what a member may ask it for).
        self._client_capabilities: dict[str, Any] = {}
        self._init_id: Any = None
        self._init_timer: Any = None
        #: client list request id -> members whose page failed on the way (reported in _meta)
        self._failed_lists: dict[Any, list[str]] = {}

    # -- the upstream surface ------------------------------------------------

    @property
    def metrics(self) -> BoundMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, value: BoundMetrics) -> None:
        self._metrics = value
        for member in self.members:
            member.upstream.metrics = value

    def member_down(self, name: str) -> str | None:
        """Why member ``name`` is down in this session, or None."""
        member = self._by_name.get(name)
        return None if member is None else member.down

    def spawn(self) -> None:
        for member in self.members:
            try:
                member.upstream.spawn()
            except Exception as e:  # noqa: BLE001 - one member that cannot start leaves the others
                self.log.warn("aggregate {server}: member {member} did not start: {error}",
                              server=self.server.name, member=member.name, error=str(e))
                member.down = f"did not start: {e}"
        if all(m.down is not None for m in self.members):
            raise RuntimeError(f"no member of aggregate {self.server.name} could start")

    def send(self, raw: bytes, msg: Any = None) -> bool:
        if self.ended or self._stopping:
            return False
        msg = jsonrpc.as_message(raw, msg)
        if msg is None:
            return False
        if not isinstance(msg, dict):
            return True
        if "method" not in msg:
            self._client_response(msg)
        elif "id" not in msg:
            self._client_notification(raw, msg)
        else:
            self._client_request(msg)
        return True

    def pauseProducing(self) -> None:
        for member in self.members:
            member.upstream.pauseProducing()

    def resumeProducing(self) -> None:
        for member in self.members:
            member.upstream.resumeProducing()

    def stop(self) -> defer.Deferred[None]:
        """Stop every member; fires when all of them are gone."""
        self._stopping = True
        waits = [m.upstream.stop() for m in self.members]
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addCallback(lambda _: self._finish("closed"))
        return d.addCallback(lambda _: None)

    def _finish(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.exit_reason = reason
        for timer in [c.timer for c in self._calls.values()] + [self._init_timer]:
            if timer is not None and timer.active():
                timer.cancel()
        self.delegate.upstreamEnded(reason)

    # -- client -> members -----------------------------------------------------

    def _client_request(self, msg: dict[str, Any]) -> None:
        id = msg["id"]
        method = msg["method"]
        params = _params(msg)
        if method == "initialize":
            self._start_initialize(id, msg)
        elif method == "ping":
            self._answer(id, {})
        elif method in LISTS:
            self._list(id, method, params)
        elif method in aggregate_members.LIST_OF:
            self._by_public_name(id, msg, aggregate_members.LIST_OF[method], params.get("name"), lambda p, name: {**p, "name": name})
        elif method in aggregate_members.URI_METHODS:
            self._by_uri(id, msg, params.get("uri"))
        elif method == "completion/complete":
            ref = _dict(params.get("ref"))
            if ref.get("type") == "ref/prompt":
                self._by_public_name(id, msg, "prompts/list", ref.get("name"),
                                     lambda p, name: {**p, "ref": {**ref, "name": name}})
            else:
                self._by_uri(id, msg, ref.get("uri"))
        elif method == "logging/setLevel":
            self._everyone(id, msg)
        else:
            self._error(id, jsonrpc.METHOD_NOT_FOUND, f"Method not found: {method}")

    def _client_notification(self, raw: bytes, msg: dict[str, Any]) -> None:
        if msg["method"] == "notifications/cancelled":
            params = _params(msg)
            for key, call in list(self._calls.items()):
                if call.client_id is not None and call.client_id == params.get("requestId"):
                    self._to(call.member, {**msg, "params": {**params, "requestId": key}})
            return
        for member in self.members:
            if member.down is None and member.ready:
                member.upstream.send(raw, msg)

    def _client_response(self, msg: dict[str, Any]) -> None:
        id = msg.get("id")
        asked = self._asked.pop(id, None) if isinstance(id, str) else None
        if asked is None:
            return
        member, original = asked
        if member.down is None:
            self._to(member, {**msg, "id": original})

    def _to(self, member: _Member, msg: dict[str, Any]) -> bool:
        return bool(member.upstream.send(jsonrpc.dumps(msg), msg))

    def _call(self, member: _Member, method: str, params: dict[str, Any], callback: Callback,
              client_id: Any = None, timeout: float | None = None) -> None:
        """Send a request to ``member``; ``callback(response)`` once (a JSON-RPC error if it is down)."""
        self._next += 1
        key = f"mcpgw-{self._next}"
        call = self._calls[key] = _Call(member, callback, client_id)
        if timeout is not None:
            call.timer = self._reactor.callLater(timeout, self._call_timed_out, key)
        if member.down is not None or not self._to(member, {"jsonrpc": "2.0", "id": key, "method": method, "params": params}):
            self._settle(key, jsonrpc.error(key, jsonrpc.CONNECTION_CLOSED, f"server {member.name} is unavailable: {member.down}"))

    def _settle(self, key: str, response: dict[str, Any]) -> None:
        call = self._calls.pop(key, None)
        if call is None:
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.callback(response)

    def _call_timed_out(self, key: str) -> None:
        call = self._calls.get(key)
        if call is not None:
            self._settle(key, jsonrpc.error(key, jsonrpc.REQUEST_TIMEOUT, f"server {call.member.name} did not answer in time"))

    def _relay(self, id: Any, member: _Member, method: str, params: dict[str, Any]) -> None:
        """A client request answered by one member: its answer goes back with the client's id."""
        def answered(response: dict[str, Any]) -> None:
            out = {k: v for k, v in response.items() if k != "id"}
            self._deliver({"jsonrpc": "2.0", "id": id, **out})

        self._call(member, method, params, answered, client_id=id)

    def _everyone(self, id: Any, msg: dict[str, Any]) -> None:
        live = [m for m in self.members if m.down is None and m.ready]
        if not live:
            self._error(id, jsonrpc.CONNECTION_CLOSED, "no member server is available")
            return
        waiting = {m.name for m in live}

        def done(member: _Member, response: dict[str, Any]) -> None:
            waiting.discard(member.name)
            if not waiting:
                self._answer(id, {})

        for m in live:
            self._call(m, msg["method"], _params(msg), partial(done, m), client_id=id)

    # -- initialize --------------------------------------------------------------

    def _start_initialize(self, id: Any, msg: dict[str, Any]) -> None:
        if self._init_id is not None or any(m.ready for m in self.members):
            self._error(id, jsonrpc.INVALID_REQUEST, "the session is already initialized")
            return
        self._init_id = id
        params = _params(msg)
        self._client_capabilities = _dict(params.get("capabilities"))
        waiting = {m.name for m in self.members if m.down is None}
        self._init_timer = self._reactor.callLater(MEMBER_TIMEOUT, self._initialize_timed_out, waiting)

        def answered(member: _Member, response: dict[str, Any]) -> None:
            result = response.get("result")
            if isinstance(result, dict):
                member.ready = True
                caps = result.get("capabilities")
                member.capabilities = caps if isinstance(caps, dict) else {}
                member.version = result.get("protocolVersion") if isinstance(result.get("protocolVersion"), str) else None
                member.instructions = result.get("instructions") if isinstance(result.get("instructions"), str) else None
            elif member.down is None:
                error = _dict(response.get("error"))
                self._member_down(member, f"initialize failed: {error.get('message')}")
            waiting.discard(member.name)
            if not waiting:
                self._initialized(id)

        for member in self.members:
            if member.down is None:
                self._call(member, "initialize", params, partial(answered, member))
        if not waiting:
            self._initialized(id)

    def _initialize_timed_out(self, waiting: set[str]) -> None:
        for name in list(waiting):
            member = self._by_name[name]
            self._member_down(member, f"no answer to initialize within {MEMBER_TIMEOUT:g} s")
            member.upstream.stop()

    def _initialized(self, id: Any) -> None:
        if self._init_timer is not None and self._init_timer.active():
            self._init_timer.cancel()
        if self._init_id != id:
            return
        self._init_id = None
        ready = [m for m in self.members if m.ready and m.down is None]
        if not ready:
            self._error(id, jsonrpc.CONNECTION_CLOSED, f"no member server of {self.server.name} is available",
                        data={"unavailable": self._unavailable()})
            return
        result: dict[str, Any] = {
            "protocolVersion": min(m.version for m in ready if m.version) if any(m.version for m in ready) else "2025-06-18",
            "capabilities": merge_capabilities([m.capabilities for m in ready]),
            "serverInfo": {"name": f"mcpgw-aggregate-{self.server.name}", "version": __version__},
        }
        notes = [f"[{m.name}] {m.instructions}" for m in ready if m.instructions]
        if notes:
            result["instructions"] = "\n\n".join(notes)
        if self._unavailable():
            result["_meta"] = {UNAVAILABLE: self._unavailable()}
        self._answer(id, result)

    # -- lists ---------------------------------------------------------------------

    def _list(self, id: Any, method: str, params: dict[str, Any]) -> None:
        cursor = params.get("cursor")
        start, member_cursor = 0, None
        if cursor is not None:
            decoded = _decode_cursor(cursor)
            if decoded is None or decoded[0] not in self._by_name:
                self._error(id, jsonrpc.INVALID_PARAMS, "Invalid cursor")
                return
            start, member_cursor = self._by_name[decoded[0]].position, decoded[1]
        if self._always:
            self._page(id, method, params, start, member_cursor)
        else:
            self._crawl(method, lambda: self._page(id, method, params, start, member_cursor))

    def _page(self, id: Any, method: str, params: dict[str, Any], start: int, member_cursor: Any) -> None:
        """One page of member ``start`` (or of the next one that offers this list)."""
        key, _, field = LISTS[method]
        member = next((m for m in self.members[start:] if m.offers(method)), None)
        if member is None:
            self._answer(id, self._with_meta({key: []}))
            return
        member_params = {k: v for k, v in params.items() if k != "cursor"}
        if member_cursor is not None:
            member_params["cursor"] = member_cursor

        def answered(response: dict[str, Any]) -> None:
            result = response.get("result")
            if not isinstance(result, dict):
                if member.down is None:
                    self.log.info("aggregate {server}: {method} of {member} failed", server=self.server.name,
                                  method=method, member=member.name)
                    self._failed_lists.setdefault(id, []).append(member.name)
                self._page(id, method, params, member.position + 1, None)
                return
            items = [dict(item) for item in result.get(key) or [] if isinstance(item, dict)]
            self._learn(member, method, items, complete=False)
            for item in items:
                if isinstance(item.get(field), str):
                    item[field] = self._public(member, method, item[field])
            following = next((m for m in self.members[member.position + 1:] if m.offers(method)), None)
            out: dict[str, Any] = {key: items}
            if result.get("nextCursor"):
                out["nextCursor"] = _encode_cursor(member.name, result["nextCursor"])
            elif following is not None:
                if not items:
                    self._page(id, method, params, following.position, None)
                    return
                out["nextCursor"] = _encode_cursor(following.name, None)
            self._answer(id, self._with_meta(out, self._failed_lists.pop(id, [])))

        self._call(member, method, member_params, answered, client_id=id)

    def _with_meta(self, result: dict[str, Any], failed: list[str] | None = None) -> dict[str, Any]:
        unavailable = self._unavailable() + [{"server": name, "reason": "the list request failed"} for name in failed or []]
        if unavailable:
            result["_meta"] = {UNAVAILABLE: unavailable}
        return result

    def _unavailable(self) -> list[dict[str, str]]:
        return [{"server": m.name, "reason": m.down} for m in self.members if m.down is not None]

    def _public(self, member: _Member, method: str, name: str) -> str:
        if self._always or self._collides(member, method, name):
            return f"{member.name}{self._sep}{name}"
        return name

    def _collides(self, member: _Member, method: str, name: str) -> bool:
        return any(name in (other.names[method] or ()) for other in self.members
                   if other is not member and other.offers(method))

    def _learn(self, member: _Member, method: str, items: list[dict[str, Any]], complete: bool) -> None:
        """Remember what ``member`` offers: names (for routing), URIs and templates (resources)."""
        field = LISTS[method][2]
        names = {i[field] for i in items if isinstance(i.get(field), str)}
        if complete:
            member.names[method] = names
        else:
            known = member.names[method]
            if known is not None:
                known |= names
        for item in items:
            if method == "resources/list" and isinstance(item.get("uri"), str):
                member.uris.add(item["uri"])
            if method == "resources/templates/list" and isinstance(item.get("uriTemplate"), str):
                template = item["uriTemplate"]
                if all(t != template for t, _ in member.templates):
                    member.templates.append((template, _template_regex(template)))

    def _crawl(self, method: str, then: Callable[[], None]) -> None:
        """Read every member's whole ``method`` list (unless known), then call ``then``."""
        stale = [m for m in self.members if m.offers(method) and m.names[method] is None]
        if not stale:
            then()
            return
        if method in self._crawls:
            self._crawls[method].append(then)
            return
        self._crawls[method] = [then]
        waiting = {m.name for m in stale}

        def member_done(member: _Member) -> None:
            waiting.discard(member.name)
            if not waiting:
                for waiter in self._crawls.pop(method, []):
                    waiter()

        for member in stale:
            self._crawl_member(member, method, None, [], 0, member_done)

    def _crawl_member(self, member: _Member, method: str, cursor: Any, items: list[dict[str, Any]], pages: int,
                      done: Callable[[_Member], None]) -> None:
        def answered(response: dict[str, Any]) -> None:
            result = response.get("result")
            if isinstance(result, dict):
                items.extend(i for i in result.get(LISTS[method][0]) or [] if isinstance(i, dict))
                if result.get("nextCursor") and pages + 1 < MAX_CRAWL_PAGES:
                    self._crawl_member(member, method, result["nextCursor"], items, pages + 1, done)
                    return
            self._learn(member, method, items, complete=True)
            done(member)

        self._call(member, method, {} if cursor is None else {"cursor": cursor}, answered, timeout=MEMBER_TIMEOUT)

    # -- routing -----------------------------------------------------------------------

    def _by_public_name(self, id: Any, msg: dict[str, Any], method: str, public: Any,
                        rename: Callable[[dict[str, Any], str], dict[str, Any]]) -> None:
        if not isinstance(public, str):
            self._error(id, jsonrpc.INVALID_PARAMS, "a name is required")
            return

        def route() -> None:
            found = self._resolve(method, public)
            if found is None:
                what = "tool" if method == "tools/list" else "prompt"
                self._error(id, jsonrpc.INVALID_PARAMS, f"Unknown {what}: {public}")
                return
            member, name = found
            if member.down is not None:
                self._error(id, jsonrpc.CONNECTION_CLOSED, f"server {member.name} is unavailable: {member.down}")
                return
            self._relay(id, member, msg["method"], rename(_params(msg), name))

        if self._always:
            route()
        else:
            self._crawl(method, route)

    def _resolve(self, method: str, public: str) -> tuple[_Member, str] | None:
        for member in sorted(self.members, key=lambda m: -len(m.name)):
            head = member.name + self._sep
            if public.startswith(head):
                rest = public[len(head):]
                if self._always or rest in (member.names[method] or ()):
                    return member, rest
        if self._always:
            return None
        owners = [m for m in self.members if m.offers(method) and public in (m.names[method] or ())]
        return (owners[0], public) if len(owners) == 1 else None

    def member_for(self, method: str, params: dict[str, Any]) -> str | None:
        """The member a request by name or URI goes to, as far as known yet (dispatch's leg span names it)."""
        name, uri, lists = params.get("name"), params.get("uri"), aggregate_members.LIST_OF
        found = self._resolve(lists[method], name) if method in lists and isinstance(name, str) else None
        owner = self._owner_of(uri) if method in aggregate_members.URI_METHODS and isinstance(uri, str) else None
        return found[0].name if found else owner.name if owner is not None else None

    def _by_uri(self, id: Any, msg: dict[str, Any], uri: Any) -> None:
        if not isinstance(uri, str):
            self._error(id, jsonrpc.INVALID_PARAMS, "a uri is required")
            return

        def route() -> None:
            member = self._owner_of(uri)
            if member is None:
                self._error(id, jsonrpc.INVALID_PARAMS, f"Resource not found: {uri}", data={"uri": uri})
                return
            self._relay(id, member, msg["method"], _params(msg))

        self._crawl("resources/list", lambda: self._crawl("resources/templates/list", route))

    def _owner_of(self, uri: str) -> _Member | None:
        live = [m for m in self.members if m.down is None and m.ready]
        for member in live:
            if uri in member.uris:
                return member
        for member in live:
            if any(t == uri or regex.match(uri) for t, regex in member.templates):
                return member
        return next((m for m in live if "resources" in m.capabilities), None)

    # -- members -> client ---------------------------------------------------------------

    def _from_member(self, member: _Member, raw: bytes, msg: dict[str, Any]) -> None:
        if self.ended:
            return
        if "method" not in msg:
            id = msg.get("id")
            if isinstance(id, str) and id in self._calls and self._calls[id].member is member:
                self._settle(id, msg)
            return
        method = msg["method"]
        if "id" in msg:  # the member asks the client (sampling, elicitation, roots)
            needed = undeclared(method, self._client_capabilities)
            if needed is not None:
                member.upstream.send(capability_refusal(msg["id"], needed))
                return
            self._next += 1
            key = f"mcpgw-{member.name}-{self._next}"
            self._asked[key] = (member, msg["id"])
            self._deliver({**msg, "id": key})
            return
        if method in CHANGED:
            for stale in CHANGED[method]:
                member.names[stale] = None
            if method == "notifications/resources/list_changed":
                member.uris, member.templates = set(), []
        if method == "notifications/cancelled":
            params = _params(msg)
            for key, (asker, original) in list(self._asked.items()):
                if asker is member and original == params.get("requestId"):
                    del self._asked[key]
                    self._deliver({**msg, "params": {**params, "requestId": key}})
            return
        self.delegate.upstreamMessage(raw, msg)

    def _member_down(self, member: _Member, reason: str) -> None:
        if member.down is not None or self._stopping or self.ended:
            return
        member.down = reason
        self.log.warn("aggregate {server}: member {member} is down: {reason}", server=self.server.name,
                      member=member.name, reason=reason)
        for key, call in list(self._calls.items()):
            if call.member is member:
                self._settle(key, jsonrpc.error(key, jsonrpc.CONNECTION_CLOSED, f"server {member.name} is unavailable: {reason}"))
        for key, (asker, _) in list(self._asked.items()):
            if asker is member:
                del self._asked[key]
        if all(m.down is not None for m in self.members):
            self._finish(f"every member server is down ({reason})")
            return
        if member.ready:
            for method, capability in (("notifications/tools/list_changed", "tools"),
                                       ("notifications/prompts/list_changed", "prompts"),
                                       ("notifications/resources/list_changed", "resources")):
                if capability in member.capabilities:
                    for other in self.members:
                        for stale in CHANGED[method]:
                            other.names[stale] = None
                    self._deliver({"jsonrpc": "2.0", "method": method})

    # -- answers -------------------------------------------------------------------------

    def _deliver(self, msg: dict[str, Any]) -> None:
        if not self.ended:
            self.delegate.upstreamMessage(jsonrpc.dumps(msg), msg)

    def _answer(self, id: Any, result: dict[str, Any]) -> None:
        self._deliver({"jsonrpc": "2.0", "id": id, "result": result})

    def _error(self, id: Any, code: int, message: str, data: Any = None) -> None:
        self._deliver(jsonrpc.error(id, code, message, data))


