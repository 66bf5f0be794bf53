"""The admin API (``/admin/``) and the web console (``/console/``).

Both exist only when an admin token is configured (``admin.token`` or
``MCPGW_ADMIN_TOKEN``); otherwise those paths are 404 like any unknown path.
Every ``/admin/`` request must carry ``Authorization: Bearer <admin token>``:
SHA-256 of the presented token is compared with SHA-256 of the configured one
by ``hmac.compare_digest`` (constant time), else 401. The console's static
files (HTML, JS, CSS: no data, no secrets) are served without the token; the
page asks for it and sends it on each of its ``fetch`` calls. The API is
described in ``docs/admin-openapi.yaml``.

Every admin request is a line of the audit trail (mcpgw.audit, ``auditLog``): ``method`` "admin",
``target`` "<HTTP method> <path>" with a session id in the path shortened as in the logs, ``identity``
"admin" (the token's holder; null for a request without it), the HTTP status as ``error_code`` of one
that failed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpgw import jsonrpc, logs
from mcpgw.audit import NOOP_AUDIT, Audit, AuditEvent
from mcpgw.channel import ADMIT
from mcpgw.config import ConfigError, check_server_name
from mcpgw.control import ServerConflict, ServerControl, UnknownServer
from mcpgw.failures import RecentFailures
from mcpgw.request import IHeadChecked, head_decision
from mcpgw.responding import gone
from mcpgw.stats import StatsSampler

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CONSOLE_FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"console.js": ("console.js", b"text/javascript; charset=utf-8"),
    b"console.css": ("console.css", b"text/css; charset=utf-8"),
}
#: Largest admin request body (a server definition).
MAX_BODY = 64 * 1024
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _json(request: Request, obj: Any, status: int = 200) -> bytes:
    body = jsonrpc.dumps(obj)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"cache-control", b"no-store")
    return body


def _error(request: Request, status: int, message: str) -> bytes:
    return _json(request, {"error": message}, status)


class AdminAuth:
    """The admin token, compared in constant time."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode()).digest()

    def allows(self, request: Request) -> bool:
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        presented = b""
        if len(values) == 1:
            m = _BEARER.fullmatch(values[0])
            if m is not None:
                presented = m.group(1)
        # Always one digest and one compare, whatever was (or was not) sent.
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest) and bool(presented)


