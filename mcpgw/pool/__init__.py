"""Pooled children: a few stdio MCP servers shared by every client of one server.

A server configured ``"sessions": "pooled"`` gets ``poolSize`` children that the
gateway starts and initializes itself (it is their MCP client: ``initialize``,
then ``notifications/initialized``). Client requests are spread over them:

- every request id is rewritten to a gateway-unique id (and the progress token
  with it), and the child's response gets the client's own id back, so ids that
  collide across clients (``1`` from everyone) never meet in a child;
- a request goes to the ready child with the fewest requests in flight; each
  child takes at most ``poolQueue`` at once, and beyond that the caller is told
  ``PoolFull`` (HTTP 503 with ``Retry-After``);
- a child that exits fails its in-flight requests at once (JSON-RPC -32000) and
  is replaced after a doubling backoff on the injected reactor; the other
  children's requests are untouched;
- a child's own request to its client (sampling, elicitation, roots) during a
  call becomes an ``InputRequiredResult`` for a 2026-07-28 caller when the call
  is the child's only one in flight that is not already waiting for its
  client's input (mcpgw.transports.modern); the requests such a call makes
  within ``INPUT_GATHER`` go out together, each under its own key; the call
  waits ``poolInputWait`` seconds for the client's retry, then the child's
  requests get JSON-RPC errors and the call ``notifications/cancelled``.
  Any other child request is answered with a JSON-RPC error at once: nothing
  waits for a client that cannot be asked;
- the ``x-mcp-header`` annotations of the tools (SEP-2243) are fetched with one
  ``tools/list`` when first needed, kept until a child says the list changed.

The pool keeps no per-client state beyond the requests in flight.

One module per responsibility: ``children`` (the children, dispatch and id rewriting, replacement,
limits.requestTimeout), ``inputs`` (InputRequiredResult parking) with ``tokens`` (requestState),
``headers`` (the x-mcp-header cache), ``subscriptions``, ``session`` (handshake-era sessions served
by a pool) and ``manager`` (the service that holds every pool).
"""

from mcpgw.pool.children import ChildPool, PooledChild
from mcpgw.pool.headers import HEADER_TYPES, ToolHeaders, ToolsFetch, header_annotations
from mcpgw.pool.inputs import InputParking
from mcpgw.pool.manager import PoolManager
from mcpgw.pool.pending import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CHILD_VERSION,
    CLIENT_CAPABILITIES,
    CLIENT_INFO,
    INPUT_GATHER,
    INPUT_KEY_META,
    INPUT_KEYS,
    INPUT_METHODS,
    INPUT_WAIT,
    SHARED_NOTIFICATIONS,
    Pending,
    PoolFull,
)
from mcpgw.pool.session import PooledSession, PoolLease, pooled_session_factory
from mcpgw.pool.subscriptions import Subscriptions
from mcpgw.pool.tokens import StateRejected, StateTokens, request_name
from mcpgw.versions import CAPABILITY_OF, NOT_SUPPORTED, capability_refusal, params_of, undeclared

__all__ = [
    "BACKOFF_FIRST", "BACKOFF_MAX", "CAPABILITY_OF", "CHILD_VERSION", "CLIENT_CAPABILITIES", "CLIENT_INFO", "HEADER_TYPES",
    "INPUT_GATHER", "INPUT_KEYS", "INPUT_KEY_META", "INPUT_METHODS", "INPUT_WAIT", "NOT_SUPPORTED", "SHARED_NOTIFICATIONS",
    "ChildPool", "InputParking", "Pending", "PoolFull", "PoolLease", "PoolManager", "PooledChild", "PooledSession", "StateRejected", "StateTokens",
    "Subscriptions", "ToolHeaders", "ToolsFetch", "capability_refusal", "header_annotations", "params_of",
    "pooled_session_factory", "request_name", "undeclared",
]
