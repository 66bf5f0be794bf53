"""A minimal, fast stdio MCP server for the benchmark: newline-delimited JSON-RPC on stdin/stdout.

Answers ``initialize``, ``ping``, ``tools/list`` (one tool, ``echo``) and
``tools/call`` of ``echo``, whose result is the ``text`` argument given back
unchanged. A request that carries ``params._meta.progressToken`` first gets one
``notifications/progress`` (so a Streamable HTTP gateway has something to say
before the response and must answer with an SSE stream). Notifications are
ignored; any other request gets -32601.

Spawn it with an absolute interpreter path (``sys.executable``): a version
manager's shim adds 50-80 ms to every spawn.
"""

from __future__ import annotations

import sys

try:
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # pragma: no cover - the gateway's own dependency set brings orjson
    import json

    def loads(data: bytes):  # type: ignore[misc]
        return json.loads(data)

    def dumps(obj) -> bytes:  # type: ignore[misc]
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
TOOL = {
    "name": "echo",
    "description": "Returns its text argument unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def answer(msg: dict) -> list[bytes]:
    method = msg.get("method")
    if method is None or "id" not in msg:
        return []  # a notification, or a response to a request we never sent
    id = msg["id"]
    params = msg.get("params") or {}
    out: list[bytes] = []
    meta = params.get("_meta") if isinstance(params, dict) else None
    if isinstance(meta, dict) and "progressToken" in meta:
        out.append(dumps({
            "jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": meta["progressToken"], "progress": 1, "total": 1},
        }))
    if method == "tools/call":
        args = params.get("arguments") or {}
        if params.get("name") == "echo":
            result = {"content": [{"type": "text", "text": args.get("text", "")}], "isError": False}
        else:
            out.append(dumps({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "unknown tool"}}))
            return out
    elif method == "initialize":
        asked = params.get("protocolVersion")
        result = {
            "protocolVersion": asked if asked in VERSIONS else VERSIONS[-1],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "mcpgw-bench-echo", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "ping":
        result = {}
    else:
        out.append(dumps({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": f"Method not found: {method}"}}))
        return out
    out.append(dumps({"jsonrpc": "2.0", "id": id, "result": result}))
    return out


def main() -> None:
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    write = stdout.write
    flush = stdout.flush
    while True:
        line = stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        try:
            msg = loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        replies = answer(msg)
        if replies:
            write(b"\n".join(replies) + b"\n")
            flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
