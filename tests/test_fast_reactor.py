"""mcpgw._fast.reactor: the epoll reactor's dispatch without a log context per I/O event, its probe
and fallback, and its place in twistd (``--reactor mcpgw-epoll``, the default under ``twistd mcpgw``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.posixbase import _PollLikeMixin
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import _fast
from mcpgw._fast import reactor as fast_reactor
from tests.gateway_process import TWISTD, Gateway, fixture_server


class _Reader(FileDescriptor):
    """Reads a socket; records what it read and the log context it ran in; may raise."""

    def __init__(self, reactor: object, sock: socket.socket, fail: bool = False):
        super().__init__(reactor)  # type: ignore[arg-type]
        self.sock = sock
        self.fail = fail
        self.got: list[bytes] = []
        self.systems: list[object] = []
        self.lost: list[object] = []

    def logPrefix(self) -> str:
        return "reader"

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.systems.append(context.get(log.ILogContext)["system"])
        self.got.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("a bug in a protocol")

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


def fast_warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "mcpgw.fast" and e.get("log_level") == LogLevel.warn]


class ReactorTestCase(SynchronousTestCase):
    """A fresh mcpgw EPollReactor (never run; iterated by hand) and socket pairs watched by it."""

    def setUp(self) -> None:
        self.patch(_fast, "_enabled", True)
        self.reactor = fast_reactor.EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def pair(self, fail: bool = False) -> tuple[_Reader, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(self.reactor, a, fail)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        return reader, b


class DispatchTests(ReactorTestCase):
    def test_probePassesOnTheInstalledTwisted(self) -> None:
        """The installed Twisted has what the fast doPoll reads; no warning at import."""
        self.assertIsNone(fast_reactor.missing())
        self.assertTrue(fast_reactor.usable)
        self.assertIs(fast_reactor.EPollReactor.doIteration, fast_reactor.EPollReactor.doPoll)

    def test_eventsDispatchedWithoutLogContext(self) -> None:
        """Twisted's doPoll runs each doRead inside callWithLogger's {"system": logPrefix()}; this
        one pushes no context."""
        reader, peer = self.pair()
        peer.send(b"one")
        epollreactor.EPollReactor.doPoll(self.reactor, 0)
        self.assertEqual(reader.systems, ["reader"])
        peer.send(b"two")
        self.reactor.doIteration(0)
        self.assertEqual(reader.got, [b"one", b"two"])
        self.assertEqual(reader.systems[1], "-")  # the default context: nothing pushed per event

    def test_errorInProtocolLoggedAndDisconnectedOthersServed(self) -> None:
        """An exception in doRead is logged and drops that descriptor, as Twisted's doPoll does;
        the other descriptor ready in the same poll is still served."""
        bad, bad_peer = self.pair(fail=True)
        good, good_peer = self.pair()
        bad_peer.send(b"x")
        good_peer.send(b"y")
        self.reactor.doIteration(0)
        self.assertEqual(good.got, [b"y"])
        self.assertEqual(bad.got, [b"x"])
        self.assertEqual(len(bad.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fastPathsOffIsTwistedsDoPoll(self) -> None:
        """MCPGW_FAST_PATHS=0 / "fastPaths": false: every poll is Twisted's own (the log context is back)."""
        reader, peer = self.pair()
        _fast.configure(False)
        peer.send(b"one")
        self.reactor.doIteration(0)
        self.assertEqual((reader.got, reader.systems), ([b"one"], ["reader"]))
        self.assertEqual(fast_warnings(self.events), [])


