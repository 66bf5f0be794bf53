"""What the gateway tells clients about itself as a protected resource: Protected Resource Metadata
(RFC 9728), where it is, and the ``WWW-Authenticate`` challenges that point there.

Resource identifiers (RFC 8707 section 2, the MCP authorization spec's "Canonical Server URI"): the
gateway is ``resource``; server NAME is ``<resource>/servers/NAME/mcp``, and every other endpoint of it
(``/sse``, ``/messages``, ``/ws``, and ``/mcp`` etc. at the root for the default server) is a resource
identifier of the same server, because a client asks for a token for the URL it connects to. A token
for any of a server's identifiers is good on that server only; a token for the gateway's audience is
good on every server.

All URLs come from the configured ``resource`` (the public URL, e.g. the https one in front of nginx),
never from request headers: nothing a client sends changes where the gateway says its metadata is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.web.resource import Resource
from twisted.web.server import Request

from mcpgw.config.oauth import OAuthConfig, canonical_uri

#: RFC 9728 section 3: the well-known URI suffix of Protected Resource Metadata.
WELL_KNOWN = "/.well-known/oauth-protected-resource"
#: The endpoints of a server under /servers/NAME/ (mcpgw.web.ServerResource) and at the root for the default.
ENDPOINTS = ("mcp", "sse", "messages", "ws")
#: Seconds a client or cache may keep a metadata document.
CACHE_SECONDS = 300


def metadata_url(resource: str) -> str:
    """RFC 9728 section 3.1: the well-known segment goes between the host and the path of the resource
    identifier (``https://gw/servers/a/mcp`` -> ``https://gw/.well-known/oauth-protected-resource/servers/a/mcp``)."""
    parts = urlsplit(resource)
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN + parts.path.rstrip("/"), parts.query, ""))


def _ordered(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for group in groups for s in group))


