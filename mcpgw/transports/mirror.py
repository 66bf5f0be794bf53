"""The 2026-07-28 mirror headers: ``Mcp-Name`` and ``Mcp-Param-*`` values, decoded and held to the body.

SEP-2243: a header value may be Base64 in a ``=?base64?...?=`` sentinel (``decode_header_value``);
on ``tools/call`` every argument the tool's ``inputSchema`` annotates with ``x-mcp-header`` comes with
its ``Mcp-Param-{name}`` header (``check_params``). A disagreement is 400/-32020 (``HEADER_MISMATCH``).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from twisted.web.server import Request

from mcpgw.transports.common import HttpError

HEADER_MISMATCH = -32020
_B64 = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


def decode_header_value(value: str | None) -> str | None:
    """A header value with the ``=?base64?...?=`` sentinel decoded; None if it is malformed."""
    if value is None:
        return None
    m = _B64.fullmatch(value)
    if m is None:
        return value if _HEADER_VALUE.fullmatch(value) else None
    try:
        raw = base64.b64decode(m[1].encode("ascii"), validate=True)
        if base64.b64encode(raw).decode("ascii") != m[1]:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


def _same(sent: str, value: Any) -> bool:
    """Whether a decoded Mcp-Param-* value mirrors the argument (2026-07-28 Value Encoding; numbers numerically)."""
    if isinstance(value, bool):
        return sent == ("true" if value else "false")
    if isinstance(value, (int, float)):
        try:
            return float(sent) == value
        except ValueError:
            return False
    return isinstance(value, str) and sent == value


def check_params(request: Request, msg: dict[str, Any], tools: dict[str, Any]) -> None:
    """SEP-2243 Server Behavior for Custom Headers: each argument the tool annotates with ``x-mcp-header``
    comes with its ``Mcp-Param-{name}`` header, equal after decoding; an absent or null argument with no
    header. Anything else: 400/-32020."""
    params = msg["params"]
    annotations = tools.get(params.get("name")) if isinstance(params.get("name"), str) else None
    if not annotations:
        return
    id = msg["id"]
    args = params.get("arguments")
    for path, header, _ in annotations:
        value: Any = args
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        name = f"Mcp-Param-{header}"
        raw = request.requestHeaders.getRawHeaders(name.lower().encode("latin-1"))
        if raw is not None and len(raw) > 1:
            raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name} was sent more than once", id)
        where = ".".join(path)
        if value is None:
            if raw is not None:
                raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name} was sent but arguments.{where} is absent", id)
            continue
        if raw is None:
            raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name} is missing but arguments.{where} has a value", id)
        sent = decode_header_value(raw[0].decode("latin-1"))
        if sent is None or not _same(sent, value):
            raise HttpError(400, HEADER_MISMATCH, f"Header mismatch: {name} header value {raw[0].decode('latin-1')!r} "
                                                  f"does not match body value {value!r} (arguments.{where})", id)
