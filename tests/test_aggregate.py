"""Issue 10, point 2 (and tool filtering): the aggregated server (mcpgw.aggregate).

Integration: an aggregate ``all`` over two stdio servers (tests/fixtures/names_server.py,
``alpha`` paged two tools at a time, ``beta`` with a denied tool) and one remote SDK server
(tests/fixtures/remote_server.py) behind a real gateway: prefixed listing across pages,
calls routed with names restored, the shared name disambiguated (``always`` and
``on-collision``), a killed member leaving the rest working and reported in ``_meta`` and
``/servers``.

Unit: AggregateUpstream with fake member upstreams (no processes, no sockets).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mcpgw import jsonrpc
from mcpgw.aggregate import (
    UNAVAILABLE,
    AggregateUpstream,
    _decode_cursor,
    _encode_cursor,
    merge_capabilities,
)
from mcpgw.config import ConfigError, parse
from tests.gateway_process import Gateway, wait_until
from tests.remote_fixture import RemoteServer, WsClient, sdk_session

NAMES_SERVER = str(Path(__file__).resolve().parent / "fixtures" / "names_server.py")


def names_server(name: str, tool_names: str, *extra: str, **options: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [NAMES_SERVER, "--name", name, "--tools", tool_names, *extra], **options}


def aggregate_config(remote_url: str, prefix: str) -> dict[str, Any]:
    return {
        "mcpServers": {
            "alpha": names_server("alpha", "a1,a2,a3,shared,crash", "--page-size", "2"),
            "beta": names_server("beta", "b1,shared,secret,changed", "--prompts", "bp", tools={"deny": ["secret"]}),
            "rem": {"url": remote_url},
        },
        "aggregate": {"name": "all", "servers": ["alpha", "beta", "rem"], "prefix": prefix},
    }


@pytest.fixture(scope="module")
def remote():
    server = RemoteServer("streamable-http", name="rem")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def always(remote):
    gw = Gateway(aggregate_config(remote.url, "always"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def on_collision(remote):
    gw = Gateway(aggregate_config(remote.url, "on-collision"))
    yield gw
    gw.stop()


def ws_session(gw: Gateway) -> WsClient:
    ws = WsClient(f"ws://127.0.0.1:{gw.port}/servers/all/ws")
    ws.initialize()
    return ws


def all_pages(ws: WsClient, method: str = "tools/list", key: str = "tools") -> tuple[list[list[str]], list[dict]]:
    pages, results, cursor = [], [], None
    while True:
        answer = ws.call(method, {"cursor": cursor} if cursor else {})
        result = answer["result"]
        results.append(result)
        pages.append([item["name"] for item in result[key]])
        cursor = result.get("nextCursor")
        if not cursor:
            return pages, results


def text(answer: dict[str, Any]) -> str:
    return answer["result"]["content"][0]["text"]


REMOTE_TOOLS = ["whoami", "echo", "add", "shared", "headers", "progress", "ask"]


@pytest.mark.integration
class TestAggregateGateway:
    """Two stdio members and one remote behind a real gateway (pytest class: fixtures need it)."""

    def test_initialize_merges_members(self, always):
        """initialize is answered by the gateway: merged capabilities, the aggregate's serverInfo,
        every member's instructions."""
        ws = WsClient(f"ws://127.0.0.1:{always.port}/servers/all/ws")
        try:
            result = ws.initialize()["result"]
            assert result["serverInfo"]["name"] == "mcpgw-aggregate-all"
            assert result["capabilities"]["tools"] == {"listChanged": True}
            assert {"prompts", "resources"} <= set(result["capabilities"])
            assert "[alpha]" in result["instructions"] and "[beta]" in result["instructions"]
        finally:
            ws.close()

    def test_listing_pages_across_upstreams_with_prefixes(self, always):
        """tools/list walks alpha's pages, then beta, then the remote; every name is prefixed;
        the denied tool is missing."""
        ws = ws_session(always)
        try:
            pages, _ = all_pages(ws)
        finally:
            ws.close()
        assert pages[0] == ["alpha__a1", "alpha__a2"]  # alpha pages two at a time
        assert pages[1] == ["alpha__a3", "alpha__shared"]
        names = [n for page in pages for n in page]
        assert names == (["alpha__a1", "alpha__a2", "alpha__a3", "alpha__shared", "alpha__crash",
                          "beta__b1", "beta__shared", "beta__changed"] + [f"rem__{t}" for t in REMOTE_TOOLS])
        assert "beta__secret" not in names

    def test_calls_reach_the_right_server(self, always):
        """The shared name reaches each member by its prefix, with the member's own name restored."""
        ws = ws_session(always)
        try:
            assert text(ws.tool("alpha__shared", {"k": 1})) == 'alpha:shared:{"k": 1}'
            assert text(ws.tool("beta__shared")) == "beta:shared:{}"
            assert text(ws.tool("rem__shared")) == "shared from rem"
            assert text(ws.tool("rem__add", {"a": 2, "b": 3})) == "5"
            assert ws.call("prompts/get", {"name": "beta__bp"})["result"]["messages"][0]["content"]["text"] == "beta:bp"
            assert ws.call("resources/read", {"uri": "remote://info"})["result"]["contents"][0]["text"] == "remote server rem"
            assert ws.tool("nobody__x")["error"]["code"] == jsonrpc.INVALID_PARAMS
            assert ws.tool("beta__secret")["error"]["code"] == jsonrpc.INVALID_PARAMS  # filtered out
        finally:
            ws.close()

    @pytest.mark.parametrize("kind", ["mcp", "sse"])
    def test_sdk_client(self, always, kind):
        """The SDK client on /servers/all/mcp and /servers/all/sse pages with the aggregate's cursors
        and calls a remote tool that asks the client for sampling."""

        async def script(client: Any) -> tuple[list[str], str]:
            names, cursor = [], None
            while True:
                page = await client.list_tools(cursor=cursor) if cursor else await client.list_tools()
                names += [t.name for t in page.tools]
                cursor = page.next_cursor
                if not cursor:
                    break
            asked = await client.call_tool("rem__ask", {"question": "aggregated"})
            return names, asked.content[0].text

        names, asked = sdk_session(f"{always.url}/servers/all/{kind}", kind, script)
        assert "alpha__a1" in names and "beta__b1" in names and "rem__echo" in names
        assert asked == "AGGREGATED"

    def test_list_changed_is_forwarded(self, always):
        """A member's notifications/tools/list_changed reaches the client."""
        ws = ws_session(always)
        try:
            assert text(ws.tool("beta__changed")) == "beta:changed:{}"
            ws.call("ping")
            assert any(m.get("method") == "notifications/tools/list_changed" for m in ws.seen)
        finally:
            ws.close()

    def test_collision_disambiguated_on_collision(self, on_collision):
        """prefix on-collision: only the name three members share is prefixed; plain names route by owner."""
        ws = ws_session(on_collision)
        try:
            pages, _ = all_pages(ws)
            names = [n for page in pages for n in page]
            assert {"alpha__shared", "beta__shared", "rem__shared"} <= set(names)
            assert "shared" not in names
            assert {"a1", "b1", "echo", "whoami"} <= set(names)
            assert text(ws.tool("a1")) == "alpha:a1:{}"
            assert text(ws.tool("b1")) == "beta:b1:{}"
            assert text(ws.tool("echo", {"text": "plain"})) == "plain"
            assert text(ws.tool("beta__shared")) == "beta:shared:{}"
            assert ws.tool("shared")["error"]["code"] == jsonrpc.INVALID_PARAMS  # ambiguous
            assert ws.call("prompts/get", {"name": "bp"})["result"]["messages"][0]["content"]["text"] == "beta:bp"
        finally:
            ws.close()

    def test_killed_member_leaves_the_rest_working(self, always):
        """SIGKILL alpha's child: alpha's tools go, beta and the remote still answer; tools/list reports
        alpha in _meta, and /servers counts it down in one session."""
        ws = ws_session(always)
        try:
            assert text(ws.tool("alpha__a1")) == "alpha:a1:{}"
            pid = _child_of(always, "--name alpha", ws)
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: _down_in(always, "alpha") == 1, timeout=10)
            pages, results = all_pages(ws)
            names = [n for page in pages for n in page]
            assert not any(n.startswith("alpha__") for n in names)
            assert "beta__b1" in names and "rem__echo" in names
            assert results[0]["_meta"][UNAVAILABLE][0]["server"] == "alpha"
            assert "signal" in results[0]["_meta"][UNAVAILABLE][0]["reason"]
            assert ws.tool("alpha__a1")["error"]["code"] == jsonrpc.CONNECTION_CLOSED
            assert text(ws.tool("beta__b1")) == "beta:b1:{}"
            assert text(ws.tool("rem__echo", {"text": "still"})) == "still"
            assert any(m.get("method") == "notifications/tools/list_changed" for m in ws.seen)
        finally:
            ws.close()