class ProbeTests(ReactorTestCase):
    def test_missingDispatchFallsBackWithOneWarning(self) -> None:
        """Without ``_doReadOrWrite`` in the installed Twisted, the probe fails: one warning line
        naming it, and every poll is EPollReactor.doPoll's (the log context per event is back)."""
        self.patch(fast_reactor, "usable", fast_reactor.usable)
        saved = _PollLikeMixin.__dict__["_doReadOrWrite"]
        del _PollLikeMixin._doReadOrWrite
        try:
            self.assertFalse(fast_reactor.probe())
        finally:
            _PollLikeMixin._doReadOrWrite = saved  # type: ignore[attr-defined]  # Twisted's own doPoll needs it back
        [warning] = fast_warnings(self.events)
        self.assertIn("_doReadOrWrite", warning["missing"])
        self.assertEqual(warning["library"], "Twisted")
        reader, peer = self.pair()
        peer.send(b"one")
        self.reactor.doIteration(0)
        self.assertEqual((reader.got, reader.systems), ([b"one"], ["reader"]))

    def test_eachProbedNameIsChecked(self) -> None:
        """A doPoll of another signature, or an __init__ that sets no ``_poller`` / ``_selectables``."""

        class OtherPoll(epollreactor.EPollReactor):
            def doPoll(self, timeout: Any, budget: Any = None) -> None: ...

        class NoPoller(epollreactor.EPollReactor):
            def __init__(self) -> None:
                self._selectables: dict[int, Any] = {}

        class NoSelectables(epollreactor.EPollReactor):
            def __init__(self) -> None:
                self._poller = None

        self.assertIn("doPoll", fast_reactor.missing(OtherPoll) or "")
        self.assertEqual(fast_reactor.missing(NoPoller), "EPollReactor._poller")
        self.assertEqual(fast_reactor.missing(NoSelectables), "EPollReactor._selectables")
        self.assertIsNone(fast_reactor.missing(fast_reactor.EPollReactor))


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


#: Parses twistd's options as ``twistd`` does, then names the reactor class that is installed.
_PARSE = r"""
import sys
from twisted.scripts._twistd_unix import ServerOptions
ServerOptions().parseOptions(sys.argv[1:])
from twisted.internet import reactor
print(type(reactor).__module__ + "." + type(reactor).__name__)
"""
OURS = "mcpgw._fast.reactor.EPollReactor"


@pytest.mark.integration
class TwistdTests(SynchronousTestCase):
    """twistd in subprocesses (this process's reactor is pytest-twisted's)."""

    def test_listedByHelpReactors(self) -> None:
        """``twistd --help-reactors`` lists mcpgw-epoll among the reactors available here."""
        out = _run(*TWISTD[1:3], "--help-reactors")
        available = out.split("not available")[0]
        self.assertIn("mcpgw-epoll", available)

    def test_reactorOption(self) -> None:
        """``twistd --reactor mcpgw-epoll`` installs it."""
        self.assertEqual(_run("-c", _PARSE, "--reactor", "mcpgw-epoll", "mcpgw").strip(), OURS)

    def test_defaultUnderTwistdMcpgw(self) -> None:
        """``twistd mcpgw`` without ``--reactor`` gets mcpgw's reactor; a reactor the user names is kept."""
        self.assertEqual(_run("-c", _PARSE, "mcpgw").strip(), OURS)
        self.assertEqual(_run("-c", _PARSE, "--reactor", "poll", "mcpgw").strip(),
                         "twisted.internet.pollreactor.PollReactor")

    def test_notInstalledOutsideTwistd(self) -> None:
        """mcpgw.tap's Options parsed by an embedding application (or a test) install no reactor."""
        code = ("import sys; from mcpgw import tap; tap.Options().parseOptions([]); "
                "print('twisted.internet.reactor' in sys.modules)")
        self.assertEqual(_run("-c", code).strip(), "False")

    def test_aRealGatewayRunsOnIt(self) -> None:
        """A real ``twistd -n mcpgw`` logs mcpgw's reactor class at startup, and serves."""
        import httpx

        gateway = Gateway({"mcpServers": {"fx": fixture_server()}})
        try:
            self.assertIn(f"reactor class: {OURS}", "".join(gateway.lines))
            self.assertEqual(httpx.get(gateway.url + "/health", timeout=10).status_code, 200)
        finally:
            gateway.stop()
