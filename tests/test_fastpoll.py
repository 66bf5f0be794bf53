"""mcpgw.fastpoll: the epoll reactor's dispatch without a log context per I/O event."""

from __future__ import annotations

import socket

from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import fastpoll


class _Reader(FileDescriptor):
    """Reads a socket; records what it read and the log context it ran in; may raise."""

    def __init__(self, reactor: object, sock: socket.socket, fail: bool = False):
        super().__init__(reactor)
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


class FastPollTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = epollreactor.EPollReactor()
        self.addCleanup(self.reactor._poller.close)

    def pair(self, fail: bool = False) -> tuple[_Reader, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(self.reactor, a, fail)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        return reader, b

    def test_installedOnlyOnEpoll(self) -> None:
        self.assertFalse(fastpoll.install(MemoryReactorClock()))
        self.assertTrue(fastpoll.install(self.reactor))
        self.assertTrue(fastpoll.install(self.reactor))  # once is enough; again changes nothing

    def test_eventsDispatchedWithoutLogContext(self) -> None:
        """Before: every doRead ran inside callWithLogger's {"system": logPrefix()}; after: no context push."""
        reader, peer = self.pair()
        peer.send(b"one")
        self.reactor.doIteration(0)
        self.assertEqual(reader.got, [b"one"])
        self.assertEqual(reader.systems, ["reader"])
        fastpoll.install(self.reactor)
        peer.send(b"two")
        self.reactor.doIteration(0)
        self.assertEqual(reader.got, [b"one", b"two"])
        self.assertEqual(reader.systems[1], "-")  # the default context: nothing pushed per event

    def test_errorInProtocolLoggedAndDisconnectedOthersServed(self) -> None:
        """An exception in doRead is logged and drops that descriptor, as before; the other
        descriptor ready in the same poll is still served."""
        fastpoll.install(self.reactor)
        bad, bad_peer = self.pair(fail=True)
        good, good_peer = self.pair()
        bad_peer.send(b"x")
        good_peer.send(b"y")
        self.reactor.doIteration(0)
        self.assertEqual(good.got, [b"y"])
        self.assertEqual(bad.got, [b"x"])
        self.assertEqual(len(bad.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
