"""mcpgw: an event-driven MCP gateway on Twisted."""

__version__ = "0.1.0"