@implementer(IHeadChecked)
class AdminResource(Resource):
    """``/admin/...``: checks the token, then dispatches on the path (a leaf: one place for auth)."""

    isLeaf = True
    log = Logger(observer=logs.observer)

    def __init__(self, control: ServerControl, stats: StatsSampler, auth: AdminAuth, audit: Audit = NOOP_AUDIT,
                 failures: RecentFailures | None = None):
        super().__init__()
        self._control = control
        self._stats = stats
        self._auth = auth
        self._audit = audit
        self._failures = failures if failures is not None else RecentFailures()
        #: Asked on the request head (mcpgw.web.GatewaySite.head_received): a request without the
        #: token is answered 401 before a byte of its body is read.
        self.head_guard = self

    def check(self, request: Request) -> Any:
        """ADMIT with the admin token, else the 401 body."""
        if self._auth.allows(request):
            return ADMIT
        self._record(request, time.time(), 401, None)
        request.setHeader(b"www-authenticate", b'Bearer realm="mcpgw-admin"')
        return _error(request, 401, "admin token required (Authorization: Bearer <admin.token>)")

    def render(self, request: Request) -> Any:
        reply, verdict = head_decision(request)
        if reply is not None:
            return reply  # refused on the head (or its body was over maxBodyBytes)
        if verdict is not ADMIT:
            verdict = self.check(request)  # a request that did not come through GatewayChannel
            if verdict is not ADMIT:
                return verdict
        request.setHeader(b"x-content-type-options", b"nosniff")
        if self._audit is not NOOP_AUDIT:
            began = time.time()
            request.notifyFinish().addBoth(lambda _: self._record(request, began, request.code, "admin"))
        parts = [p.decode("utf-8", "replace") for p in (request.postpath or []) if p]
        method = request.method.decode("ascii", "replace")
        try:
            handler, args, allowed = self._route(parts, method)
            if handler is None:
                if allowed:
                    request.setHeader(b"allow", ", ".join(allowed).encode())
                    return _error(request, 405, f"method {method} not allowed here (allowed: {', '.join(allowed)})")
                return _error(request, 404, "no such admin endpoint")
            return handler(request, *args)
        except UnknownServer as e:
            return _error(request, 404, f"no server named {e.args[0]!r}")
        except ServerConflict as e:
            return _error(request, 409, str(e))
        except ConfigError as e:
            return _error(request, 400, str(e))
        except _BadRequest as e:
            return _error(request, 400, str(e))

    def _route(self, parts: list[str], method: str) -> tuple[Callable[..., Any] | None, tuple[Any, ...], list[str]]:
        routes: list[tuple[list[str], dict[str, Callable[..., Any]]]] = [
            ([], {"GET": self.overview}),
            (["servers"], {"GET": self.list_servers, "POST": self.add_server}),
            (["servers", "*"], {"GET": self.get_server, "DELETE": self.remove_server}),
            (["servers", "*", "restart"], {"POST": self.restart_server}),
            (["sessions"], {"GET": self.list_sessions}),
            (["sessions", "*"], {"GET": self.get_session, "DELETE": self.end_session}),
            (["drain"], {"GET": self.drain_status, "POST": self.drain, "DELETE": self.resume}),
            (["stats"], {"GET": self.stats}),
            (["failures"], {"GET": self.failures}),
        ]
        for pattern, methods in routes:
            if len(pattern) != len(parts) or any(p != "*" and p != q for p, q in zip(pattern, parts)):
                continue
            args = tuple(q for p, q in zip(pattern, parts) if p == "*")
            if method in methods:
                return methods[method], args, []
            if method == "HEAD" and "GET" in methods:
                return methods["GET"], args, []
            return None, (), sorted(methods)
        return None, (), []

    # -- endpoints -----------------------------------------------------------

    def overview(self, request: Request) -> bytes:
        return _json(request, self._control.overview())

    def list_servers(self, request: Request) -> bytes:
        return _json(request, {"servers": self._control.describe_servers()})

    def get_server(self, request: Request, name: str) -> bytes:
        return _json(request, self._control.describe_server(name))

    def add_server(self, request: Request) -> bytes:
        body = _body(request)
        name, command = body.pop("name", None), body.pop("command", None)
        if not isinstance(name, str) or not name:
            raise _BadRequest("name: required, a string")
        check_server_name(name, "name")  # ConfigError: 400 saying which names are usable
        if not isinstance(command, str) or not command:
            raise _BadRequest("command: required, a string")
        args, env = body.pop("args", []), body.pop("env", {})
        self._control.add_server(name, command, args=args, env=env, **body)
        request.setHeader(b"location", f"/admin/servers/{name}".encode())
        return _json(request, self._control.describe_server(name), 201)

    def remove_server(self, request: Request, name: str) -> Any:
        d = self._control.remove_server(name)
        return self._later(request, d, lambda n: {"removed": name, "sessionsEnded": n})

    def restart_server(self, request: Request, name: str) -> Any:
        d = self._control.restart_server(name)
        return self._later(request, d, lambda n: {"restarted": name, "sessionsEnded": n})

    def list_sessions(self, request: Request) -> bytes:
        server = request.args.get(b"server", [None])[0] if request.args else None
        name = server.decode("utf-8", "replace") if server is not None else None
        sessions = self._control.describe_sessions(name)
        return _json(request, {"sessions": sessions, "byTransport": self._control.sessions_by_transport()})

    def get_session(self, request: Request, session_id: str) -> bytes:
        for s in self._control.describe_sessions():
            if s["id"] == session_id:
                return _json(request, s)
        return _error(request, 404, "no such session")

    def end_session(self, request: Request, session_id: str) -> Any:
        d = self._control.end_session(session_id)
        if d is None:
            return _error(request, 404, "no such session")
        return self._later(request, d, lambda _: {"ended": session_id})

    def drain_status(self, request: Request) -> bytes:
        return _json(request, self._drain_state())

    def drain(self, request: Request) -> bytes:
        self._control.drain()
        return _json(request, self._drain_state())

    def resume(self, request: Request) -> bytes:
        self._control.resume()
        return _json(request, self._drain_state())

    def _drain_state(self) -> dict[str, Any]:
        overview = self._control.overview()
        return {"draining": overview["draining"], "accepting": overview["accepting"], "sessions": overview["sessions"]["total"]}

    def stats(self, request: Request) -> bytes:
        return _json(request, self._stats.snapshot())

    def failures(self, request: Request) -> bytes:
        """The last failed calls (traced or audited ones), newest first, with their trace ids."""
        return _json(request, {"failures": self._failures.describe()})

    # -- helpers -------------------------------------------------------------

    def _record(self, request: Request, began: float, status: int, identity: str | None) -> None:
        """The audit line of one admin request, answered with ``status``."""
        peer = request.getClientAddress()
        self._audit.record(AuditEvent(
            time=began, method="admin", outcome="ok" if status < 400 else ("unauthorized" if status == 401 else "error"),
            identity=identity, client_ip=peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None,
            target=audit_target(request),
            duration=time.time() - began, error_code=status if status >= 400 else None))

    def _later(self, request: Request, d: defer.Deferred[Any], body: Callable[[Any], Any]) -> Any:
        """Answer once ``d`` fires (children stopped), unless the client has gone."""

        def done(result: Any) -> None:
            if not gone(request):
                request.write(_json(request, body(result)))
                request.finish()

        def failed(f: Failure) -> None:
            self.log.failure("admin: {path} failed", f, path=request.path.decode("latin-1"))
            if not gone(request):
                request.write(_error(request, 500, "internal error"))
                request.finish()

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: self.log.failure("admin: answering failed", f))
        return NOT_DONE_YET


