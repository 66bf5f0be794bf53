"""An OTLP/HTTP endpoint that takes span batches and throws them away, for ``bench.ab --tracing``.

A traced gateway exports every batch here (``POST /v1/traces``): what is measured is the gateway's
cost of tracing, not a collector's. It runs in a process of its own, as a collector does: in a
thread of the bench's load generator its reads took that process's GIL from the asyncio loop that
drives the calls (client CPU per call +10 %), and the calls/s measured that, not the gateway.

``python3 -m bench.otlp_sink`` serves on a free loopback port and prints it on its first line.
"""

from __future__ import annotations

import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")  # an empty ExportTraceServiceResponse
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class Sink:
    """The sink's process: ``endpoint`` is its base URL (``tracing.endpoint``)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink"], stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        self.endpoint = f"http://127.0.0.1:{int(self._process.stdout.readline())}"

    def shutdown(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def start() -> Sink:
    return Sink()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