class ProtectedResources:
    """The gateway's resource identifiers, their metadata documents and their challenges."""

    def __init__(self, config: OAuthConfig, servers: Iterable[str], default: str | None = None):
        self.config = config
        self.base = config.resource
        self.servers: tuple[str, ...] = ()
        self.default = default
        #: Changes with the servers (mcpgw.control adds and removes them at run time): documents made
        #: from an older version are made again.
        self.version = 0
        # resource identifier -> the server it names (None: the gateway itself)
        self._owner: dict[str, str | None] = {self.base: None}
        for name in servers:
            self.add_server(name)
        if default is not None:
            for endpoint in ENDPOINTS:
                self._owner[self.resource(default, endpoint, root=True)] = default

    def add_server(self, name: str) -> None:
        """Server ``name`` and its endpoints are resources of the gateway (a server added at run time too)."""
        self.servers = (*self.servers, name)
        self._owner[self.base + f"/servers/{name}"] = name
        for endpoint in ENDPOINTS:
            self._owner[self.resource(name, endpoint)] = name
        self.version += 1

    def remove_server(self, name: str) -> None:
        """Server ``name`` is gone: its resource identifiers and metadata with it (the default server stays)."""
        self.servers = tuple(n for n in self.servers if n != name)
        prefix = self.base + f"/servers/{name}"
        for uri in [u for u in self._owner if u == prefix or u.startswith(prefix + "/")]:
            del self._owner[uri]
        self.version += 1

    # -- identifiers -------------------------------------------------------------

    def resource(self, server: str | None, endpoint: str = "mcp", root: bool = False) -> str:
        """The resource identifier of an endpoint: the gateway (``server`` None), server's
        ``/servers/NAME/<endpoint>``, or with ``root`` the default server's ``/<endpoint>``."""
        if server is None:
            return self.base
        return f"{self.base}/{endpoint}" if root else f"{self.base}/servers/{server}/{endpoint}"

    def audiences(self, server: str | None) -> frozenset[str]:
        """The audiences a token may name to be used on ``server`` (None: a gateway-wide endpoint): the
        gateway's audience, and the server's own identifiers (RFC 8707: no other resource's token)."""
        own = {uri for uri, owner in self._owner.items() if owner is not None and owner == server}
        return frozenset({canonical_uri(self.config.gateway_audience), *own})

    def metadata_url(self, server: str | None, endpoint: str = "mcp", root: bool = False) -> str:
        return metadata_url(self.resource(server, endpoint, root))

    # -- documents ---------------------------------------------------------------

    def scopes_supported(self, server: str | None) -> tuple[str, ...]:
        """Every scope that means something at ``server`` (None: anywhere on the gateway)."""
        c = self.config
        if server is None:
            return _ordered(c.scopesSupported, *c.scopes.values(), *(s for tools in c.toolScopes.values() for s in tools.values()))
        return _ordered(c.scopesSupported, c.scopes.get(server, ()), *c.toolScopes.get(server, {}).values())

    def document(self, resource: str) -> dict[str, Any] | None:
        """RFC 9728 section 2: the metadata of ``resource`` (one of ours, else None)."""
        if resource not in self._owner:
            return None
        doc: dict[str, Any] = {
            "resource": resource,
            "authorization_servers": list(self.config.authorizationServers),
            "bearer_methods_supported": ["header"],  # OAuth 2.1 section 5: never the query string
        }
        scopes = self.scopes_supported(self._owner[resource])
        if scopes:
            doc["scopes_supported"] = list(scopes)
        return doc

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every document by the path of its well-known URL after ``WELL_KNOWN`` (``""`` for the root's)."""
        out: dict[str, dict[str, Any]] = {}
        for resource in self._owner:
            doc = self.document(resource)
            assert doc is not None
            out[urlsplit(resource).path.rstrip("/")] = doc
        return out

    # -- challenges --------------------------------------------------------------

    def resource_at(self, path: str) -> str:
        """The resource identifier of the endpoint a request path names (``/servers/a/mcp``; behind a
        proxy, the path without the prefix it strips), else the gateway's."""
        resource = self.base + path.split("?", 1)[0].rstrip("/")
        return resource if resource in self._owner else self.base

    def unauthorized_at(self, path: str, *, error: str | None = None, description: str | None = None,
                        realm: str | None = None) -> bytes:
        """``unauthorized`` for the endpoint at a request path."""
        resource = self.resource_at(path)
        return bearer_challenge(metadata_url(resource), scope=self.challenge_scopes(self._owner[resource]),
                                error=error, description=description, realm=realm)

    def insufficient_scope_at(self, path: str, scopes: Iterable[str], description: str | None = None) -> bytes:
        """``insufficient_scope`` for the endpoint at a request path."""
        return bearer_challenge(metadata_url(self.resource_at(path)), scope=tuple(scopes),
                                error="insufficient_scope", description=description)

    def challenge_scopes(self, server: str | None) -> tuple[str, ...]:
        """The ``scope`` of a 401 (MCP authorization spec: what to ask for first, least privilege): the
        server's session scopes, else ``scopesSupported``."""
        return (self.config.scopes.get(server, ()) if server is not None else ()) or self.config.scopesSupported

    def unauthorized(self, server: str | None, endpoint: str = "mcp", root: bool = False, *,
                     error: str | None = None, description: str | None = None, realm: str | None = None) -> bytes:
        """The ``WWW-Authenticate`` value of a 401 at an endpoint (RFC 9728 section 5.1, RFC 6750 section 3;
        ``error`` only when a token was sent)."""
        return bearer_challenge(self.metadata_url(server, endpoint, root), scope=self.challenge_scopes(server),
                                error=error, description=description, realm=realm)

    def insufficient_scope(self, server: str | None, scopes: Iterable[str], endpoint: str = "mcp", root: bool = False,
                           description: str | None = None) -> bytes:
        """The ``WWW-Authenticate`` value of a 403 when the token lacks ``scopes`` (MCP authorization spec,
        "Runtime Insufficient Scope Errors"; RFC 6750 section 3.1)."""
        return bearer_challenge(self.metadata_url(server, endpoint, root), scope=tuple(scopes),
                                error="insufficient_scope", description=description)


def bearer_challenge(resource_metadata: str, *, scope: Iterable[str] = (), error: str | None = None,
                     description: str | None = None, realm: str | None = None) -> bytes:
    """``Bearer realm="...", resource_metadata="...", scope="...", error="...", error_description="..."``.

    Every value is a quoted-string: URLs and scopes are checked in the configuration to need no escaping;
    a description loses what would."""
    params = []
    if realm is not None:
        params.append(f'realm="{_quotable(realm)}"')
    params.append(f'resource_metadata="{resource_metadata}"')
    scopes = " ".join(scope)
    if scopes:
        params.append(f'scope="{scopes}"')
    if error is not None:
        params.append(f'error="{error}"')
        if description:
            params.append(f'error_description="{_quotable(description)}"')
    return ("Bearer " + ", ".join(params)).encode("ascii")


def _quotable(text: str) -> str:
    # RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E.
    return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')


class MetadataResource(Resource):
    """``/.well-known/oauth-protected-resource[/<path of a resource>]``: the documents as JSON (RFC 9728
    section 3.2), GET and HEAD only, cacheable, readable cross-origin (public, no credentials)."""

    isLeaf = True

    def __init__(self, resources: ProtectedResources, cache_seconds: int = CACHE_SECONDS):
        super().__init__()
        self._cache = b"public, max-age=%d" % cache_seconds
        self._resources = resources
        self._version = -1
        self._bodies: dict[bytes, bytes] = {}

    def _documents(self) -> dict[bytes, bytes]:
        """The documents by path, made again when the servers changed."""
        resources = self._resources
        if self._version != resources.version:
            by_path = resources.documents()
            bodies = {path.encode("ascii"): json.dumps(doc, separators=(",", ":")).encode() for path, doc in by_path.items()}
            # Behind a proxy that strips the gateway's path prefix, the request names the path without it.
            prefix = urlsplit(resources.base).path.rstrip("/").encode("ascii")
            if prefix:
                for path in list(bodies):
                    if path.startswith(prefix):
                        bodies.setdefault(path[len(prefix):], bodies[path])
            self._bodies, self._version = bodies, resources.version
        return self._bodies

    def render_GET(self, request: Request) -> bytes:
        path = b"".join(b"/" + segment for segment in request.postpath or []).rstrip(b"/")
        body = self._documents().get(path)
        self._common(request)
        if body is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error":"not_found"}'
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", self._cache)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)  # twisted.web sends the headers and drops the body

    def render_OPTIONS(self, request: Request) -> bytes:
        """A browser's preflight (the MCP SDKs send ``MCP-Protocol-Version`` with the metadata request)."""
        self._common(request)
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, HEAD, OPTIONS")
        request.setHeader(b"access-control-allow-headers", b"MCP-Protocol-Version, Content-Type")
        request.setHeader(b"access-control-max-age", b"86400")
        return b""

    @staticmethod
    def _common(request: Request) -> None:
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"x-content-type-options", b"nosniff")


def well_known(resources: ProtectedResources) -> Resource:
    """A ``.well-known`` Resource with ``oauth-protected-resource`` in it, for ``root.putChild(b".well-known", ...)``."""
    node = Resource()
    node.putChild(b"oauth-protected-resource", MetadataResource(resources))
    return node