class _BadRequest(Exception):
    pass


def audit_target(request: Request) -> str:
    """"<HTTP method> <path>" of an admin request, a session id in it shortened (it is half a credential)."""
    parts = request.path.decode("latin-1").split("/")
    for i in range(1, len(parts)):
        if parts[i - 1] == "sessions" and parts[i]:
            parts[i] = logs.short_session(parts[i])
    return f"{request.method.decode('latin-1')} {'/'.join(parts)}"


def _body(request: Request) -> dict[str, Any]:
    content = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(content) > MAX_BODY:
        raise _BadRequest(f"body larger than {MAX_BODY} bytes")
    try:
        body = jsonrpc.loads(content)
    except Exception:  # noqa: BLE001 - any decoding problem is the client's
        raise _BadRequest("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    return body


class ConsoleResource(Resource):
    """``/console/``: the console's static files from ``mcpgw/console/`` (read at startup)."""

    isLeaf = True

    def __init__(self, directory: Path = CONSOLE_DIR):
        super().__init__()
        self._files = {name: ((directory / file).read_bytes(), kind) for name, (file, kind) in CONSOLE_FILES.items()}

    def render_GET(self, request: Request) -> bytes:
        if not request.postpath:  # /console -> /console/ (relative URLs in the page)
            request.setResponseCode(301)
            request.setHeader(b"location", request.uri.split(b"?")[0] + b"/")
            return b""
        entry = self._files.get(b"/".join(request.postpath))
        if entry is None:
            return _error(request, 404, "not found")
        body, kind = entry
        request.setHeader(b"content-type", kind)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return body


def install(root: Resource, control: ServerControl, stats: StatsSampler, token: str, audit: Audit = NOOP_AUDIT,
            failures: RecentFailures | None = None) -> None:
    """Put ``/admin/`` and ``/console/`` under ``root`` (only ever with a token); ``audit``: the trail
    every admin request is written to; ``failures``: the recent failed calls ``/admin/failures`` lists."""
    if not token:
        raise ValueError("the admin API needs a token")
    root.putChild(b"admin", AdminResource(control, stats, AdminAuth(token), audit, failures))
    root.putChild(b"console", ConsoleResource())
