"""Embed mcpgw in a plain twisted.web application.

The application has pages of its own (``/`` and ``/hello``); the gateway is mounted under
``/mcp-gw/``, so MCP clients use ``http://HOST:PORT/mcp-gw/mcp`` (the default server),
``/mcp-gw/servers/NAME/mcp`` or ``/mcp-gw/sse``. ``POST /add-echo`` shows a server added at
runtime, ``POST /remove-echo`` takes it away again (its sessions end, its children stop).

    python3 examples/embed_twisted_web.py --port 8080 [--config conf/gateway.json]

Run with no ``--config``, it serves the ``mcp-server-time`` server that ``pip install mcpgw`` brings.
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.application.service import MultiService
from twisted.internet import defer, endpoints, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mcpgw import Gateway


class Home(Resource):
    """The application's own page."""

    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"An ordinary twisted.web app. The MCP gateway is under /mcp-gw/ (try /mcp-gw/health).\n"


class Servers(Resource):
    """``POST /add-echo`` and ``POST /remove-echo``: the gateway's server list changed at runtime."""

    isLeaf = True

    def __init__(self, gateway: Gateway, action: str, command: list[str]):
        super().__init__()
        self._gateway = gateway
        self._action = action
        self._command = command

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"application/json")
        if self._action == "add":
            self._gateway.add_server("echo", command=self._command[0], args=self._command[1:])
            return json.dumps({"added": "echo", "mcp": "/mcp-gw/servers/echo/mcp"}).encode()
        d = self._gateway.remove_server("echo")

        def done(ended: int) -> None:
            request.write(json.dumps({"removed": "echo", "sessionsEnded": ended}).encode())
            request.finish()

        d.addCallback(done)
        d.addErrback(lambda f: (request.setResponseCode(500), request.write(f.getErrorMessage().encode()), request.finish()))
        return NOT_DONE_YET


def build(gateway: Gateway, echo_command: list[str]) -> Site:
    """The application's site with the gateway's resource mounted under /mcp-gw/."""
    root = Resource()
    root.putChild(b"", Home())
    root.putChild(b"mcp-gw", gateway.resource)
    root.putChild(b"add-echo", Servers(gateway, "add", echo_command))
    root.putChild(b"remove-echo", Servers(gateway, "remove", echo_command))
    return Site(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", help="a gateway JSON config file (default: mcp-server-time)")
    parser.add_argument("--echo-command", default=json.dumps([sys.executable, "-m", "mcp_server_time"]),
                        help="JSON list: the command POST /add-echo serves as server 'echo'")
    options = parser.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)

    if options.config:
        gateway = Gateway.from_file(options.config, reactor)
    else:
        gateway = Gateway.from_config({
            "host": "127.0.0.1",
            "metrics": {"enabled": False},
            "mcpServers": {"time": {"command": sys.executable, "args": ["-m", "mcp_server_time"]}},
        }, reactor)

    app = MultiService()  # an application's own service tree (twistd gives one as ``application``)
    gateway.service.setServiceParent(app)
    app.startService()

    endpoint = endpoints.serverFromString(reactor, f"tcp:{options.port}:interface=127.0.0.1")
    site = build(gateway, json.loads(options.echo_command))

    def listening(port) -> None:  # type: ignore[no-untyped-def]
        print(f"listening on http://127.0.0.1:{port.getHost().port}/ (gateway at /mcp-gw/)", flush=True)

    endpoint.listen(site).addCallback(listening)
    # Stopping the app stops the gateway: every session ends and every child exits first.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.maybeDeferred(app.stopService))
    reactor.run()


if __name__ == "__main__":
    main()
