"""mcpgw: an event-driven MCP gateway on Twisted.

The public embedding API (everything else is internal)::

    from mcpgw import Gateway

    gateway = Gateway.from_file("conf/gateway.json")          # or Gateway.from_config({...}) / a GatewayConfig
    root.putChild(b"mcp-gw", gateway.resource)                 # mount in an existing twisted.web site
    gateway.service.setServiceParent(application)              # or gateway.start()
    gateway.add_server("files", command="npx", args=["-y", "@modelcontextprotocol/server-filesystem", "/tmp"])
    d = gateway.remove_server("files")                         # ends its sessions; fires when its children exited

See ``examples/embed_twisted_web.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "Gateway", "GatewayConfig", "ServerConfig", "__version__", "load_config", "parse_config"]

if TYPE_CHECKING:
    from mcpgw._gateway import Gateway
    from mcpgw.config import ConfigError, GatewayConfig, ServerConfig
    from mcpgw.config import load as load_config
    from mcpgw.config import parse as parse_config

# Imported on first use: ``import mcpgw.config`` (twistd plugins, the exporter) stays light.
_LAZY = {
    "Gateway": ("mcpgw._gateway", "Gateway"),
    "GatewayConfig": ("mcpgw.config", "GatewayConfig"),
    "ServerConfig": ("mcpgw.config", "ServerConfig"),
    "ConfigError": ("mcpgw.config", "ConfigError"),
    "load_config": ("mcpgw.config", "load"),
    "parse_config": ("mcpgw.config", "parse"),
}


def __getattr__(name: str) -> Any:  # PEP 562: the lazy exports above, imported at their first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = vars(importlib.import_module(module))[attr]
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mcpgw' has no attribute {name!r}")