def _child_of(gw: Gateway, marker: str, ws: WsClient) -> int:
    """The pid of the newest gateway child whose command line has ``marker``."""
    found = []
    for pid in gw.child_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(pid)
    assert found, "no child found"
    return max(found)


def _down_in(gw: Gateway, member: str) -> int:
    servers = {s["name"]: s for s in httpx.get(f"{gw.url}/servers").json()["servers"]}
    return next(m["downIn"] for m in servers["all"]["members"] if m["name"] == member)


# -- unit: AggregateUpstream with fake members ------------------------------------------------


class FakeMember:
    """A member upstream that records what it is sent; the test answers for it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.ended = False
        self.pid = None
        self.metrics = None
        self.delegate: Any = None

    def spawn(self) -> None:
        pass

    def send(self, raw: bytes, msg: Any = None) -> bool:
        if self.ended:
            return False
        self.sent.append(jsonrpc.loads(raw))
        return True

    def stop(self) -> defer.Deferred[None]:
        self.ended = True
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def reply(self, result: Any, index: int = -1) -> None:
        msg = {"jsonrpc": "2.0", "id": self.sent[index]["id"], "result": result}
        self.delegate.upstreamMessage(jsonrpc.dumps(msg), msg)

    def say(self, msg: dict[str, Any]) -> None:
        self.delegate.upstreamMessage(jsonrpc.dumps(msg), msg)


class Client:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ended: list[str] = []

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.messages.append(msg)

    def upstreamProtocolError(self, reason: str) -> None:
        pass

    def upstreamEnded(self, reason: str) -> None:
        self.ended.append(reason)


def _aggregate(prefix: str = "always") -> tuple[AggregateUpstream, dict[str, FakeMember], Client]:
    config = parse({"mcpServers": {"a": {"command": sys.executable}, "b": {"command": sys.executable}},
                    "aggregate": {"name": "all", "servers": ["a", "b"], "prefix": prefix}}, {})
    client = Client()
    agg = AggregateUpstream(config.servers["all"], client, Clock())
    fakes = {}
    for member in agg.members:
        fake = FakeMember()
        fake.delegate = member.upstream.delegate if hasattr(member.upstream, "delegate") else None
        member.upstream = fake
        fakes[member.name] = fake
    agg.spawn()
    return agg, fakes, client


def _send(agg: AggregateUpstream, msg: dict[str, Any]) -> None:
    assert agg.send(jsonrpc.dumps({"jsonrpc": "2.0", **msg}))


def _initialize(agg: AggregateUpstream, fakes: dict[str, FakeMember], caps: dict[str, dict] | None = None) -> None:
    _send(agg, {"id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}}})
    for name, fake in fakes.items():
        fake.reply({"protocolVersion": "2025-06-18", "capabilities": (caps or {}).get(name, {"tools": {}}),
                    "serverInfo": {"name": name}})


def test_unit_initialize_waits_for_every_member():
    """One answer once both members answered, capabilities merged."""
    agg, fakes, client = _aggregate()
    _send(agg, {"id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}}}})
    assert fakes["a"].sent[0]["params"]["capabilities"] == {"sampling": {}}  # the client's own capabilities
    fakes["a"].reply({"protocolVersion": "2025-06-18", "capabilities": {"tools": {"listChanged": True}}})
    assert client.messages == []
    fakes["b"].reply({"protocolVersion": "2025-03-26", "capabilities": {"prompts": {}}})
    [answer] = client.messages
    assert answer["id"] == 0
    assert answer["result"]["capabilities"] == {"tools": {"listChanged": True}, "prompts": {}}
    assert answer["result"]["protocolVersion"] == "2025-03-26"


def test_unit_member_that_never_answers_initialize_is_down():
    """After MEMBER_TIMEOUT (on the injected clock) the silent member is down; the client is answered."""
    agg, fakes, client = _aggregate()
    _send(agg, {"id": 0, "method": "initialize", "params": {}})
    fakes["a"].reply({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}})
    agg._reactor.advance(31)
    assert client.messages[-1]["id"] == 0
    assert client.messages[-1]["result"]["_meta"][UNAVAILABLE][0]["server"] == "b"
    assert agg.member_down("b") and fakes["b"].ended


def test_unit_routing_restores_names_and_ids():
    """tools/call a__x goes to a as x with the aggregate's id; the answer comes back with the client's id."""
    agg, fakes, client = _aggregate()
    _initialize(agg, fakes)
    _send(agg, {"id": "c1", "method": "tools/call", "params": {"name": "a__x", "arguments": {"v": 1}}})
    sent = fakes["a"].sent[-1]
    assert sent["params"] == {"name": "x", "arguments": {"v": 1}} and sent["id"] != "c1"
    fakes["a"].reply({"content": []})
    assert client.messages[-1] == {"jsonrpc": "2.0", "id": "c1", "result": {"content": []}}


def test_unit_cursor_names_the_member():
    """A member's nextCursor is wrapped with its name; the next call goes to that member with its own cursor."""
    agg, fakes, client = _aggregate()
    _initialize(agg, fakes)
    _send(agg, {"id": 1, "method": "tools/list"})
    fakes["a"].reply({"tools": [{"name": "x"}], "nextCursor": "page2"})
    first = client.messages[-1]["result"]
    assert first["tools"] == [{"name": "a__x"}]
    assert _decode_cursor(first["nextCursor"]) == ("a", "page2")
    _send(agg, {"id": 2, "method": "tools/list", "params": {"cursor": first["nextCursor"]}})
    assert fakes["a"].sent[-1]["params"] == {"cursor": "page2"}
    fakes["a"].reply({"tools": [{"name": "y"}]})
    second = client.messages[-1]["result"]
    assert _decode_cursor(second["nextCursor"]) == ("b", None)
    _send(agg, {"id": 3, "method": "tools/list", "params": {"cursor": "garbage"}})
    assert client.messages[-1]["error"]["code"] == jsonrpc.INVALID_PARAMS


