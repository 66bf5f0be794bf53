"""mcpgw's benchmark suite: ``python3 -m bench [--peers]`` (see docs/performance.md)."""
