"""The gateway's HTTP exchanges with authorization servers: an injected client (treq in production, a fake
in unit tests), each exchange bounded in time and size.

An authorization server is trusted for what it says, not for how much or how slowly: a body over
``MAX_BODY`` or an exchange over the timeout fails (``HttpError``), and the connection is dropped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import attrs
import treq.client
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as _Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers

#: The largest body read from an authorization server (metadata, JWKS, introspection answers are small).
MAX_BODY = 1024 * 1024


@attrs.frozen
class HttpResponse:
    code: int
    body: bytes = attrs.field(repr=False)


class HttpError(Exception):
    """An exchange with an authorization server failed: unreachable, slow, too big, not 200, not JSON."""


class HttpClient(Protocol):
    """What mcpgw.oauth needs of HTTP: GET and a form POST, each answering the whole (bounded) body."""

    def get(self, url: str) -> Deferred[HttpResponse]: ...

    def post_form(self, url: str, form: Mapping[str, str], headers: Mapping[str, str]) -> Deferred[HttpResponse]: ...


def basic_auth(client_id: str, secret: str) -> str:
    """``Authorization: Basic`` of a client: id and secret form-urlencoded first (RFC 6749 section 2.3.1)."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def fetch_json(http: HttpClient, clock: IReactorTime, timeout: float, url: str,
               form: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> Deferred[Any]:
    """GET ``url`` (or POST ``form`` to it): its JSON object, or HttpError; cancelled after ``timeout`` s."""
    d = http.get(url) if form is None else http.post_form(url, form, headers or {})
    d.addTimeout(timeout, clock)

    def parsed(response: HttpResponse) -> Any:
        if response.code != 200:
            raise HttpError(f"{url} answered HTTP {response.code}")
        try:
            doc = json.loads(response.body)
        except ValueError:
            raise HttpError(f"{url} did not answer JSON") from None
        if not isinstance(doc, dict):
            raise HttpError(f"{url} did not answer a JSON object")
        return doc

    def failed(failure: Failure) -> Failure:
        if failure.check(HttpError):
            return failure
        if failure.check(TimeoutError):
            return Failure(HttpError(f"{url} did not answer within {timeout:g} s"))
        return Failure(HttpError(f"{url}: {failure.getErrorMessage() or type(failure.value).__name__}"))

    return d.addCallbacks(parsed, failed)


class TreqHttp:
    """HttpClient on treq, with a persistent connection pool; bodies over ``max_body`` fail."""

    def __init__(self, reactor: Any, max_body: int = MAX_BODY):
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._client = treq.client.HTTPClient(Agent(reactor, pool=self._pool))
        self._max = max_body

    def close(self) -> Deferred[None]:
        """Close the idle connections (at shutdown)."""
        return self._pool.closeCachedConnections()

    def get(self, url: str) -> Deferred[HttpResponse]:
        d = self._client.get(url, headers=Headers({b"accept": [b"application/json"]}))
        return d.addCallback(self._read)

    def post_form(self, url: str, form: Mapping[str, str], headers: Mapping[str, str]) -> Deferred[HttpResponse]:
        raw = {b"accept": [b"application/json"], b"content-type": [b"application/x-www-form-urlencoded"]}
        raw.update({k.lower().encode("latin-1"): [v.encode("latin-1")] for k, v in headers.items()})
        body = urlencode(dict(form)).encode("ascii")
        d = self._client.post(url, data=body, headers=Headers(raw))

        def again(failure: Failure) -> Deferred[Any]:
            # A pooled connection the server had closed (it restarted, or timed it out): twisted.web
            # retries only idempotent requests by itself. The forms sent here (introspection) are reads.
            failure.trap(ResponseNeverReceived)
            return self._client.post(url, data=body, headers=Headers(raw))

        return d.addErrback(again).addCallback(self._read)

    def _read(self, response: Any) -> Deferred[HttpResponse]:
        reader = _BodyReader(self._max)
        response.deliverBody(reader)
        return reader.done.addCallback(lambda body: HttpResponse(response.code, body))


class _BodyReader(_Protocol):
    """A response body up to ``limit`` bytes; cancelling (the timeout) or going over drops the connection."""

    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._stopped = False
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._abort()
            self.done.errback(HttpError(f"the answer is over {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008 - Twisted's signature
        if self._stopped:
            return  # done has fired (over the limit) or is being cancelled
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _abort(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # the body's transport is an IPushProducer
