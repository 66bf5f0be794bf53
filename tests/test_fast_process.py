"""mcpgw._fast.process: the shortcuts past Twisted's process API (a child started as its own session
leader by one posix_spawn, 64 KiB reads of its stdout, writes straight into its stdin), their probe,
and the public path that serves when a probe fails or the fast paths are off."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, epollreactor, reactor
from twisted.internet import process as tprocess
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import Gateway, _fast
from mcpgw._fast import process as fast_process
from tests.fake_process import FakeProcessReactor
from tests.gateway_process import fixture_server
from tests.wire import POST_HEADERS, events_of, initialize, session_headers, tool_call


def fast_warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "mcpgw.fast" and e.get("log_level") == LogLevel.warn]


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fast paths on and the probe's findings restored after the test; the log events it wrote."""
    monkeypatch.setattr(_fast, "_enabled", True)
    for flag in ("spawn_usable", "reads_usable", "stdin_usable"):
        monkeypatch.setattr(fast_process, flag, getattr(fast_process, flag))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- the probe ---------------------------------------------------------------------------------------

def test_probePassesOnTheInstalledTwisted(warnings: list[dict[str, Any]]) -> None:
    """Every shortcut finds what it reads in the installed Twisted: no warning."""
    assert fast_process.probe()
    assert (fast_process.spawn_usable, fast_process.reads_usable, fast_process.stdin_usable) == (True, True, True)
    assert fast_warnings(warnings) == []


def test_missingListOpenFDs(warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``_listOpenFDs`` the spawn shortcut is off, with one warning line naming it; the
    pipe shortcuts, which do not read it, stay on."""
    monkeypatch.delattr(tprocess, "_listOpenFDs")
    assert not fast_process.probe()
    [warning] = fast_warnings(warnings)
    assert "_listOpenFDs" in warning["missing"] and warning["library"] == "Twisted"
    assert (fast_process.spawn_usable, fast_process.reads_usable, fast_process.stdin_usable) == (False, True, True)
    assert not fast_process.can_spawn_leader()


def test_changedSignatures(warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A private function of another signature counts as missing."""
    monkeypatch.setattr(tprocess, "_getFileActions", lambda fdState, childToParentFD, doClose: [])
    assert not fast_process.probe()
    [warning] = fast_warnings(warnings)
    assert "_getFileActions(fdState, childToParentFD, doClose, doDup2)" in warning["missing"]


class _WriterWithoutBuffers:
    """A ProcessWriter of a Twisted whose FileDescriptor keeps no ``_tempDataLen``."""

    offset = 0
    dataBuffer = b""
    connected = 1
    disconnecting = 0

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: bytes) -> None: ...


