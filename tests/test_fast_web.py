"""mcpgw._fast.web (issue 17): a Twisted without what the fast paths read gets the public paths,
with one warning line, and answers the same; with ``fastPaths`` off the channel behaves as with
them on (tests/test_channel_unit.py's channel tests run again here, on the public paths)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import abstract
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource

from mcpgw import _fast
from mcpgw._fast import web as fast_web
from mcpgw.channel import ChannelLimits, Connections, GatewayChannel
from mcpgw.web import GatewaySite
from tests import test_channel_unit as unit

# -- a failed probe --------------------------------------------------------------------------


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The warning lines mcpgw._fast writes; the probe runs again on the real Twisted afterwards."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(_fast, "_log", Logger(observer=events.append, namespace="mcpgw.fast"))
    monkeypatch.setattr(_fast, "_enabled", True)
    yield events
    monkeypatch.undo()
    fast_web.probe()


def _site() -> tuple[GatewaySite, Clock]:
    clock = Clock()
    root = Resource()
    root.putChild(b"open", unit.Reply())
    site = GatewaySite(root, reactor=clock)
    site.limits = ChannelLimits(max_body_bytes=1000)
    site.connections = Connections(clock, nofile=100000)
    return site, clock


def _connect(site: GatewaySite) -> tuple[GatewayChannel, StringTransport]:
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def test_probe_passes_on_the_installed_twisted(warnings: list[dict[str, Any]]) -> None:
    fast_web.probe()
    assert warnings == []
    assert fast_web.parsing()


def test_parser_state_gone_public_parsing_answers_the_same(
        warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPChannel without its ``_savedTimeOut`` class attribute: one warning line, channels built
    from now on parse with Twisted's own methods, and answer as before (pipelining included)."""
    monkeypatch.delattr(http.HTTPChannel, "_savedTimeOut")
    fast_web.probe()
    assert len(warnings) == 1
    assert warnings[0]["what"] == "HTTP request parsing"
    assert "HTTPChannel._savedTimeOut" in warnings[0]["missing"]
    assert not fast_web.parsing()
    site, _ = _site()
    channel, transport = _connect(site)
    assert not channel._fast_parse
    channel.dataReceived(unit.head("POST", "/open", b"{}") + unit.head("GET", "/open"))
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.count(b"HTTP/1.1 200 OK\r\n") == 2, out
    assert b"ok:2" in out and out.endswith(b"ok:0")
    assert not transport.disconnecting
    channel.dataReceived(b"GET /open HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n")  # obs-fold
    assert transport.value()[len(out):] == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    assert transport.disconnecting


def test_transport_write_path_changed_public_writing(
        warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A FileDescriptor.write that no longer keeps ``_tempDataBuffer`` (here: a wrapper of the real
    one): one warning line, and a response over a real socket goes through ``transport.write``."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactorClock

    original = abstract.FileDescriptor.write
    monkeypatch.setattr(abstract.FileDescriptor, "write", lambda self, data: original(self, data))
    fast_web.probe()
    assert len(warnings) == 1
    assert warnings[0]["what"] == "HTTP response writing"
    reactor = MemoryReactorClock()
    root = Resource()
    root.putChild(b"small", unit.Reply(b'{"ok":true}', content_type=b"application/json"))
    site = GatewaySite(root, reactor=reactor)
    site.connections = Connections(reactor, nofile=100000)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    peer.settimeout(5)
    try:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = tcp.Server(ours, channel, ("127.0.0.1", 40000), None, 1, reactor)
        channel.makeConnection(transport)
        assert not channel._through
        channel.dataReceived(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport in reactor.getWriters()  # queued in the transport, not sent at once
        transport.doWrite()
        data = peer.recv(1 << 16)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b'{"ok":true}')
        transport.loseConnection()
    finally:
        peer.close()
        ours.close()


def test_configure_before_the_site_is_built_takes_effect(
        warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch is read per connection, when the channel is built."""
    monkeypatch.delenv("MCPGW_FAST_PATHS", raising=False)  # (which would keep them off whatever the config says)
    site, _ = _site()
    _fast.configure(False)
    off, _ = _connect(site)
    _fast.configure(True)
    on, _ = _connect(site)
    assert not off._fast_parse and on._fast_parse


# -- the channel's behaviours on the public paths ---------------------------------------------


class PublicHeadDeadlineTests(unit.HeadDeadlineTests):
    fast = False


class PublicBodyTests(unit.BodyTests):
    fast = False


class PublicPipeliningTests(unit.PipeliningTests):
    fast = False
