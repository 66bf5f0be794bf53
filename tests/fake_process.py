"""In-memory stand-ins for child processes, after twisted/runner/test/test_procmon.py.

``FakeProcessReactor`` is a ``Clock`` whose ``spawnProcess`` connects the
protocol to a ``FakeProcessTransport`` at once; a test then plays the child by
calling ``outReceived`` / ``errReceived`` / ``processEnded`` itself, or gives the
reactor a ``program`` (``FakeMcpServer``) that plays every child it spawns.
"""

from __future__ import annotations

import itertools
import json
import signal as signals
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure


class FakeProcessTransport:
    """Records what the gateway does to its child: writes, stdin EOF, signals, pauses."""

    def __init__(self, proto: Any, executable: str, args: list[str], env: dict[str, str], path: str | None, pid: int):
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.pid: int | None = pid
        self.written: list[bytes] = []
        self.stdinClosed = 0
        self.signals: list[Any] = []
        self.paused = False
        #: What plays the child (a FakeMcpServer), when the reactor was given one.
        self.program: Any = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.program is not None:
            self.program.stdin_received(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def closeStdin(self) -> None:
        self.stdinClosed += 1
        if self.program is not None and self.stdinClosed == 1:
            self.program.stdin_closed()

    def signalProcess(self, sig: Any) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)
        if self.program is not None:
            self.program.signalled(sig)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.program is not None:
            self.program.stdout_resumed()

    def loseConnection(self) -> None:
        self.closeStdin()

    # -- playing the child -------------------------------------------------

    def exit(self, status: int = 0, signal: int | None = None) -> None:
        """The child exits with ``status`` (or is killed by ``signal``)."""
        self.pid = None
        if signal is None and status == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=None if signal else status, signal=signal))
        # As the reactor does: processExited when the child is reaped, processEnded once its pipes closed too.
        self.proto.processExited(reason)
        self.proto.processEnded(reason)


#: Above Linux's PID_MAX_LIMIT (2**22): no real process has such a pid, so what the gateway does to a
#: fake child's pid outside its transport (os.killpg of its group, /proc lookups) reaches nothing real.
UNREAL_PID = 2**22 + 1000


class FakeProcessReactor(Clock):
    """A Clock that can 'spawn' processes: each gets a FakeProcessTransport.

    ``program(transport, reactor)``, when given, plays each child (``FakeMcpServer``); pids start
    at ``first_pid`` (``UNREAL_PID`` for a gateway whose children are stopped for real: see there).
    """

    def __init__(self, program: Callable[[FakeProcessTransport, Clock], Any] | None = None,
                 first_pid: int = 4242) -> None:
        super().__init__()
        self.spawned: list[FakeProcessTransport] = []
        self._next_pid = first_pid
        self._program = program

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, **kwargs: Any) -> FakeProcessTransport:
        transport = FakeProcessTransport(proto, executable, list(args), dict(env or {}), path, self._next_pid)
        self._next_pid += 1
        self.spawned.append(transport)
        if self._program is not None:
            transport.program = self._program(transport, self)
        proto.makeConnection(transport)
        return transport


class LogCapture:
    """Every log event published while a test runs (removed at cleanup, even on failure)."""

    def __init__(self, testcase: Any):
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self._observe)  # a function taking an event is an ILogObserver to Twisted
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)

    def _observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        """Events whose fields include every ``fields`` item."""
        return [e for e in self.events if all(k in e and e[k] == v for k, v in fields.items())]

    def formats(self, fragment: str) -> list[dict[str, Any]]:
        """Events whose format string contains ``fragment``."""
        return [e for e in self.events if fragment in (e.get("log_format") or "")]


# -- a stdio MCP server, played in memory -------------------------------------------------------

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
#: What the fake answers initialize with (tests/fixtures/conformance_server.py is its model).
FAKE_SERVER_INFO = {"name": "mcpgw-fake-stdio-server", "version": "1.0.0"}
FAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
FAKE_CAPABILITIES = {"tools": {"listChanged": True}, "logging": {}}
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: Returned by a tool that answers later (a timer, or the client's answer to its own request).
LATER = object()


def _compact(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _text_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}]}


