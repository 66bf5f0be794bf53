"""In-memory stand-ins for child processes, after twisted/runner/test/test_procmon.py.

``FakeProcessReactor`` is a ``Clock`` whose ``spawnProcess`` connects the
protocol to a ``FakeProcessTransport`` at once; a test then plays the child by
calling ``outReceived`` / ``errReceived`` / ``processEnded`` itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
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

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.written.append(b"".join(seq))

    def closeStdin(self) -> None:
        self.stdinClosed += 1

    def signalProcess(self, sig: Any) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

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


class FakeProcessReactor(Clock):
    """A Clock that can 'spawn' processes: each gets a FakeProcessTransport."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcessTransport] = []
        self._next_pid = 4242

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, **kwargs: Any) -> FakeProcessTransport:
        transport = FakeProcessTransport(proto, executable, list(args), dict(env or {}), path, self._next_pid)
        self._next_pid += 1
        self.spawned.append(transport)
        proto.makeConnection(transport)
        return transport


class LogCapture:
    """Every log event published while a test runs (removed at cleanup, even on failure)."""

    def __init__(self, testcase: Any):
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        """Events whose fields include every ``fields`` item."""
        return [e for e in self.events if all(k in e and e[k] == v for k, v in fields.items())]

    def formats(self, fragment: str) -> list[dict[str, Any]]:
        """Events whose format string contains ``fragment``."""
        return [e for e in self.events if fragment in (e.get("log_format") or "")]
