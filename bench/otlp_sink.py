"""An OTLP/HTTP endpoint that takes span batches and throws them away, for ``bench.ab --tracing``.

A traced gateway exports every batch here (``POST /v1/traces``): what is measured is the gateway's
cost of tracing, not a collector's. It runs in a thread of the bench process, off the gateway's CPU.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    batches = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).batches += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")  # an empty ExportTraceServiceResponse
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def start() -> tuple[str, ThreadingHTTPServer]:
    """A running sink on a free loopback port: its base URL (``tracing.endpoint``) and its server (``shutdown()``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