def _invalid_request(id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "error": {"code": INVALID_REQUEST, "message": "Invalid Request"}}


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


class _Call:
    """One request the server is handling: its id, params, progress token and reply path."""

    def __init__(self, server: FakeMcpServer, id: Any, params: dict[str, Any], reply: Callable[[Any], None]):
        self.server, self.id, self.params, self._reply = server, id, params, reply
        meta = params.get("_meta")
        self.progress_token = meta.get("progressToken") if isinstance(meta, dict) else None
        self.cancelled = False
        self.timer: Any = None

    def progress(self, progress: float, total: float | None = None) -> None:
        if self.progress_token is None:
            return
        params: dict[str, Any] = {"progressToken": self.progress_token, "progress": progress}
        if total is not None:
            params["total"] = total
        self.server.notify("notifications/progress", params)

    def answer(self, result: Any) -> None:
        self._send({"jsonrpc": "2.0", "id": self.id, "result": result})

    def fail(self, code: int, message: str) -> None:
        self._send({"jsonrpc": "2.0", "id": self.id, "error": {"code": code, "message": message}})

    def _send(self, response: dict[str, Any]) -> None:
        if _hashable(self.id) and self.server.in_flight.get(self.id) is self:
            del self.server.in_flight[self.id]
        if not self.cancelled:  # a cancelled request is not answered (MCP utilities/cancellation)
            self._reply(response)


