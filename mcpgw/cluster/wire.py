"""The messages gateway instances publish to each other, and their one codec.

A message is ``<JSON header>\\n<payload>`` on the channel ``PREFIX to:INSTANCE``. The header is a
JSON object whose ``t`` names the message type; its other keys are the fields below (their wire
keys are short: ``s`` session, ``f`` the sender, ``r`` a route id, ...). The payload is raw bytes:
client or server JSON-RPC lines, SSE frames, or a reason.

The bytes are those of every earlier release of the gateway (same type tags, same keys, same key
order), so instances running older and newer code can share one Redis during a rolling upgrade;
``tests/test_cluster_unit.py`` decodes messages as earlier releases wrote them. A header key this
codec does not know is ignored (a newer instance may add one); a missing key, a value of the wrong
type or an unknown type is a ``WireError``, which the subscriber logs and drops.

Optional keys (``_optional``) are written only when they hold a value, so a message without them is
byte for byte what earlier releases wrote, and an earlier release ignores them: ``Post`` carries the
trace context of the forwarding instance's span (``tc``) and the client's address (``ip``) that way,
for the owner's span and audit line (mcpgw.dispatch).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from mcpgw import jsonrpc


class WireError(ValueError):
    """A message this instance cannot read (malformed header, unknown type, bad field)."""


#: ``ack`` statuses: the request was granted, or why not.
ACK_STATUSES = frozenset({"ok", "conflict", "gone", "unknown"})
#: What a trace context carrier (``Post.carrier``) may hold, and how long each value may be (W3C Trace Context).
CARRIER_KEYS = frozenset({"traceparent", "tracestate"})
MAX_CARRIER_VALUE = 512


def _key(key: str, kind: str, optional: bool = False) -> Any:
    """A header field: its wire ``key``, its JSON ``kind`` (str, int, id, status), whether null is allowed."""
    return attrs.field(metadata={"key": key, "kind": kind, "optional": optional})


def _optional(key: str, kind: str) -> Any:
    """A header field written only when it is not None, and None when a message lacks it."""
    return attrs.field(default=None, metadata={"key": key, "kind": kind, "optional": True, "omitted": True})


def _payload() -> Any:
    return attrs.field(default=b"", metadata={"payload": True})


@attrs.frozen
class Message:
    """A message between instances; ``TYPE`` is its ``t``."""

    TYPE: ClassVar[str] = ""


# -- from the instance that received a client's request, to the session's owner ---------------


@attrs.frozen
class Post(Message):
    """Client messages for ``session`` (JSON-RPC lines); requests are answered on route ``route``."""

    TYPE: ClassVar[str] = "post"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int | None = _key("r", "int", optional=True)
    payload: bytes = _payload()
    #: The W3C trace context (``traceparent``, ``tracestate``) of the forwarding instance's span.
    carrier: dict[str, str] | None = _optional("tc", "carrier")
    #: The address of the client that sent the request.
    client_ip: str | None = _optional("ip", "str")
    #: Tools a ``tools/list`` answer leaves out for the client's token (auth.oauth.toolScopes): the answer
    #: goes out on the owner's HTTP+SSE stream, so the owner applies the filter the forwarder decided.
    hidden: list[str] | None = _optional("ht", "names")


@attrs.frozen
class Emit(Message):
    """A message the owner writes on the session's HTTP+SSE stream (what the gateway itself answers)."""

    TYPE: ClassVar[str] = "emit"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int | None = _key("r", "int", optional=True)
    payload: bytes = _payload()


@attrs.frozen
class Delete(Message):
    """The client ended the session; the payload is the reason."""

    TYPE: ClassVar[str] = "del"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int | None = _key("r", "int", optional=True)
    payload: bytes = _payload()


@attrs.frozen
class RouteClosed(Message):
    """The client of POST ``route`` went away: server messages go elsewhere."""

    TYPE: ClassVar[str] = "rc"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int = _key("r", "int")
    payload: bytes = _payload()


@attrs.frozen
class OpenGet(Message):
    """May the sender hold the session's GET stream as ``route``? Answered by an ``Ack``."""

    TYPE: ClassVar[str] = "get"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int = _key("r", "int")


@attrs.frozen
class GetLive(Message):
    """The GET stream held by the sender has a live response (again)."""

    TYPE: ClassVar[str] = "gl"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int = _key("r", "int")
    payload: bytes = _payload()


@attrs.frozen
class GetGone(Message):
    """The GET stream held by the sender lost its response."""

    TYPE: ClassVar[str] = "gx"
    session: str = _key("s", "str")
    sender: str = _key("f", "str")
    route: int = _key("r", "int")
    payload: bytes = _payload()


# -- resuming a stream held by another instance -----------------------------------------------


