"""What an aggregate knows of its members, and how their answers merge into one: the list tables,
the members' capabilities merged, and list cursors that name the member a page came from."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any, Protocol

from zope.interface import implementer

from mcpgw.config import ServerConfig
from mcpgw.interfaces import IUpstreamDelegate

#: list method -> (result key, capability, name field)
LISTS = {
    "tools/list": ("tools", "tools", "name"),
    "prompts/list": ("prompts", "prompts", "name"),
    "resources/list": ("resources", "resources", "name"),
    "resources/templates/list": ("resourceTemplates", "resources", "name"),
}
#: notifications/X/list_changed -> the lists it makes stale
CHANGED = {
    "notifications/tools/list_changed": ("tools/list",),
    "notifications/prompts/list_changed": ("prompts/list",),
    "notifications/resources/list_changed": ("resources/list", "resources/templates/list"),
}
#: A request by name -> the list that names it; the requests by resource URI.
LIST_OF = {"tools/call": "tools/list", "prompts/get": "prompts/list"}
URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
Callback = Callable[[dict[str, Any]], None]


def _template_regex(template: str) -> re.Pattern[str]:
    """RFC 6570 template -> a regex matching its expansions (each expression: one or more characters)."""
    parts = re.split(r"(\{[^}]*\})", template)
    return re.compile("".join("(.+?)" if p.startswith("{") else re.escape(p) for p in parts) + r"\Z")


class _Member:
    def __init__(self, config: ServerConfig, position: int):
        self.config = config
        self.name = config.name
        self.position = position
        self.upstream: Any = None
        self.down: str | None = None
        self.ready = False  # answered initialize
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None
        self.version: str | None = None
        #: list method -> names this member offers (None: not crawled since the last change)
        self.names: dict[str, set[str] | None] = {m: None for m in LISTS}
        self.uris: set[str] = set()
        self.templates: list[tuple[str, re.Pattern[str]]] = []

    def offers(self, method: str) -> bool:
        return self.down is None and self.ready and LISTS[method][1] in self.capabilities


class _Call:
    def __init__(self, member: _Member, callback: Callback, client_id: Any = None):
        self.member = member
        self.callback = callback
        self.client_id = client_id
        self.timer: Any = None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _params(msg: dict[str, Any]) -> dict[str, Any]:
    return _dict(msg.get("params"))


def merge_capabilities(all_caps: list[dict[str, Any]]) -> dict[str, Any]:
    """The union of the members' server capabilities (a flag is on if any member has it)."""
    merged: dict[str, Any] = {}
    for caps in all_caps:
        for name, value in caps.items():
            if not isinstance(value, dict):
                continue
            into = merged.setdefault(name, {})
            for flag, on in value.items():
                if isinstance(on, bool):
                    into[flag] = into.get(flag, False) or on
                elif flag not in into:
                    into[flag] = on
    return merged


def _encode_cursor(member: str, cursor: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([member, cursor], separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: Any) -> tuple[str, Any] | None:
    if not isinstance(cursor, str) or len(cursor) > 4096:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        return None
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return value[0], value[1]
    return None


class MemberEvents(Protocol):
    """What a member's delegate reports to: the AggregateUpstream."""

    def _from_member(self, member: _Member, raw: bytes, msg: dict[str, Any]) -> None: ...

    def _member_down(self, member: _Member, reason: str) -> None: ...


@implementer(IUpstreamDelegate)
class _MemberDelegate:
    """What one member's upstream reports to: the aggregate, told which member speaks."""

    routes_on_view = False

    def __init__(self, aggregate: MemberEvents, member: _Member):
        self._aggregate = aggregate
        self._member = member

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        self._aggregate._from_member(self._member, raw, msg)

    def upstreamProtocolError(self, reason: str) -> None:
        self._aggregate._member_down(self._member, reason)
        self._member.upstream.stop()

    def upstreamEnded(self, reason: str) -> None:
        self._aggregate._member_down(self._member, f"MCP server {reason}")
