"""twisted.web's HTTP/1.1 channel and a TCP server transport: the private state GatewayChannel
reads to cost less per request, probed against the installed Twisted (26.10) when imported.

Two fast paths, each with its own probe and each taken per connection (``GatewayChannel``
decides when it is built, from :func:`parsing` and :func:`writes_through`):

- request parsing: :func:`line_received` is ``HTTPChannel.lineReceived`` with the obs-fold
  refusal where Twisted joins continuation lines (the public path checks every line first and
  calls Twisted's own method), :func:`all_content_received` is ``HTTPChannel.allContentReceived``
  without the request line it parsed (the channel keeps its own), :func:`body_received` hands a
  body to the transfer decoder without ``HTTPChannel.rawDataReceived``'s frame;
- response writing: :func:`send` writes a response straight to the socket when nothing is queued
  in the transport before it (the public path is ``transport.write`` and a reactor write cycle).

Both paths answer the same bytes: the probes only decide what they cost.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp
from twisted.web import http
from twisted.web.iweb import INonQueuedRequestFactory

try:
    # Bound once: twisted.web.http is a deprecation proxy module, whose every attribute read runs a
    # Python-level lookup method (a visible share of a small request's head parsing).
    from twisted.web.http import _MalformedChunkedDataError, _parseRequestLine
except ImportError:  # the probe below reports it, and the public path serves
    _parseRequestLine = _MalformedChunkedDataError = None  # type: ignore[assignment,misc]

from mcpgw import _fast
from mcpgw._fast.probe import Need, arity, exception_class, missing, sets, uses, uses_only

#: What HTTPChannel.lineReceived and allContentReceived of Twisted 24.3-26.10 read and write: the
#: copies below are theirs, so a Twisted whose methods use other names has changed them.
_LINE_NAMES = frozenset({
    "INonQueuedRequestFactory", "ValueError", "_HTTPChannel__first_line", "_HTTPChannel__header", "_command",
    "_parseRequestLine", "_path", "_receivedHeaderSize", "_respondToBadRequestAndDisconnect", "_version",
    "allContentReceived", "allHeadersReceived", "append", "dataReceived", "headerReceived", "len", "length",
    "lineReceived", "lstrip", "persistent", "providedBy", "requestFactory", "requests", "setRawMode",
    "totalHeadersSize",
})
_CONTENT_NAMES = frozenset({
    "_HTTPChannel__first_line", "_command", "_handlingRequest", "_path", "_receivedHeaderCount",
    "_receivedHeaderSize", "_savedTimeOut", "_transferDecoder", "_version", "length", "requestReceived",
    "requests", "setRawMode", "setTimeout", "timeOut",
})
_DONE_NAMES = frozenset({
    "TypeError", "_dataBuffer", "_handlingRequest", "_networkProducer", "_savedTimeOut", "_waitingForTransport",
    "join", "loseConnection", "persistent", "requests", "resumeProducing", "setLineMode", "setTimeout",
})
#: A TCP transport's send buffers and socket (abstract.FileDescriptor, tcp.Connection): ``send``
#: writes to the socket only while all of them are empty, so nothing it sends can overtake what the
#: transport holds.
_TRANSPORT = ("dataBuffer", "offset", "_writeDisconnected", "connected", "disconnecting", "_tempDataLen", "socket")

#: What the parsing copies read: HTTPChannel's state (class attributes and what its __init__
#: sets), the methods they copy, the request-line parser and the chunked-body error.
_PARSING = (
    *(Need(http, "HTTPChannel", f"HTTPChannel.{name}", sets(name))
      for name in ("_HTTPChannel__first_line", "_HTTPChannel__header", "_receivedHeaderSize", "_receivedHeaderCount",
                   "_savedTimeOut", "_handlingRequest", "_transferDecoder")),
    Need(http, "HTTPChannel.lineReceived", "HTTPChannel.lineReceived of Twisted 24.3-26.10", uses_only(_LINE_NAMES)),
    Need(http, "HTTPChannel.allContentReceived", "HTTPChannel.allContentReceived of Twisted 24.3-26.10",
         uses_only(_CONTENT_NAMES)),
    Need(http, "HTTPChannel.requestDone", "HTTPChannel.requestDone of Twisted 24.3-26.10", uses_only(_DONE_NAMES)),
    Need(http, "HTTPChannel", "HTTPChannel._dataBuffer", sets("_dataBuffer")),
    Need(http, "_parseRequestLine", "twisted.web.http._parseRequestLine(line)", arity(1)),
    Need(http, "_MalformedChunkedDataError", "twisted.web.http._MalformedChunkedDataError", exception_class),
)
#: What ``send`` reads of a ``tcp.Server`` and relies on in FileDescriptor's write path.
_WRITING = (
    *(Need(tcp, "Server", f"tcp.Server.{name}", sets(name)) for name in _TRANSPORT),
    Need(abstract, "FileDescriptor.write", "FileDescriptor.write's _tempDataBuffer",
         uses("_tempDataBuffer", "_tempDataLen", "_writeDisconnected")),
    Need(abstract, "FileDescriptor.doWrite", "FileDescriptor.doWrite's dataBuffer and offset",
         uses("dataBuffer", "offset", "_tempDataBuffer", "_tempDataLen")),
)

#: The probes' results (``probe`` sets them).
_parsing_ok = False
_writing_ok = False


def probe() -> None:
    """Check the installed Twisted for what the fast paths read; one warning line per path that
    falls back to the public API. Run when this module is imported (tests run it again)."""
    global _parsing_ok, _writing_ok
    gone = missing(_PARSING)
    _parsing_ok = not gone
    if gone:
        _fast.probe_failed("Twisted", "HTTP request parsing", ", ".join(gone))
    gone = missing(_WRITING)
    _writing_ok = not gone
    if gone:
        _fast.probe_failed("Twisted", "HTTP response writing", ", ".join(gone))


def parsing() -> bool:
    """Whether a channel built now parses requests with the copies below."""
    return _parsing_ok and _fast.enabled()


def writes_through(transport: Any) -> bool:
    """Whether a channel on ``transport`` (when it connects) may send responses with :func:`send`:
    Twisted's own TCP server transport, whose state the probe checked (not a subclass, TLS or a test's)."""
    return _writing_ok and _fast.enabled() and type(transport) is tcp.Server


# -- request parsing (channel: a GatewayChannel; Any, for HTTPChannel's private state) ----------


def line_received(channel: Any, line: bytes) -> None:
    """HTTPChannel.lineReceived of Twisted 24.3-26.10, except that a continuation line (obs-fold,
    RFC 9112 section 5.2) is 400 and close, and that the request line goes to
    ``channel.request_line``. The check sits where Twisted joins continuation lines, so the other
    lines pay nothing for it."""
    channel._receivedHeaderSize += len(line)
    if channel._receivedHeaderSize > channel.totalHeadersSize:
        channel.bad_request()
        return
    if channel._HTTPChannel__first_line:
        if not channel.persistent:
            channel.dataReceived = channel.lineReceived = lambda *args: None
            return
        if not line and channel._HTTPChannel__first_line == 1:
            channel._HTTPChannel__first_line = 2  # one empty line before a request is tolerated
            return
        if INonQueuedRequestFactory.providedBy(channel.requestFactory):
            request = channel.requestFactory(channel)
        else:
            request = channel.requestFactory(channel, len(channel.requests))
        channel.requests.append(request)
        channel._HTTPChannel__first_line = 0
        try:
            channel.request_line = _parseRequestLine(line)
        except ValueError:
            channel.bad_request()
    elif line == b"":
        header = channel._HTTPChannel__header
        if header and not channel.headerReceived(header):
            return  # answered 400
        channel._HTTPChannel__header = b""
        channel.allHeadersReceived()
        if channel.length == 0:
            channel.allContentReceived()
        else:
            channel.setRawMode()
    elif line[0] in b" \t":
        channel.bad_request()
    else:
        header = channel._HTTPChannel__header
        if header:
            channel.headerReceived(header)
        channel._HTTPChannel__header = line


def all_content_received(channel: Any) -> None:
    """HTTPChannel.allContentReceived of Twisted 24.3-26.10, with the request line from
    ``channel.request_line``."""
    command, path, version = channel.request_line
    channel.length = 0
    channel._receivedHeaderCount = 0
    channel._receivedHeaderSize = 0
    channel._HTTPChannel__first_line = 1
    channel._transferDecoder = None
    if channel.timeOut:
        channel._savedTimeOut = channel.setTimeout(None)  # no idle timeout while the answer is made
    channel._handlingRequest = True
    channel.setRawMode()  # later requests' bytes are buffered until requestDone
    channel.requests[-1].requestReceived(command, path, version)


def request_done(channel: Any) -> bytes | None:
    """HTTPChannel.requestDone of Twisted 24.3-26.10 for ``channel.requests[0]``, less what the gateway's
    channel does itself: the transport is not resumed (its read gate pauses and resumes it) and the
    buffered input is returned (None: the connection closes), not parsed. A request's end thus costs
    no producer round trip through the reactor."""
    del channel.requests[0]
    if not channel.persistent:
        channel.loseConnection()
        return None
    channel._handlingRequest = False
    if channel._savedTimeOut:
        channel.setTimeout(channel._savedTimeOut)
    buffered = channel._dataBuffer
    if not buffered:
        return b""
    channel._dataBuffer = []
    return b"".join(buffered)


def body_received(channel: Any, data: bytes) -> None:
    """The body branch of HTTPChannel.rawDataReceived: ``data`` to the transfer decoder."""
    try:
        channel._transferDecoder.dataReceived(data)
    except _MalformedChunkedDataError:
        channel.bad_request()


# -- response writing --------------------------------------------------------------------------


def send(transport: Any, data: bytes) -> bytes:
    """Write ``data`` to ``transport``'s socket now if nothing is queued before it; return what
    is left for ``transport.write`` (all of it when the transport holds bytes already)."""
    if transport._tempDataLen or transport.offset != len(transport.dataBuffer) or not transport.connected \
            or transport.disconnecting or transport._writeDisconnected:
        return data
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN, or an error the transport's own write path meets and reports
        return data
    return data[sent:]


probe()