@attrs.frozen
class Attach(Message):
    """Send the events of stream ``stream`` after ``after``, then the live ones, to ``route``."""

    TYPE: ClassVar[str] = "att"
    session: str = _key("s", "str")
    stream: int = _key("n", "int")
    after: int = _key("after", "int")
    sender: str = _key("f", "str")
    route: int = _key("r", "int")


@attrs.frozen
class LiveGone(Message):
    """The response that resumed a stream as ``route`` is closed."""

    TYPE: ClassVar[str] = "lx"
    sender: str = _key("f", "str")
    route: int = _key("r", "int")


@attrs.frozen
class Write(Message):
    """SSE frames for the resumed stream ``route``."""

    TYPE: ClassVar[str] = "w"
    route: int = _key("r", "int")
    payload: bytes = _payload()


@attrs.frozen
class Finish(Message):
    """The resumed stream ``route`` is over."""

    TYPE: ClassVar[str] = "fin"
    route: int = _key("r", "int")


# -- from the owner, to the instance where a client waits --------------------------------------


@attrs.frozen
class Answer(Message):
    """The response to request ``id`` of POST ``route``."""

    TYPE: ClassVar[str] = "a"
    route: int = _key("r", "int")
    id: Any = _key("id", "id")
    payload: bytes = _payload()


@attrs.frozen
class Deliver(Message):
    """Another message for POST ``route`` (progress, a server request)."""

    TYPE: ClassVar[str] = "d"
    route: int = _key("r", "int")
    payload: bytes = _payload()


@attrs.frozen
class Forget(Message):
    """Request ``id`` of POST ``route`` gets no response."""

    TYPE: ClassVar[str] = "f"
    route: int = _key("r", "int")
    id: Any = _key("id", "id")
    payload: bytes = _payload()


@attrs.frozen
class Unbound(Message):
    """A server message for the GET stream held as ``route``."""

    TYPE: ClassVar[str] = "u"
    route: int = _key("r", "int")
    payload: bytes = _payload()


@attrs.frozen
class Gone(Message):
    """The owner has no such session (any more); ``route`` is the message's route, if any."""

    TYPE: ClassVar[str] = "gone"
    session: str = _key("s", "str")
    route: int | None = _key("r", "int", optional=True)


@attrs.frozen
class Ended(Message):
    """The session ended on its owner; the payload says why."""

    TYPE: ClassVar[str] = "end"
    session: str = _key("s", "str")
    payload: bytes = _payload()


@attrs.frozen
class Ack(Message):
    """The answer to an ``OpenGet`` or ``Attach`` sent as ``route``."""

    TYPE: ClassVar[str] = "ack"
    route: int = _key("r", "int")
    status: str = _key("status", "status")


TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    Post, Emit, Delete, RouteClosed, OpenGet, GetLive, GetGone, Attach, LiveGone, Write, Finish,
    Answer, Deliver, Forget, Unbound, Gone, Ended, Ack,
)}


def encode(message: Message) -> bytes:
    header: dict[str, Any] = {"t": message.TYPE}
    payload = b""
    for field in attrs.fields(type(message)):
        value = getattr(message, field.name)  # each declared attrs field, by its name: the codec's schema
        if field.metadata.get("payload"):
            payload = value
        elif value is not None or not field.metadata.get("omitted"):
            header[field.metadata["key"]] = value
    return jsonrpc.dumps(header) + b"\n" + payload


def decode(data: bytes) -> Message:
    """The message in ``data``; WireError if it is not one this codec reads."""
    head, _, payload = bytes(data).partition(b"\n")
    try:
        header = jsonrpc.loads(head)
    except (jsonrpc.DecodeError, UnicodeDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    t = header.get("t")
    cls = TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise WireError(f"unknown message type {header.get('t')!r}")
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if field.metadata.get("payload"):
            values[field.name] = payload
        else:
            values[field.name] = _field(cls.TYPE, header, field.metadata)
    return cls(**values)


def _field(t: str, header: dict[str, Any], meta: Any) -> Any:
    key, kind = meta["key"], meta["kind"]
    if key not in header and meta.get("omitted"):
        return None
    if key not in header:
        raise WireError(f"{t}: {key!r} is missing")
    value = header[key]
    if value is None and meta["optional"]:
        return None
    if not _fits(value, kind):
        raise WireError(f"{t}: {key!r} is not a valid {kind}: {value!r}")
    return value


def _fits(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "status":
        return value in ACK_STATUSES
    if kind == "names":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "carrier":
        return (isinstance(value, dict) and "traceparent" in value and set(value) <= CARRIER_KEYS
                and all(isinstance(v, str) and len(v) <= MAX_CARRIER_VALUE for v in value.values()))
    # A JSON-RPC request id: a string or a number.
    return isinstance(value, str | int | float) and not isinstance(value, bool)
