"""mcpgw.responding.gone: a request is gone once finished or once its connection is lost, read
through Twisted's public attributes only (issue 17: no ``request._disconnected``)."""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from mcpgw.responding import gone


def _request() -> Request:
    request = Request(DummyChannel())
    request.notifyFinish().addErrback(lambda _: None)  # connectionLost errbacks it
    return request


def test_a_live_request_is_not_gone():
    assert not gone(_request())


def test_a_lost_connection_makes_the_request_gone():
    request = _request()
    request.connectionLost(Failure(ConnectionLost()))
    assert gone(request)


def test_a_finished_request_is_gone():
    request = _request()
    request.finish()
    assert gone(request)


def test_a_test_double_without_a_channel_is_gone_only_when_finished():
    request = DummyRequest([b""])
    assert not gone(request)
    request.finish()
    assert gone(request)
