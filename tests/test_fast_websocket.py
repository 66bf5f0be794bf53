"""mcpgw._fast.websocket: the probe of Autobahn's and Twisted's private names, and the switch.

A probed name taken away from Autobahn (as a later version might) makes the probe fail with one
warning line, and the connections built from then on take Autobahn's public path: a client still
gets its ``{"type":"pong"}`` and its JSON-RPC answers. ``_fast.configure`` (the config's
``fastPaths``) and ``MCPGW_FAST_PATHS=0`` decide for each connection when its protocol is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract
from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from mcpgw import _fast
from mcpgw._fast import websocket as fast_websocket
from mcpgw.config import GatewayConfig
from mcpgw.session import SessionManager
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import Heartbeat
from mcpgw.transports.websocket import McpWebSocketFactory, McpWebSocketProtocol
from tests.fake_process import FakeProcessReactor
from tests.test_websocket_unit import (
    SERVER,
    TEXT,
    TcpLikeTransport,
    WebSocketTestCase,
    client_frame,
    handshake,
    server_frames,
)

REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}'


class Gateway:
    """A gateway context on fake time with fake children (as WebSocketTestCase's), for pytest."""

    def __init__(self) -> None:
        self.reactor = FakeProcessReactor()
        config = GatewayConfig(servers={"fx": SERVER}, host="127.0.0.1", websocket=WebSocketTestCase.websocket)
        ctx = GatewayContext(config=config, sessions=SessionManager(config, self.reactor),
                             heartbeat=Heartbeat(15, self.reactor), reactor=self.reactor)
        self.factory = McpWebSocketFactory(ctx, SERVER)

    def open(self) -> tuple[McpWebSocketProtocol, TcpLikeTransport]:
        """A client connection past its upgrade."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = TcpLikeTransport()
        proto.makeConnection(transport)
        proto.dataReceived(handshake(["mcp"]))
        assert transport.value().startswith(b"HTTP/1.1 101"), transport.value()
        transport.clear()
        return proto, transport


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give back the switch as the test found it: restored with whatever else the test patched
    (configure(was) at teardown would read a MCPGW_FAST_PATHS=0 the test set and not yet undone)."""
    monkeypatch.setattr(_fast, "_enabled", _fast.enabled())


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The warning lines of mcpgw.fast while the test runs."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mcpgw.fast" and event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def reprobe(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A monkeypatch after which the probe runs again on the installed libraries as they are."""
    yield monkeypatch
    monkeypatch.undo()
    assert fast_websocket.probe()


def ping_and_request(gw: Gateway, proto: McpWebSocketProtocol, transport: TcpLikeTransport) -> None:
    """A client's ``{"type":"ping"}`` gets its pong, its request reaches the child, and the child's
    answer comes back as one text frame."""
    child = gw.reactor.spawned[-1]
    proto.dataReceived(client_frame(TEXT, b'{"type":"ping"}') + client_frame(TEXT, REQUEST))
    assert server_frames(transport.value()) == [(TEXT, b'{"type":"pong"}')]
    transport.clear()
    assert child.written == [REQUEST + b"\n"]
    child.proto.outReceived(ANSWER + b"\n")
    assert server_frames(transport.value()) == [(TEXT, ANSWER)]
    transport.clear()


def test_the_installed_versions_pass_the_probe() -> None:
    """Autobahn 26.11 and Twisted 26.10 have every name the fast paths read."""
    assert fast_websocket._frames_missing() is None
    assert fast_websocket._direct_missing() is None
    assert fast_websocket._timers_missing() is None


def parser_renamed(monkeypatch: pytest.MonkeyPatch) -> str:
    """Autobahn's parser no longer keeps its state in ``current_frame`` (as a later version might):
    the same parser behind a function whose code names none of it."""
    original = WebSocketProtocol.processData
    monkeypatch.setattr(WebSocketProtocol, "processData", lambda self: original(self))
    return "WebSocketProtocol.processData using data"


def cancel_gone(monkeypatch: pytest.MonkeyPatch) -> str:
    """A private method FastFrames calls is gone (Autobahn's own path calls it only while a
    keepalive ping waits for its pong)."""
    monkeypatch.delattr(WebSocketProtocol, "_cancelAutoPingTimeoutCall")
    return "WebSocketProtocol._cancelAutoPingTimeoutCall(self)"


@pytest.mark.fast_paths
@pytest.mark.parametrize("take_away", [cancel_gone, parser_renamed])
def test_a_probed_name_gone_turns_the_fast_path_off_with_one_warning(
        reprobe: pytest.MonkeyPatch, warnings: list[str], switch: None, take_away: Any) -> None:
    _fast.configure(True)
    assert _fast.enabled(), "MCPGW_FAST_PATHS=0: tests/conftest.py deselects this test then"
    gw = Gateway()
    before, before_transport = gw.open()
    assert before._fast is not None
    missing = take_away(reprobe)
    assert not fast_websocket.probe()
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    assert missing in warnings[0] and "Autobahn's public API" in warnings[0], warnings[0]
    assert not fast_websocket.frames_usable
    assert fast_websocket.timers_usable and fast_websocket.direct_usable  # each shortcut on its own
    proto, transport = gw.open()
    assert proto._fast is None  # Autobahn's public path from this connection on
    ping_and_request(gw, proto, transport)
    assert len(warnings) == 1


@pytest.mark.fast_paths
def test_twisteds_buffer_gone_keeps_autobahns_frames_fast(reprobe: pytest.MonkeyPatch, warnings: list[str], switch: None) -> None:
    _fast.configure(True)
    assert _fast.enabled(), "MCPGW_FAST_PATHS=0: tests/conftest.py deselects this test then"
    reprobe.setattr(abstract.FileDescriptor, "write", lambda self, data: None)
    assert not fast_websocket.probe()
    assert len(warnings) == 1 and "Twisted's public API" in warnings[0]
    assert fast_websocket.frames_usable and not fast_websocket.direct_usable


def test_the_timer_slot_gone_leaves_autobahns_timers(reprobe: pytest.MonkeyPatch, warnings: list[str]) -> None:
    reprobe.setattr(fast_websocket, "_timers_missing", lambda: "WebSocketServerFactory._batched_timer")
    assert not fast_websocket.probe()
    assert len(warnings) == 1 and "_batched_timer" in warnings[0]
    factory = Gateway().factory
    assert not isinstance(factory._batched_timer, fast_websocket.ReactorTimer)  # txaio's, on the global reactor


@pytest.mark.fast_paths
def test_configure_decides_each_connection_when_it_is_built(switch: None) -> None:
    _fast.configure(False)
    gw = Gateway()
    off, off_transport = gw.open()
    assert off._fast is None
    ping_and_request(gw, off, off_transport)
    _fast.configure(True)
    assert _fast.enabled(), "MCPGW_FAST_PATHS=0: tests/conftest.py deselects this test then"
    on, on_transport = gw.open()
    assert on._fast is not None and off._fast is None
    ping_and_request(gw, on, on_transport)


def test_the_environment_wins_over_the_config(monkeypatch: pytest.MonkeyPatch, switch: None) -> None:
    monkeypatch.setenv("MCPGW_FAST_PATHS", "0")
    _fast.configure(True)
    assert not fast_websocket.usable()
    gw = Gateway()
    proto, transport = gw.open()
    assert proto._fast is None
    ping_and_request(gw, proto, transport)
