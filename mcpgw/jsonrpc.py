"""JSON-RPC 2.0 as the gateway needs it: parse once, classify, build errors.

The gateway relays messages raw; it only looks at ``id``, ``method`` and a
few params to route them, so nothing here models individual MCP methods.
"""

from __future__ import annotations

import re
from typing import Any

try:  # orjson is ~5 us faster per small message and much faster per MiB
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        return orjson.loads(data)

    DecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a dependency
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        if not isinstance(data, str):
            data = bytes(data).decode("utf-8")
        return json.loads(data)

    DecodeError = ValueError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: Implementation-defined server errors (-32000..-32099).
CONNECTION_CLOSED = -32000
SESSION_NOT_FOUND = -32001
#: The MCP SDKs' RequestTimeout (the same number as their "Session not found", on a 404 instead).
REQUEST_TIMEOUT = -32001
REQUEST_CANCELLED = -32800
UNSUPPORTED_PROTOCOL_VERSION = -32022

REQUEST = "request"
NOTIFICATION = "notification"
RESPONSE = "response"


class MessageError(ValueError):
    """A client body that is not acceptable JSON-RPC; carries the error code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def error_bytes(id: Any, code: int, message: str, data: Any = None) -> bytes:
    return dumps(error(id, code, message, data))


def _valid_id(value: Any) -> bool:
    return (isinstance(value, (str, int)) and not isinstance(value, bool)) or value is None


def classify(msg: Any) -> str:
    """Return REQUEST, NOTIFICATION or RESPONSE, or raise MessageError."""
    if not isinstance(msg, dict):
        raise MessageError(INVALID_REQUEST, "a JSON-RPC message must be an object")
    if msg.get("jsonrpc") != "2.0":
        raise MessageError(INVALID_REQUEST, 'a JSON-RPC message needs "jsonrpc": "2.0"')
    if "method" in msg:
        if not isinstance(msg["method"], str):
            raise MessageError(INVALID_REQUEST, '"method" must be a string')
        params = msg.get("params")
        if params is not None and not isinstance(params, (dict, list)):
            raise MessageError(INVALID_REQUEST, '"params" must be an object or an array')
        if "id" not in msg:
            return NOTIFICATION
        if msg["id"] is None or not _valid_id(msg["id"]):
            raise MessageError(INVALID_REQUEST, '"id" must be a string or an integer')
        return REQUEST
    if "result" in msg or "error" in msg:
        if "id" not in msg or not _valid_id(msg["id"]):
            raise MessageError(INVALID_REQUEST, 'a response needs a string or integer "id"')
        return RESPONSE
    raise MessageError(INVALID_REQUEST, 'a JSON-RPC message needs "method", "result" or "error"')


def parse_body(body: bytes) -> Any:
    """Decode a client body (object or array); MessageError(PARSE_ERROR) if it is not JSON."""
    try:
        return loads(body)
    except (DecodeError, UnicodeDecodeError, ValueError) as e:
        raise MessageError(PARSE_ERROR, f"Parse error: {e}") from None


def as_message(raw: bytes, msg: Any = None) -> Any:
    """``msg`` when the caller has decoded ``raw`` already (an upstream's ``send``), else ``raw``
    decoded; None when it is not JSON."""
    if msg is not None:
        return msg
    try:
        return loads(raw)
    except (DecodeError, UnicodeDecodeError, ValueError):
        return None


def progress_token(msg: dict[str, Any]) -> Any:
    """The progress token a request carries in ``params._meta``, if any."""
    params = msg.get("params")
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            return meta.get("progressToken")
    return None


# -- routing a large message without decoding its payload -------------------------------------

#: A child's line at least this long is routed on ``route_view`` (its top-level members, the
#: large values left as bytes) instead of a full decode.
LARGE_MESSAGE = 64 * 1024
#: A member value at least this long is left ``Undecoded`` by ``route_view``.
SMALL_VALUE = 4096
#: Quotes inside strings and string delimiters ``route_view`` steps over before it hands the line
#: to a full decode instead (a payload of JSON-in-a-string is all escaped quotes).
SCAN_STEPS = 512

_WS = frozenset(b" \t\r\n")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")


class Undecoded:
    """A member value ``route_view`` left as the bytes it was sent as; ``value()`` decodes it."""

    __slots__ = ("raw",)

    def __init__(self, raw: memoryview):
        self.raw = raw

    def value(self) -> Any:
        return loads(self.raw)

    def __repr__(self) -> str:
        return f"<Undecoded {len(self.raw)} bytes>"


def decoded(value: Any) -> Any:
    """A member of a ``route_view`` message as ``loads`` would have given it."""
    return value.value() if isinstance(value, Undecoded) else value


class _FullDecode(Exception):
    """The scan would cost more than it saves (or the line is not an object): decode it all."""


def route_view(line: bytes) -> Any:
    """The message in ``line`` for routing: a dict of its top-level members in which values of
    SMALL_VALUE bytes or more are ``Undecoded`` (a 1 MiB argument or result is stepped over with
    a few ``bytes.find`` calls, not turned into a 1 MiB ``str`` only to be dropped).

    Raises ValueError for a line that is not a JSON object or not UTF-8: the members, their names and
    separators, every small value (fully decoded) and the nesting and string ends of the large
    ones are checked; what is inside a large value is not (it is relayed as sent). A line the
    scan cannot take cheaply (not an object, a payload dense with escaped quotes) gets ``loads``.
    """
    if not line.isascii():
        line.decode("utf-8")  # what is relayed must be UTF-8 (a WebSocket text frame, an SSE event): UnicodeDecodeError is a ValueError
    try:
        return _scan(line)
    except _FullDecode:
        return loads(line)


def _skip_ws(b: bytes, i: int) -> int:
    n = len(b)
    while i < n and b[i] in _WS:
        i += 1
    return i


def _string_end(b: bytes, i: int, budget: int) -> tuple[int, int]:
    """``b[i]`` opens a string: the index after its closing quote, and the budget left."""
    j = i + 1
    while True:
        q = b.find(b'"', j)
        if q < 0:
            raise ValueError("unterminated string")
        k = q - 1
        while b[k] == 0x5C:  # the backslashes before it (the opening quote stops the walk)
            k -= 1
            budget -= 1
        if (q - 1 - k) & 1 == 0:
            return q + 1, budget
        budget -= 1
        if budget <= 0:
            raise _FullDecode
        j = q + 1


def _value_end(b: bytes, i: int, budget: int) -> tuple[int, int]:
    """The index after the value that starts at ``b[i]``, and the budget left."""
    c = b[i]
    if c == 0x22:
        return _string_end(b, i, budget)
    if c != 0x7B and c != 0x5B:
        m = _SCALAR.match(b, i)
        if m is None:
            raise ValueError(f"unexpected byte at {i}")
        return m.end(), budget
    depth = 0
    j = i
    n = len(b)
    while True:
        q = b.find(b'"', j)
        stop = q if q >= 0 else n
        if stop - j > 64:  # a long stretch outside strings (numbers): count, do not walk
            opens = b.count(b"{", j, stop) + b.count(b"[", j, stop)
            closes = b.count(b"}", j, stop) + b.count(b"]", j, stop)
            if depth + opens - closes <= 0:
                raise _FullDecode
            depth += opens - closes
        else:
            for k in range(j, stop):
                ch = b[k]
                if ch == 0x7B or ch == 0x5B:
                    depth += 1
                elif ch == 0x7D or ch == 0x5D:
                    depth -= 1
                    if depth == 0:
                        return k + 1, budget
        if q < 0:
            raise ValueError("unterminated value")
        j, budget = _string_end(b, q, budget - 1)
        if budget <= 0:
            raise _FullDecode


def _scan(b: bytes) -> dict[str, Any]:
    n = len(b)
    i = _skip_ws(b, 0)
    if i >= n or b[i] != 0x7B:
        raise _FullDecode
    budget = SCAN_STEPS
    out: dict[str, Any] = {}
    i = _skip_ws(b, i + 1)
    if i < n and b[i] == 0x7D:
        i += 1
    else:
        while True:
            if i >= n or b[i] != 0x22:
                raise ValueError(f"expected a member name at {i}")
            end, budget = _string_end(b, i, budget)
            key = loads(b[i:end])
            i = _skip_ws(b, end)
            if i >= n or b[i] != 0x3A:
                raise ValueError(f"expected ':' at {i}")
            i = _skip_ws(b, i + 1)
            if i >= n:
                raise ValueError("truncated object")
            end, budget = _value_end(b, i, budget)
            out[key] = loads(b[i:end]) if end - i < SMALL_VALUE else Undecoded(memoryview(b)[i:end])
            i = _skip_ws(b, end)
            if i < n and b[i] == 0x2C:
                i = _skip_ws(b, i + 1)
                continue
            if i < n and b[i] == 0x7D:
                i += 1
                break
            raise ValueError(f"expected ',' or '}}' at {i}")
    if _skip_ws(b, i) != n:
        raise ValueError("data after the object")
    return out
