"""Protocol facts every layer shares: the handshake versions the gateway relays, and which client
capability each server-to-client request needs.

Nothing here imports the rest of the gateway, so transports, sessions, pools and upstreams can all
use it without importing one another.
"""

from __future__ import annotations

from typing import Any

from mcpgw import jsonrpc

#: Protocol versions whose handshake the gateway relays (newest last).
SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: Assumed when a Streamable HTTP client sends no MCP-Protocol-Version (spec 2025-06-18, transports).
DEFAULT_VERSION = "2025-03-26"

#: A server's request to its client -> the client capability it needs (every bridge checks it: ``undeclared``).
CAPABILITY_OF = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
#: What an MCP client SDK answers a request for a capability it does not have (mcp ClientSession's defaults).
NOT_SUPPORTED = {"sampling": "Sampling not supported", "elicitation": "Elicitation not supported",
                 "roots": "List roots not supported"}


def params_of(msg: dict[str, Any]) -> dict[str, Any]:
    """A message's params if they are an object, else an empty one."""
    params = msg.get("params")
    return params if isinstance(params, dict) else {}


def undeclared(method: Any, declared: Any) -> str | None:
    """The client capability a server-to-client request needs that the client did not declare, or None
    (2025-11-25 basic/lifecycle Capability Negotiation: a server asks only for what the client declared)."""
    needed = CAPABILITY_OF.get(method) if isinstance(method, str) else None
    if needed is None or (isinstance(declared, dict) and needed in declared):
        return None
    return needed


def capability_refusal(id: Any, capability: str) -> bytes:
    """The answer to a server's request for ``capability`` from a client that lacks it: what a client SDK
    without that capability answers (-32600, "Sampling not supported"), naming the undeclared capability."""
    return jsonrpc.error_bytes(id, jsonrpc.INVALID_REQUEST,
                               f"{NOT_SUPPORTED[capability]}: the client did not declare the {capability} capability")
