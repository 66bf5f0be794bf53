"""The gateway as an OAuth 2.1 resource server (MCP authorization spec 2025-06-18 / 2025-11-25).

- ``auth.oauth`` itself is parsed by mcpgw.config.oauth (parse_oauth, OAuthConfig), with the rest of the file.
- ``metadata``: Protected Resource Metadata (RFC 9728), its well-known URLs, the ``WWW-Authenticate``
  challenges of a 401 and of a 403 insufficient_scope, and the Resource that serves the documents.
- ``keys``: an authorization server's metadata (RFC 8414 / OpenID discovery) and its cached keys.
- ``tokens``: access tokens checked (JWT per RFC 9068, opaque through RFC 7662 introspection).
- ``policy``: per-server and per-tool scopes.
- ``http``: the HTTP client these use (treq; injected, so tests use a fake).
"""

from mcpgw.config.oauth import OAuthConfig, parse_oauth
from mcpgw.oauth.metadata import ProtectedResources
from mcpgw.oauth.tokens import AccessToken, TokenError, TokenVerifier

__all__ = ["AccessToken", "OAuthConfig", "ProtectedResources", "TokenError", "TokenVerifier", "parse_oauth"]
