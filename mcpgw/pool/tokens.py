"""``requestState`` tokens: what a parked call's retry must bring back (2026-07-28 mrtr)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from typing import Any

from mcpgw.versions import params_of

#: A requestState as the gateway issues it: nonce . expiry (ms since the epoch) . MAC (both base64url).
_STATE = re.compile(r"([A-Za-z0-9_-]{22})\.([0-9]{1,16})\.([A-Za-z0-9_-]{43})")


class StateRejected(Exception):
    """A retry's ``requestState`` the pool does not honour: the client gets -32602 with ``message``.

    ``kind``: ``tampered`` (not a token this gateway issued, or altered), ``foreign`` (issued to another
    identity), ``mismatch`` (issued for another request), ``expired``, ``replayed`` (already used) or
    ``unknown`` (genuine, but the call it names no longer exists).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class StateTokens:
    """``requestState`` tokens: ``nonce.expiry.MAC``, the MAC (HMAC-SHA256 with a key derived from
    ``session.secret``) over the server, the nonce naming the parked call, the expiry, the identity that
    received the token and the request it answers (method and name).

    2026-07-28 basic/utilities/mrtr, Server Requirements (Basic Workflow) 4-5: requestState is attacker
    controlled input; the server protects its integrity, binds it to the authenticated principal, a short
    expiry and the originating request, and enforces single use itself (``ChildPool._spent``).
    """

    def __init__(self, secret: str | None, server: str):
        root = (secret or secrets.token_hex(32)).encode()
        # Domain separation: the same session.secret also tags session ids (mcpgw.session.SessionIds).
        self._key = hmac.new(root, b"mcpgw requestState v1", hashlib.sha256).digest()
        self._server = server

    def issue(self, nonce: str, expires_ms: int, owner: str | None, method: str, name: Any) -> str:
        return f"{nonce}.{expires_ms}.{self.tag(nonce, expires_ms, owner, method, name)}"

    def tag(self, nonce: str, expires_ms: int, owner: str | None, method: str, name: Any) -> str:
        signed = json.dumps([self._server, nonce, expires_ms, owner, method, name if isinstance(name, str) else None],
                            separators=(",", ":")).encode()
        return _b64(hmac.new(self._key, signed, hashlib.sha256).digest())

    @staticmethod
    def parse(token: Any) -> tuple[str, int, str] | None:
        """(nonce, expiry in ms, MAC) of a well-formed token, else None."""
        m = _STATE.fullmatch(token) if isinstance(token, str) else None
        return None if m is None else (m[1], int(m[2]), m[3])


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def request_name(msg: dict[str, Any]) -> Any:
    """The name a requestState is bound to: a tools/call's or prompts/get's ``name``, a resources/read's ``uri``."""
    params = params_of(msg)
    return params.get("uri") if msg.get("method") == "resources/read" else params.get("name")
