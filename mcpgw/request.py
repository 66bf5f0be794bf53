"""What a request read by mcpgw.channel.GatewayChannel carries: its body in memory, and what was
decided on its head (mcpgw.web.GatewaySite.head_received) before its body was read.

A resource that decides on the head (the Guard in front of every transport, the admin API) provides
``IHeadChecked``: the site asks its ``head_guard`` on the request head, so a refused request is
answered without its body being read.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, UnsupportedMethod
from zope.interface import Attribute, Interface, implementer

from mcpgw import jsonrpc
from mcpgw.channel import GatewayChannel
from mcpgw.transports.common import error_reply


class IHeadChecked(Interface):
    """A resource whose requests are checked on their head (``head_guard.check(request)`` returns
    mcpgw.channel.ADMIT, the body of a refusal, or a Deferred of either)."""

    head_guard = Attribute("The object whose check(request) decides on the head.")


@implementer(IHeadChecked)
class HeadChecked(Resource):
    """``inner`` (a Guard, or what wraps one: the metrics' error counter) with the Guard to ask on the head."""

    isLeaf = True

    def __init__(self, inner: Any, guard: Any):
        super().__init__()
        self.inner = inner
        self.head_guard = guard

    def render(self, request: Request) -> Any:
        return self.inner.render(request)


def head_decision(request: Any) -> tuple[bytes | None, Any]:
    """``(refusal body, verdict)`` decided on ``request``'s head; ``(None, None)`` when nothing was (a
    request that did not come through GatewayChannel, or whose path checks nothing on the head)."""
    if isinstance(request, GatewayRequest):
        return request.head_reply, request.guard_verdict
    return None, None


class _MethodNotAllowed:
    """A resource whose UnsupportedMethod is a JSON 405 with ``Allow``: twisted.web answers 501
    for any method besides GET, HEAD and POST (DELETE /health), and the gateway never says 5xx
    about a client's request."""

    def __init__(self, resource: Any):
        self._resource = resource

    def render(self, request: Request) -> Any:
        try:
            return self._resource.render(request)
        except UnsupportedMethod as e:
            if request.method == b"HEAD" and b"GET" in e.allowedMethods:
                raise  # twisted.web answers HEAD with the GET's headers
            allowed: list[bytes] = list(e.allowedMethods)
            request.setHeader(b"allow", b", ".join(allowed))
            body = jsonrpc.dumps({"error": "method not allowed", "allowed": [m.decode() for m in allowed]})
            request.setResponseCode(405)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(body))
            return body


class _Reply(Resource):
    """A refusal decided on the request head (its status and headers are already set)."""

    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self._body = body

    def render(self, request: Request) -> bytes:
        return self._body


class GatewayRequest(Request):
    """A request read by mcpgw.channel.GatewayChannel: its body in memory, and what was decided
    on its head (GatewaySite.head_received)."""

    #: The body of an answer decided before the body was read (401, 403, 429, 413...).
    head_reply: bytes | None = None
    #: The Guard that decided on the head (None: the path has none).
    head_guard: Any = None
    #: Guard.check's verdict from the head: ADMIT, a refusal, or a pending Deferred (None: not asked).
    guard_verdict: Any = None
    #: (resource, prepath, postpath) found on the head, so the tree is walked once per request.
    head_route: Any = None
    #: maxBodyBytes (set by the channel with the head).
    max_body = 16 * 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        # In memory, whatever the length: the channel refuses more than maxBodyBytes.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.head_reply is not None:
            return  # answered without its body; what still arrives is dropped
        # (annotations, not typing.cast: this runs per chunk of every body, and cast is a call)
        content: io.BytesIO = self.content  # type: ignore[assignment]
        content.write(data)
        if content.tell() > self.max_body:
            channel: GatewayChannel = self.channel  # type: ignore[assignment]
            channel.body_too_large(self)  # a chunked body (a declared length is checked on the head)

    def write(self, data: bytes) -> None:
        super().write(data)
        channel: GatewayChannel | None = self.channel  # type: ignore[assignment]
        if channel is not None:
            # The head of a response started without body bytes (an SSE stream's) goes with its first write.
            channel.flush_head()

    def refuse_too_large(self, length: int | None, limit: int) -> None:
        """413 before (Content-Length) or the moment (chunked) the body passes ``maxBodyBytes``."""
        size = f" of {length} bytes" if length is not None else ""
        self.head_reply = error_reply(self, 413, jsonrpc.INVALID_REQUEST,
                                      f"request body{size} exceeds the limit of {limit} bytes")

    def render(self, resrc: Any) -> None:
        if self.head_reply is not None and self.head_guard is None:
            resrc = _Reply(self.head_reply)
        super().render(_MethodNotAllowed(resrc))
        if not self.finished:  # (a finished request has let go of its channel)
            channel: GatewayChannel | None = self.channel  # type: ignore[assignment]
            if channel is not None and channel.transport is None:
                channel.taken_over()  # a WebSocket upgrade took the connection over