class FakeMcpServer:
    """A handshake-era (2024-11-05 .. 2025-11-25) stdio MCP server, played in memory.

    Modelled on tests/fixtures/conformance_server.py and speaking as it does: newline-delimited
    JSON-RPC on stdin/stdout, compact UTF-8 JSON, one answer per request (batches answered with
    one array), a parse error (id null) for a line that is not JSON, -32600 for a message that is
    not JSON-RPC, -32601 for a method it lacks. It does only what a server does: it never checks
    sessions, versions or HTTP, which are the gateway's job.

    Time is the reactor's: what it writes reaches the gateway on the reactor's next turn (a pipe),
    and is held while the gateway pauses the child's stdout; ``sleep`` runs on a timer. It exits
    (status 0) once stdin is closed, on a signal, or (status 3, without answering) in ``crash``.

    Methods: initialize, ping, tools/list, tools/call, logging/setLevel. Tools:

        echo        returns its ``text`` argument
        sleep       waits ``seconds``, with progress 0 and ``seconds`` of ``seconds`` when asked;
                    notifications/cancelled for it ends it without an answer
        crash       exits with status 3 without answering
        notify      sends a notifications/message log and notifications/tools/list_changed
        list_roots  asks the client for roots/list (when it declared roots) and returns the answer
    """

    def __init__(self, transport: FakeProcessTransport, reactor: Clock):
        self.transport = transport
        self.reactor = reactor
        self.pid = transport.pid
        #: Every message read from stdin, in order (what reached the server).
        self.received: list[Any] = []
        self.stderr: list[str] = []
        self.exited = False
        self.client_caps: Any = {}
        self.log_level = "debug"
        self.in_flight: dict[Any, _Call] = {}
        self._waiting: dict[Any, Callable[[dict[str, Any]], None]] = {}
        self._next_id = itertools.count(1)
        self._stdin = b""
        self._out: list[bytes] = []
        self._flush_call: Any = None

    # -- the pipes ------------------------------------------------------------------

    def stdin_received(self, data: bytes) -> None:
        if self.exited:
            return
        self._stdin += data
        *lines, self._stdin = self._stdin.split(b"\n")
        for line in lines:
            if self.exited:
                return
            self._line(line.strip())

    def stdin_closed(self) -> None:
        self._log("stdin closed, exiting")
        self._exit(0)

    def signalled(self, sig: Any) -> None:
        number = getattr(signals, f"SIG{sig}", sig) if isinstance(sig, str) else sig
        self._exit(None, int(number))

    def stdout_resumed(self) -> None:
        if self._out and self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _write(self, message: Any) -> None:
        if self.exited:
            return
        self._out.append(_compact(message))
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self, even_paused: bool = False) -> None:
        self._flush_call = None
        if not self._out or (self.transport.paused and not even_paused) or self.transport.pid is None:
            return
        data, self._out = b"".join(self._out), []
        self.transport.proto.outReceived(data)

    def _exit(self, status: int | None, sig: int | None = None) -> None:
        """Exit on the reactor's next turn; what was written before is read first (it is in the pipe)."""
        if self.exited:
            return
        self.exited = True
        for call in list(self.in_flight.values()):
            if call.timer is not None and call.timer.active():
                call.timer.cancel()

        def gone() -> None:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush(even_paused=True)
            if self.transport.pid is not None:
                self.transport.exit(status or 0, sig)

        self.reactor.callLater(0, gone)

    def _log(self, text: str) -> None:
        self.stderr.append(text)

    # -- messages -------------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if not line:
            return
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError as e:
            self._write({"jsonrpc": "2.0", "id": None, "error": {"code": PARSE_ERROR, "message": f"Parse error: {e}"}})
            return
        self.received.append(message)
        if isinstance(message, list):
            self._batch(message)
            return
        self._incoming(message, self._write)

    def _batch(self, batch: list[Any]) -> None:
        """A JSON-RPC batch: every message routed; the requests' answers sent as one array."""
        if not batch:
            self._write(_invalid_request(None))
            return
        answers: list[Any] = []
        waiting = [sum(1 for m in batch if _kind(m) == "request")]

        def collect(answer: Any) -> None:
            answers.append(answer)
            waiting[0] -= 1
            if waiting[0] == 0 and answers:
                self._write(answers)

        for message in batch:
            if _kind(message) == "request":
                self._incoming(message, collect)
            else:
                self._incoming(message, answers.append)
        if waiting[0] == 0 and answers:
            self._write(answers)

    def _incoming(self, message: Any, reply: Callable[[Any], None]) -> None:
        kind = _kind(message)
        if kind == "response":
            handler = self._waiting.pop(message["id"], None) if _hashable(message["id"]) else None
            if handler is None:
                self._log(f"response to unknown request id {message.get('id')!r}")
            else:
                handler(message)
        elif kind == "notification":
            if message["method"] == "notifications/cancelled":
                params = message.get("params") or {}
                request_id = params.get("requestId") if isinstance(params, dict) else None
                call = self.in_flight.get(request_id) if _hashable(request_id) else None
                if call is not None:
                    call.cancelled = True
                    if call.timer is not None and call.timer.active():
                        call.timer.cancel()
        elif kind == "request":
            self._request(message, reply)
        else:
            request_id = message.get("id") if isinstance(message, dict) else None
            reply(_invalid_request(request_id))

    def _request(self, message: dict[str, Any], reply: Callable[[Any], None]) -> None:
        params = message.get("params")
        call = _Call(self, message["id"], params if isinstance(params, dict) else {}, reply)
        if _hashable(call.id):
            self.in_flight[call.id] = call
        handler = getattr(self, "method_" + message["method"].replace("/", "_"), None)
        if handler is None:
            call.fail(METHOD_NOT_FOUND, f"Method not found: {message['method']}")
            return
        try:
            result = handler(call)
        except Exception as e:  # noqa: BLE001 - as the fixture: an internal error, answered
            call.fail(INTERNAL_ERROR, f"Internal error: {e!r}")
            return
        if result is not LATER:
            call.answer(result)

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._write(message)

    def log(self, level: str, data: Any) -> None:
        if LOG_LEVELS.index(level) >= LOG_LEVELS.index(self.log_level):
            self.notify("notifications/message", {"level": level, "logger": "fake-stdio-server", "data": data})

    def ask(self, method: str, params: dict[str, Any], answered: Callable[[dict[str, Any]], None]) -> None:
        """A server-to-client request; ``answered`` gets the client's response."""
        request_id = next(self._next_id)
        self._waiting[request_id] = answered
        self._write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})

    # -- methods --------------------------------------------------------------------

    def method_initialize(self, call: _Call) -> Any:
        requested = call.params.get("protocolVersion")
        self.client_caps = call.params.get("capabilities") or {}
        return {"protocolVersion": requested if requested in FAKE_VERSIONS else FAKE_VERSIONS[0],
                "capabilities": FAKE_CAPABILITIES, "serverInfo": FAKE_SERVER_INFO}

    def method_ping(self, call: _Call) -> Any:
        return {}

    def method_logging_setLevel(self, call: _Call) -> Any:
        level = call.params.get("level")
        if level not in LOG_LEVELS:
            call.fail(INVALID_PARAMS, f"Invalid log level: {level!r}")
            return LATER
        self.log_level = level
        return {}

    def method_tools_list(self, call: _Call) -> Any:
        return {"tools": [{"name": name, "description": (getattr(self, "tool_" + name).__doc__ or "").strip(),
                           "inputSchema": {"type": "object"}} for name in TOOLS]}

    def method_tools_call(self, call: _Call) -> Any:
        name = call.params.get("name")
        if name not in TOOLS:
            call.fail(INVALID_PARAMS, f"Unknown tool: {name}")
            return LATER
        args = call.params.get("arguments") or {}
        try:
            return getattr(self, "tool_" + name)(call, args if isinstance(args, dict) else {})
        except Exception as e:  # noqa: BLE001 - a tool's failure is a result with isError, as in the fixture
            return {"content": [{"type": "text", "text": f"{name} failed: {e!r}"}], "isError": True}

    # -- tools ----------------------------------------------------------------------

    def tool_echo(self, call: _Call, args: dict[str, Any]) -> Any:
        """Returns its text argument."""
        return _text_result(args.get("text", ""))

    def tool_sleep(self, call: _Call, args: dict[str, Any]) -> Any:
        """Waits `seconds` on the clock, then returns; cancellable; reports progress if asked."""
        seconds = float(args.get("seconds", 0))
        call.progress(0, seconds)

        def done() -> None:
            call.timer = None
            call.progress(seconds, seconds)
            call.answer(_text_result(f"slept {args.get('seconds', 0)}"))

        call.timer = self.reactor.callLater(seconds, done)
        return LATER

    def tool_crash(self, call: _Call, args: dict[str, Any]) -> Any:
        """Exits with status 3 without answering."""
        self._log("crash tool called: exiting with status 3")
        self._exit(3)
        return LATER

    def tool_notify(self, call: _Call, args: dict[str, Any]) -> Any:
        """Sends a notifications/message log and notifications/tools/list_changed."""
        self.log("info", args.get("message", "notify tool called"))
        self.notify("notifications/tools/list_changed")
        return _text_result("notified")

    def tool_list_roots(self, call: _Call, args: dict[str, Any]) -> Any:
        """Asks the client for roots/list and returns its answer as JSON text."""
        if not isinstance(self.client_caps, dict) or "roots" not in self.client_caps:
            return {"content": [{"type": "text", "text": "Client does not support roots"}], "isError": True}

        def answered(response: dict[str, Any]) -> None:
            if "error" in response:
                error_ = response["error"] if isinstance(response["error"], dict) else {}
                call.answer({"content": [{"type": "text", "text": f"list_roots failed: {error_.get('message')}"}],
                             "isError": True})
            else:
                call.answer(_text_result(_compact(response.get("result", {})).decode().rstrip("\n")))

        self.ask("roots/list", {}, answered)
        return LATER


TOOLS = ("echo", "sleep", "crash", "notify", "list_roots")


def _kind(message: Any) -> str | None:
    """'request', 'notification', 'response' or None (not JSON-RPC), as the fixture classifies."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None
    if isinstance(message.get("method"), str):
        return "request" if "id" in message else "notification"
    if "id" in message and ("result" in message or "error" in message):
        return "response"
    return None
