"""What a span of the gateway says: attribute names, span names, and what is read from a request.

The names follow the OpenTelemetry semantic conventions for MCP (status: Development), which moved
from open-telemetry/semantic-conventions to open-telemetry/semantic-conventions-genai
(``docs/gen-ai/mcp.md``, published at https://opentelemetry.io/docs/specs/semconv/gen-ai/mcp/):

- span name ``{mcp.method.name} {target}``, the target being ``gen_ai.tool.name`` or
  ``gen_ai.prompt.name``; never the resource URI (high cardinality);
- the gateway's span of a client request is the MCP *server* span (kind SERVER); its call to the
  upstream server is an MCP *client* span (kind CLIENT), the parent of the upstream's own span;
- ``mcp.method.name``, ``jsonrpc.request.id`` (not for a null or absent id), ``gen_ai.tool.name``,
  ``gen_ai.prompt.name``, ``mcp.resource.uri``, ``mcp.session.id``, ``mcp.protocol.version``,
  ``gen_ai.operation.name`` (``execute_tool`` for ``tools/call`` only), ``network.transport``
  (``pipe`` for stdio, ``tcp`` for HTTP), ``network.protocol.name``, ``client.address``,
  ``server.address`` / ``server.port``;
- on failure ``error.type`` (the JSON-RPC error code as a string, ``tool_error`` for a
  CallToolResult with ``isError``, else a short class such as ``timeout``), span status ERROR, and
  ``rpc.response.status_code`` (the JSON-RPC code);
- ``gen_ai.tool.call.arguments`` is Opt-In (it may hold secrets): ``tracing.recordArguments``;
- trace context travels in ``params._meta`` as unprefixed ``traceparent`` / ``tracestate`` (SEP-414).

Gateway facts no convention names are ``mcpgw.*``. Nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

METHOD = "mcp.method.name"
REQUEST_ID = "jsonrpc.request.id"
TOOL = "gen_ai.tool.name"
PROMPT = "gen_ai.prompt.name"
RESOURCE_URI = "mcp.resource.uri"
SESSION_ID = "mcp.session.id"
PROTOCOL_VERSION = "mcp.protocol.version"
OPERATION = "gen_ai.operation.name"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
ERROR_TYPE = "error.type"
RPC_STATUS = "rpc.response.status_code"
NETWORK_TRANSPORT = "network.transport"
NETWORK_PROTOCOL = "network.protocol.name"
CLIENT_ADDRESS = "client.address"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
HTTP_STATUS = "http.response.status_code"
#: The gateway's own: the configured server, the client transport (streamable, sse, ws), who asked,
#: how it ended, which upstream leg (stdio, remote, pool, aggregate, cluster), a child's pid, an
#: aggregate's member, the cluster node that runs the session.
SERVER = "mcpgw.server"
TRANSPORT = "mcpgw.transport"
IDENTITY = "mcpgw.identity"
OUTCOME = "mcpgw.outcome"
UPSTREAM = "mcpgw.upstream"
CHILD_PID = "mcpgw.child.pid"
MEMBER = "mcpgw.aggregate.member"
NODE = "mcpgw.cluster.node"

#: Outcomes that are no failure: the span keeps status UNSET and gets no ``error.type`` (an
#: InputRequiredResult is a 2026-07-28 call's first round, answered as designed).
SUCCESSES = frozenset({"ok", "input_required"})
#: Longest client-sent text kept in an attribute (a tool name, a URI, a request id), and in a span name.
MAX_VALUE = 256
MAX_NAME_TARGET = 128
#: Longest ``gen_ai.tool.call.arguments`` recorded (JSON text).
MAX_ARGUMENTS = 4096
#: The upstream legs and the transport each runs on (``network.transport``).
LEG_TRANSPORT = {"stdio": "pipe", "pool": "pipe", "remote": "tcp", "aggregate": None, "cluster": "tcp"}
_URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})


def cut(value: Any, limit: int = MAX_VALUE) -> str:
    """``value`` as text of at most ``limit`` characters (client-sent: a 1 MiB tool name stays out of the queue)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit]


@lru_cache(maxsize=4096)  # a session's every request hashes the same id
def session_hash(session_id: str) -> str:
    """What ``mcp.session.id`` holds: 16 hex digits of the id's SHA-256.

    The session id is half a credential (mcpgw.logs.short_session): a trace backend gets a value
    that follows one session through its spans and cannot be used to join it."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()[:16]


def target_of(method: str, params: Any) -> tuple[str | None, dict[str, str]]:
    """The span-name target and the target attributes of a request (the tool, prompt or resource it names)."""
    if not isinstance(params, dict):
        return None, {}
    if method == "tools/call" and isinstance(params.get("name"), str):
        name = params["name"]
        return cut(name, MAX_NAME_TARGET), {TOOL: cut(name), OPERATION: "execute_tool"}
    if method == "prompts/get" and isinstance(params.get("name"), str):
        return cut(params["name"], MAX_NAME_TARGET), {PROMPT: cut(params["name"])}
    if method in _URI_METHODS and isinstance(params.get("uri"), str):
        return None, {RESOURCE_URI: cut(params["uri"])}
    ref = params.get("ref")
    if method == "completion/complete" and isinstance(ref, dict):
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            return cut(ref["name"], MAX_NAME_TARGET), {PROMPT: cut(ref["name"])}
        if ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
            return None, {RESOURCE_URI: cut(ref["uri"])}
    return None, {}


def span_name(method: str, target: str | None) -> str:
    return f"{method} {target}" if target else method


def error_type(outcome: str, error_code: int | str | None) -> str:
    """``error.type`` of a failed request: its JSON-RPC code when it has one, else the outcome (``tool_error``, ``timeout``)."""
    return str(error_code) if error_code is not None else outcome


def outcome_attributes(outcome: str, error_code: int | str | None) -> dict[str, str]:
    """What a span's end adds to its attributes: ``mcpgw.outcome``, and on failure the code and ``error.type``."""
    attributes = {OUTCOME: outcome}
    if error_code is not None:
        attributes[RPC_STATUS] = str(error_code)
    if outcome not in SUCCESSES:
        attributes[ERROR_TYPE] = error_type(outcome, error_code)
    return attributes
