"""Whether a ``twisted.web`` request can still be answered, by its public attributes only."""

from __future__ import annotations

from typing import Any

from twisted.web.http import Request


def gone(request: Any) -> bool:
    """True once the response is finished or the client's connection is lost.

    ``Request.connectionLost`` is the one place Twisted sets ``channel`` to None, so a request
    whose channel is None has lost its connection: no write or finish can reach the client.
    Other request objects (test doubles such as ``DummyRequest``) have no channel: only
    ``finished`` applies to them.
    """
    if request.finished:
        return True
    return isinstance(request, Request) and request.channel is None
