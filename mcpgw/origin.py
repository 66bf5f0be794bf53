"""Which ``Host`` and ``Origin`` headers an MCP endpoint accepts: DNS rebinding and cross-site use.

MCP basic/transports (2025-06-18 and 2025-11-25, Streamable HTTP, "Security Warning"): servers
MUST validate the ``Origin`` header on all incoming connections to prevent DNS rebinding attacks
(403 when it is present and invalid), and SHOULD bind only to localhost when running locally.

A DNS-rebinding page gets the browser to send its requests to the gateway under the attacker's
host name: the ``Host`` header carries that name and ``Origin`` (when sent) matches it, so the
request looks same-origin. What defends against it is a ``Host`` the gateway knows to be its own.
The policy is decided once, at startup, from the interfaces the gateway actually listens on
(every listen endpoint, ``--listen`` included) plus ``allowedHosts``:

- every endpoint on loopback (or a Unix socket): ``Host`` must be a loopback name (``localhost``,
  127.0.0.0/8, ``::1``) or in ``allowedHosts``, else 403;
- a non-loopback bind with ``allowedHosts``: ``Host`` must be listed, the bind address, or a
  loopback name when the bind covers loopback (``0.0.0.0``, ``::``);
- a non-loopback bind without ``allowedHosts``: ``Host`` is not checked (behind a proxy it is
  whatever the proxy forwards), and it is never trusted for same-origin either.

``Origin``: a listed origin; with ``*``, any origin on a non-loopback bind but only loopback
origins on a loopback one (``*`` never turns DNS-rebinding protection off); else same-origin,
which counts only when ``Origin`` equals a ``Host`` that is itself one of the gateway's own names
(a ``Host`` the client chose proves nothing).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.resource import Resource

#: Host names that always mean this machine (RFC 6761 for ``localhost``).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Interfaces that mean "every address of this machine", loopback included.
WILDCARD_INTERFACES = frozenset({"", "0.0.0.0", "::", "*"})
#: ``host [":" port]`` of RFC 9110 section 7.2, with the reg-name narrowed to DNS characters.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]*)?")
#: An ``allowedHosts`` name: a DNS name, or ``*.`` and a domain (IP addresses are checked apart).
HOST_ENTRY = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
#: Distinct Host values remembered with their answer; beyond it the memo starts again (bounded memory).
_MEMO_SIZE = 256


def listen_interface(description: str) -> str:
    """The interface a strports description binds: ``tcp:3000:interface=127.0.0.1`` -> ``127.0.0.1``,
    ``unix:/run/mcpgw.sock`` -> ``unix``, ``tcp:3000`` -> ``0.0.0.0`` (``tcp6``: ``::``); any other kind
    of endpoint (``systemd:``, ``ssl:`` without an interface) counts as every interface."""
    kind = description.split(":", 1)[0].lower()
    if kind == "unix":
        return "unix"
    m = re.search(r"(?:^|:)interface=((?:\\.|[^:\\])*)", description)
    if m:
        return m.group(1).replace("\\", "")
    return "::" if kind == "tcp6" else "0.0.0.0"


def is_loopback_interface(interface: str) -> bool:
    """A Unix socket, ``localhost``, or an address in 127.0.0.0/8 or ``::1``."""
    if interface == "unix" or interface.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host part of a Host header or an origin's authority, lower-cased and without brackets
    (``[::1]:3000`` -> ``::1``); ``""`` for anything that is not ``host[:port]`` (userinfo, spaces)."""
    m = _HOST.fullmatch(value)
    if m is None:
        return ""
    return m.group(1).strip("[]").lower()


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    if not name[:1].isdigit() and ":" not in name:
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """The Host and Origin rules of one listening site (see the module docstring)."""

    def __init__(self, interfaces: Sequence[str], allowed_hosts: Iterable[str] = (), origins: Iterable[str] = ()):
        interfaces = tuple(interfaces) or ("0.0.0.0",)
        #: Every endpoint is on loopback: only this machine can connect.
        self.loopback = all(is_loopback_interface(i) for i in interfaces)
        #: Some endpoint accepts connections to a loopback address (a loopback or wildcard bind).
        self._loopback_reachable = any(is_loopback_interface(i) or i in WILDCARD_INTERFACES for i in interfaces)
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in allowed_hosts:
            entry = entry.strip("[]").lower()
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                exact.add(entry)
        self.allowed_hosts = frozenset(exact)
        self._suffixes = tuple(suffixes)
        # A specific non-loopback bind address is the gateway's own name too (http://10.0.0.5:3000).
        self._bind_names = frozenset(
            i.strip("[]").lower() for i in interfaces
            if i not in WILDCARD_INTERFACES and i != "unix" and not is_loopback_interface(i)
        )
        #: The Host header is checked at all (off only on a non-loopback bind without allowedHosts).
        self.checks_host = self.loopback or bool(exact or suffixes)
        self._origins = frozenset(origins)
        self._wildcard = "*" in self._origins
        self._memo: dict[bytes, bool] = {}

    @classmethod
    def for_listens(cls, config: Any, listens: Iterable[str] | None = None) -> HostPolicy:
        """The policy of a gateway listening on ``listens`` (strports descriptions), or on
        ``config.host`` when there are none (a Guard built without tap.build_service)."""
        descriptions = list(listens or ())
        interfaces = [listen_interface(d) for d in descriptions] if descriptions else [config.host]
        return cls(interfaces, config.allowedHosts, config.cors.origins)

    # -- Host --------------------------------------------------------------------

    def own_name(self, name: str) -> bool:
        """``name`` (a parsed host name) is one the gateway knows to be its own."""
        if not name:
            return False
        if name in self.allowed_hosts or name in self._bind_names:
            return True
        if self._suffixes and name.endswith(self._suffixes):
            return True
        return self._loopback_reachable and _is_loopback_name(name)

    def _own_host(self, host: bytes) -> bool:
        known = self._memo.get(host)
        if known is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            known = self._memo[host] = self.own_name(host_name(host.decode("latin-1")))
        return known

    def host_allowed(self, host: bytes | None) -> bool:
        """The request's Host header passes (None: the request had none)."""
        if not self.checks_host:
            return True
        return host is not None and self._own_host(host)

    # -- Origin ------------------------------------------------------------------

    def listed(self, origin: str) -> bool:
        return origin in self._origins

    def origin_allowed(self, origin: str, host: bytes | None) -> bool:
        """``Origin: origin`` may use the endpoint, the request's Host header being ``host``."""
        if origin in self._origins:
            return True
        if self._wildcard:
            if not self.loopback:
                return True
            if "://" in origin and _is_loopback_name(host_name(origin.split("://", 1)[1])):
                return True
        if host is None or origin.split("://", 1)[-1].lower() != host.decode("latin-1").lower():
            return False
        return self._own_host(host)  # same-origin, and the Host is the gateway's own

    def literal_wildcard(self, origin: str) -> bool:
        """Answer ``Access-Control-Allow-Origin: *`` (not the echoed origin): an unlisted origin
        let in by ``*`` on a non-loopback bind (Fetch spec: never with credentials)."""
        return self._wildcard and not self.loopback and origin not in self._origins


class HostChecked(Resource):
    """A site's root behind a Host check only (the metrics port on a loopback bind: a rebinding
    page must not read ``/metrics`` either). 403 as plain text, like the site it fronts."""

    def __init__(self, inner: Resource, policy: HostPolicy):
        super().__init__()
        self._inner = inner
        self._policy = policy

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        if not self._policy.host_allowed(request.getHeader(b"host")):
            return _Forbidden()
        return self._inner.getChildWithDefault(path, request)

    def render(self, request: Any) -> Any:
        if not self._policy.host_allowed(request.getHeader(b"host")):
            return _Forbidden().render(request)
        return self._inner.render(request)


class _Forbidden(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"text/plain")
        return b"Forbidden: invalid Host header\n"