def test_unit_server_request_ids_are_remapped():
    """A member's sampling request gets an aggregate id; the client's answer returns with the original id."""
    agg, fakes, client = _aggregate()
    _send(agg, {"id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}}}})
    for fake in fakes.values():  # the client declared sampling: only then is a member's request relayed
        fake.reply({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}})
    fakes["b"].say({"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {}})
    asked = client.messages[-1]
    assert asked["method"] == "sampling/createMessage" and asked["id"] != 5
    _send(agg, {"id": asked["id"], "result": {"ok": True}})
    assert fakes["b"].sent[-1] == {"jsonrpc": "2.0", "id": 5, "result": {"ok": True}}
    assert all(m.get("id") != 5 for m in fakes["a"].sent)


def test_unit_down_member_fails_its_calls_and_is_reported():
    """A member that ends: its pending call gets an error, lists carry _meta, the client hears list_changed;
    the session ends only when every member is down."""
    agg, fakes, client = _aggregate()
    _initialize(agg, fakes)
    _send(agg, {"id": 9, "method": "tools/call", "params": {"name": "a__x"}})
    fakes["a"].delegate.upstreamEnded("exited with status 3")
    assert client.messages[-2]["id"] == 9 and client.messages[-2]["error"]["code"] == jsonrpc.CONNECTION_CLOSED
    assert client.messages[-1]["method"] == "notifications/tools/list_changed"
    _send(agg, {"id": 10, "method": "tools/list"})
    fakes["b"].reply({"tools": [{"name": "z"}]})
    result = client.messages[-1]["result"]
    assert result["tools"] == [{"name": "b__z"}]
    assert result["_meta"][UNAVAILABLE] == [{"server": "a", "reason": "MCP server exited with status 3"}]
    assert client.ended == []
    fakes["b"].delegate.upstreamEnded("killed by signal 9")
    assert client.ended and agg.ended


def test_unit_on_collision_crawls_then_prefixes_only_shared_names():
    """on-collision: the first list crawls both members; a shared name is prefixed, others are not."""
    agg, fakes, client = _aggregate("on-collision")
    _initialize(agg, fakes)
    _send(agg, {"id": 1, "method": "tools/list"})
    fakes["a"].reply({"tools": [{"name": "x"}, {"name": "s"}]})
    fakes["b"].reply({"tools": [{"name": "y"}, {"name": "s"}]})
    fakes["a"].reply({"tools": [{"name": "x"}, {"name": "s"}]})  # the page the client asked for
    assert [t["name"] for t in client.messages[-1]["result"]["tools"]] == ["x", "a__s"]
    _send(agg, {"id": 2, "method": "tools/call", "params": {"name": "y"}})
    assert fakes["b"].sent[-1]["params"] == {"name": "y"}
    _send(agg, {"id": 3, "method": "tools/call", "params": {"name": "s"}})
    assert client.messages[-1]["error"]["code"] == jsonrpc.INVALID_PARAMS


def test_unit_merge_capabilities_and_cursor_roundtrip():
    assert merge_capabilities([{"resources": {"subscribe": False}}, {"resources": {"subscribe": True}, "logging": {}}]) == \
        {"resources": {"subscribe": True}, "logging": {}}
    assert _decode_cursor(_encode_cursor("m", {"any": [1]})) == ("m", {"any": [1]})


@pytest.mark.parametrize("aggregate, key", [
    ({"servers": ["nope"]}, "aggregate.servers[0]"),
    ({"servers": []}, "aggregate.servers"),
    ({"name": "a"}, "aggregate.name"),
    ({"prefix": "sometimes"}, "aggregate.prefix"),
    ({"separator": ""}, "aggregate.separator"),
    ({"extra": 1}, "aggregate.extra"),
])
def test_config_aggregate_errors(aggregate, key):
    """Each wrong aggregate setting names its key."""
    with pytest.raises(ConfigError) as e:
        parse({"mcpServers": {"a": {"command": sys.executable}}, "aggregate": aggregate}, {})
    assert e.value.key == key


def test_config_aggregate_is_a_server():
    """The aggregate is one more entry of ``servers`` (served at /servers/NAME/...), kind "aggregate"."""
    config = parse({"mcpServers": {"a": {"command": sys.executable}, "b": {"command": sys.executable}},
                    "aggregate": {"name": "all", "servers": ["a", "b"], "separator": "."}}, {})
    server = config.servers["all"]
    assert server.kind == "aggregate" and [m.name for m in server.members] == ["a", "b"]
    assert config.default_server.name == "a"


def test_upstreams_provide_the_interface():
    """AggregateUpstream, RemoteUpstream, FilteredUpstream and StdioUpstream provide IUpstream."""
    from zope.interface.verify import verifyClass, verifyObject

    from mcpgw.upstream import FilteredUpstream, IUpstream
    from mcpgw.upstream.remote import RemoteUpstream
    from mcpgw.upstream.stdio import StdioUpstream

    agg, _, _ = _aggregate()
    assert verifyObject(IUpstream, agg)
    for cls in (RemoteUpstream, FilteredUpstream, StdioUpstream):
        assert verifyClass(IUpstream, cls)


def test_filtered_upstream_hides_and_refuses():
    """tools.allow/deny: a tools/list answer loses the hidden tools; a call of one is answered with
    -32602 without reaching the server; other messages pass untouched."""
    from mcpgw.config import ToolFilter
    from mcpgw.upstream import FilteredUpstream

    client = Client()
    filtered = FilteredUpstream(ToolFilter(allow=("a", "b"), deny=("b",)), client)
    inner = FakeMember()
    inner.delegate = filtered
    filtered.inner = inner
    _send(filtered, {"id": 1, "method": "tools/list"})
    inner.reply({"tools": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "nextCursor": "n"})
    assert client.messages[-1]["result"] == {"tools": [{"name": "a"}], "nextCursor": "n"}
    _send(filtered, {"id": 2, "method": "tools/call", "params": {"name": "b"}})
    assert client.messages[-1]["error"]["code"] == jsonrpc.INVALID_PARAMS
    assert inner.sent[-1]["id"] == 1  # b never reached the server
    _send(filtered, {"id": 3, "method": "tools/call", "params": {"name": "a"}})
    assert inner.sent[-1]["params"] == {"name": "a"}