def test_writerWithoutTempDataLen(warnings: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A ProcessWriter without ``_tempDataLen``: direct stdin writes are off (one warning line);
    the child's stdout is still read in large reads."""
    monkeypatch.setattr(tprocess, "ProcessWriter", _WriterWithoutBuffers)
    monkeypatch.setattr(tprocess.Process, "processWriterFactory", _WriterWithoutBuffers)
    assert not fast_process.probe()
    [warning] = fast_warnings(warnings)
    assert warning["missing"] == "ProcessWriter._tempDataLen"
    assert (fast_process.spawn_usable, fast_process.reads_usable, fast_process.stdin_usable) == (True, True, False)


def test_spawnLeaderDeclines(warnings: list[dict[str, Any]]) -> None:
    """Not Twisted's POSIX reactor (a test's), or the fast paths off: the caller spawns publicly."""
    assert not fast_process.spawn_leader(FakeProcessReactor(), None, ["/bin/true"], {}, "/")
    _fast.configure(False)
    posix_reactor = epollreactor.EPollReactor.__new__(epollreactor.EPollReactor)  # never started: nothing opened
    assert not fast_process.spawn_leader(posix_reactor, None, ["/bin/true"], {}, "/")


# -- the child's pipes -------------------------------------------------------------------------------

class _Proc:
    """What a ProcessReader hands its data to."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []

    def childDataReceived(self, name: int, data: bytes) -> None:
        self.got.append((name, data))


class PipeTests(SynchronousTestCase):
    """Twisted's ProcessReader and ProcessWriter on real pipes, watched by a MemoryReactor."""

    def setUp(self) -> None:
        self.patch(_fast, "_enabled", True)
        self.closed: set[int] = set()  # write ends a test closed itself
        self.proc = _Proc()
        self.memory = MemoryReactor()
        self.out_r, self.out_w = self.pipe()
        self.in_r, self.in_w = self.pipe()
        self.reader = tprocess.ProcessReader(self.memory, self.proc, 1, self.out_r)
        self.writer = tprocess.ProcessWriter(self.memory, self.proc, 0, self.in_w, forceReadHack=True)
        # Twisted's Process with these pipes, never spawned (tune_pipes reads only its ``pipes``).
        self.transport = tprocess.Process.__new__(tprocess.Process)
        self.transport.pipes = {0: self.writer, 1: self.reader}

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(lambda: w in self.closed or os.close(w))
        return r, w

    def test_stdoutReadInLargeReads(self) -> None:
        """60,000 bytes waiting in the pipe are one read (Twisted's own reads take 8 KiB at a time)."""
        self.assertIs(fast_process.tune_pipes(self.transport), self.writer)
        os.write(self.out_w, b"x" * 60_000)
        self.reader.doRead()
        self.assertEqual([(name, len(data)) for name, data in self.proc.got], [(1, 60_000)])

    def test_endOfStdout(self) -> None:
        """The child's end of stdout closed: the reader reports CONNECTION_DONE, as Twisted's does."""
        from twisted.internet.main import CONNECTION_DONE

        fast_process.tune_pipes(self.transport)
        os.close(self.out_w)
        self.closed.add(self.out_w)
        self.assertIs(self.reader.doRead(), CONNECTION_DONE)

    def test_stdinStraightIntoThePipe(self) -> None:
        """Nothing queued: the line goes into the pipe at once, newline added, nothing buffered."""
        writer = fast_process.tune_pipes(self.transport)
        self.assertTrue(fast_process.write_stdin(writer, b'{"id":1}'))
        self.assertEqual(os.read(self.in_r, 100), b'{"id":1}\n')
        self.assertEqual((self.writer._tempDataLen, self.writer.dataBuffer), (0, b""))

    def test_stdinBehindQueuedData(self) -> None:
        """Data already queued in the writer: False, so the caller's line goes behind it (order kept)."""
        writer = fast_process.tune_pipes(self.transport)
        self.writer.write(b"queued\n")
        self.assertFalse(fast_process.write_stdin(writer, b'{"id":2}'))

    def test_fastPathsOff(self) -> None:
        """configure(False): nothing taken over; Twisted reads 8 KiB at a time; no stdin writer."""
        _fast.configure(False)
        self.assertIsNone(fast_process.tune_pipes(self.transport))
        os.write(self.out_w, b"x" * 60_000)
        self.reader.doRead()
        self.assertEqual(len(self.proc.got[0][1]), 8192)

    def test_notTwistedsProcess(self) -> None:
        """A transport that is not Twisted's Process (a test's stand-in): nothing to take over."""
        self.assertIsNone(fast_process.tune_pipes(SimpleNamespace(pid=1)))


# -- a real child through the gateway ----------------------------------------------------------------

@pytest.fixture
def gateway(warnings: list[dict[str, Any]]) -> Any:
    """An embedded gateway (mcpgw.Gateway) on this process's reactor (pytest-twisted), one fixture server."""
    from tests.test_embedding import App

    gw = Gateway.from_config({
        "host": "127.0.0.1", "metrics": {"enabled": False}, "mcpServers": {"fx": fixture_server()},
    }, reactor)
    gw.start()
    app = App(gw)
    yield app
    pytest_twisted.blockon(defer.ensureDeferred(app.close()))


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What spawn_leader and tune_pipes returned, per child."""
    seen: dict[str, list[Any]] = {"spawn_leader": [], "tune_pipes": []}
    for name in seen:
        real = getattr(fast_process, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            result = _real(*args)
            seen[_name].append(result)
            return result

        monkeypatch.setattr(fast_process, name, spy)
    return seen


def _messages(body: bytes, headers: Any) -> list[Any]:
    if (headers.getRawHeaders(b"content-type") or [b""])[0].startswith(b"application/json"):
        return [json.loads(body)]
    return [json.loads(e.data) for e in events_of(body) if e.data]


async def answered(app: Any) -> None:
    """initialize and a tools/call reach the child and its answers come back."""
    status, body, headers = await app.post("/mcp", initialize(), POST_HEADERS)
    assert status == 200, body
    [reply] = _messages(body, headers)
    assert reply["result"]["instructions"] == "Conformance fixture for mcpgw tests."
    sid = headers.getRawHeaders(b"mcp-session-id")[0].decode()
    status, body, headers = await app.post("/mcp", tool_call(2, "echo", {"text": "fallback"}), session_headers(sid))
    assert status == 200, body
    [reply] = _messages(body, headers)
    assert reply["result"]["content"][0]["text"] == "fallback"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fastPathsServe(gateway: Any, spied: dict[str, list[Any]], warnings: list[dict[str, Any]]) -> None:
    """The fast paths on (the control): the child is started by posix_spawn with setsid, its stdin
    taken for direct writes, and it answers."""
    await answered(gateway)
    if sys.platform.startswith("linux"):
        assert spied["spawn_leader"] == [True]
    assert spied["tune_pipes"][0] is not None
    assert fast_warnings(warnings) == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_probeFailureFallsBack(gateway: Any, spied: dict[str, list[Any]], warnings: list[dict[str, Any]],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``_listOpenFDs`` gone from the installed Twisted: one warning line, the child is started by
    ``reactor.spawnProcess`` (under ``setsid``) and still answers a JSON-RPC request."""
    real = tprocess._listOpenFDs
    monkeypatch.delattr(tprocess, "_listOpenFDs")
    fast_process.probe()
    monkeypatch.setattr(tprocess, "_listOpenFDs", real, raising=False)  # Twisted's own spawn path (its fork) reads it too
    assert len(fast_warnings(warnings)) == 1
    await answered(gateway)
    assert spied["spawn_leader"] == [False]
    assert len(fast_warnings(warnings)) == 1


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_configFastPathsOff(gateway: Any, spied: dict[str, list[Any]], warnings: list[dict[str, Any]]) -> None:
    """``"fastPaths": false`` (configure(False)): every public path (spawnProcess, Twisted's reads,
    transport.write), no warning, and the child answers."""
    _fast.configure(False)
    await answered(gateway)
    assert spied == {"spawn_leader": [False], "tune_pipes": [None]}
    assert fast_warnings(warnings) == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_environmentFastPathsOff(gateway: Any, spied: dict[str, list[Any]], warnings: list[dict[str, Any]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCPGW_FAST_PATHS=0`` wins over a config that turns them on; the child answers on the public paths."""
    monkeypatch.setenv("MCPGW_FAST_PATHS", "0")
    _fast.configure(True)
    assert not _fast.enabled()
    await answered(gateway)
    assert spied == {"spawn_leader": [False], "tune_pipes": [None]}
    assert fast_warnings(warnings) == []
