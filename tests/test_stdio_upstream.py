"""mcpgw.upstream.stdio.StdioUpstream against a fake process reactor (no real children, no real time)."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet.error import ProcessDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import StdioServer
from mcpgw.upstream import stdio
from mcpgw.upstream.stdio import StdioUpstream
from tests.fake_process import FakeProcessReactor, FakeProcessTransport, LogCapture

MESSAGE = b'{"jsonrpc":"2.0","id":1,"result":{"ok":true}}'


class RecordingDelegate:
    """An UpstreamDelegate that keeps every call."""

    #: Large lines fully decoded (a test sets it to take them as jsonrpc.route_view gives them).
    routes_on_view = False

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, dict[str, Any]]] = []
        self.errors: list[str] = []
        self.ended: list[str] = []

    def upstreamMessage(self, raw: bytes, msg: dict[str, Any]) -> None:
        self.messages.append((raw, msg))

    def upstreamProtocolError(self, reason: str) -> None:
        self.errors.append(reason)

    def upstreamEnded(self, reason: str) -> None:
        self.ended.append(reason)


def server_config(**kw: Any) -> StdioServer:
    options: dict[str, Any] = {"name": "time", "command": "time-server", "executable": "/opt/bin/time-server"}
    options.update(kw)
    return StdioServer(**options)


class UpstreamTestCase(SynchronousTestCase):
    """A spawned StdioUpstream on a FakeProcessReactor; os.killpg recorded, never real."""

    setsid: str | None = "/usr/bin/setsid"

    def setUp(self) -> None:
        self.killpg: list[tuple[int, int]] = []
        self.patch(stdio, "_SETSID", self.setsid)
        self.patch(stdio.os, "killpg", lambda pid, sig: self.killpg.append((pid, sig)))
        self.logs = LogCapture(self)
        self.reactor = FakeProcessReactor()
        self.delegate = RecordingDelegate()
        self.upstream = self.make()

    def make(self, **kw: Any) -> StdioUpstream:
        upstream = StdioUpstream(server_config(**kw), self.delegate, self.reactor)
        upstream.spawn()
        return upstream

    @property
    def child(self) -> FakeProcessTransport:
        return self.reactor.spawned[-1]


class SpawnTests(UpstreamTestCase):
    def test_argvUnderSetsid(self) -> None:
        """With setsid available the child runs as ``setsid EXECUTABLE ARGS`` (its own process group)."""
        upstream = self.make(args=("--tz", "UTC"))
        self.assertEqual(self.child.args, ["/usr/bin/setsid", "/opt/bin/time-server", "--tz", "UTC"])
        self.assertEqual(self.child.executable, "/usr/bin/setsid")
        self.assertIs(self.child.proto, upstream)

    def test_argvWithoutSetsid(self) -> None:
        """Without setsid the resolved executable is spawned directly."""
        self.patch(stdio, "_SETSID", None)
        self.make(args=("-v",))
        self.assertEqual(self.child.args, ["/opt/bin/time-server", "-v"])

    def test_environment(self) -> None:
        """The child gets the server's env but none of the gateway's private variables."""
        self.patch(stdio.os, "environ", {"PATH": "/bin", "SESSION_SECRET": "s", "REDIS_PASSWORD": "p", "HOME": "/h"})
        self.make(env={"TZ": "UTC"}, cwd="/tmp")
        self.assertEqual(self.child.env, {"PATH": "/bin", "HOME": "/h", "TZ": "UTC"})
        self.assertEqual(self.child.path, "/tmp")

    def test_pidRecorded(self) -> None:
        """connectionMade records the child's pid and logs the start with the server name."""
        self.assertEqual(self.upstream.pid, self.child.pid)
        self.assertTrue(self.logs.matching(server="time", pid=self.child.pid, log_format="child {server} started pid={pid}"))


class ChildOutputTests(UpstreamTestCase):
    def test_messageReachesDelegate(self) -> None:
        """A JSON line reaches the delegate raw (without newline) and parsed."""
        self.upstream.outReceived(MESSAGE + b"\n")
        self.assertEqual(self.delegate.messages, [(MESSAGE, {"jsonrpc": "2.0", "id": 1, "result": {"ok": True}})])

    def test_messageSplitAcrossReads(self) -> None:
        """A message that arrives in pieces is delivered once, whole."""
        self.upstream.outReceived(MESSAGE[:10])
        self.upstream.outReceived(MESSAGE[10:] + b"\n")
        self.assertEqual([raw for raw, _ in self.delegate.messages], [MESSAGE])

    def test_nonJsonDropped(self) -> None:
        """A line that is not JSON is dropped and logged with server, pid and size."""
        self.upstream.outReceived(b"Starting server...\n" + MESSAGE + b"\n")
        self.assertEqual([raw for raw, _ in self.delegate.messages], [MESSAGE])
        [event] = self.logs.formats("not JSON")
        self.assertEqual((event["server"], event["pid"], event["size"]), ("time", self.child.pid, 18))
        self.assertEqual(event["log_level"].name, "warn")

    def test_invalidUtf8Dropped(self) -> None:
        """A line that is not UTF-8 is dropped like any non-JSON line."""
        self.upstream.outReceived(b'"\xff\xfe"\n')
        self.assertEqual(self.delegate.messages, [])
        self.assertEqual(len(self.logs.formats("not JSON")), 1)

    def test_nonObjectDropped(self) -> None:
        """JSON that is not an object (an array, a number) is dropped and logged."""
        self.upstream.outReceived(b"[1,2]\n42\n")
        self.assertEqual(self.delegate.messages, [])
        self.assertEqual(len(self.logs.formats("non-object")), 2)

    def test_largeLineRoutedOnAView(self) -> None:
        """A large line reaches a delegate that routes on views (the Session) with its payload
        undecoded, in 64 KiB reads; any other delegate gets it fully decoded."""
        from mcpgw import jsonrpc

        line = b'{"jsonrpc":"2.0","id":9,"result":{"text":"' + b"a" * (1 << 20) + b'"}}'
        self.delegate.routes_on_view = True
        for i in range(0, len(line), 65536):
            self.upstream.outReceived(line[i:i + 65536])
        self.upstream.outReceived(b"\n")
        [(raw, msg)] = self.delegate.messages
        self.assertEqual(raw, line)
        self.assertEqual((msg["id"], msg["jsonrpc"]), (9, "2.0"))
        self.assertIsInstance(msg["result"], jsonrpc.Undecoded)
        self.assertEqual(jsonrpc.decoded(msg["result"]), {"text": "a" * (1 << 20)})
        self.delegate.routes_on_view = False
        self.upstream.outReceived(line + b"\n")
        self.assertEqual(self.delegate.messages[1][1]["result"], {"text": "a" * (1 << 20)})

    def test_largeMalformedLineDropped(self) -> None:
        """A large line whose structure is broken is not relayed; the request it answers (its id is
        in the line's head) gets a JSON-RPC error instead (tests/test_hostile_child_reply.py)."""
        self.delegate.routes_on_view = True
        self.upstream.outReceived(b'{"jsonrpc":"2.0","id":9,"result":"' + b"a" * 100_000 + b"\n")
        [(_, msg)] = self.delegate.messages
        self.assertEqual((msg["id"], msg["error"]["code"]), (9, -32603))
        self.assertEqual(len(self.logs.formats("not JSON")), 1)

    def test_overlongLine(self) -> None:
        """A line longer than maxMessageBytes is a protocol error naming the limit, reported once."""
        upstream = self.make(maxMessageBytes=32)
        upstream.outReceived(b"x" * 33)
        upstream.outReceived(b"y" * 40 + b"\n")
        self.assertEqual(self.delegate.errors, ["message from the MCP server exceeds 32 bytes"])
        [event] = self.logs.formats("{reason}")
        self.assertEqual((event["server"], event["pid"], event["log_level"].name), ("time", upstream.pid, "error"))

    def test_stderrLogged(self) -> None:
        """Each stderr line is logged with the server name, the pid and stderr=True."""
        self.upstream.errReceived(b"warming up\nrea")
        self.upstream.errReceived(b"dy\n")
        events = self.logs.matching(stderr=True)
        self.assertEqual([e["line"] for e in events], ["warming up", "ready"])
        self.assertEqual({(e["server"], e["pid"]) for e in events}, {("time", self.child.pid)})

    def test_stderrUndecodable(self) -> None:
        """Undecodable stderr bytes are logged with replacement characters, not an exception."""
        self.upstream.errReceived(b"bad \xff byte\n")
        [event] = self.logs.matching(stderr=True)
        self.assertEqual(event["line"], "bad \ufffd byte")

    def test_stderrNeverReachesDelegate(self) -> None:
        """A JSON line on stderr is only logged, never relayed."""
        self.upstream.errReceived(MESSAGE + b"\n")
        self.assertEqual(self.delegate.messages, [])

    def test_lastLineFlushedAtExit(self) -> None:
        """A last stdout line without newline is delivered when the child exits, before upstreamEnded."""
        order: list[str] = []
        self.delegate.upstreamMessage = lambda raw, msg: order.append("message")  # type: ignore[method-assign]
        self.delegate.upstreamEnded = lambda reason: order.append("ended")  # type: ignore[method-assign]
        self.upstream.outReceived(MESSAGE)
        self.child.exit(0)
        self.assertEqual(order, ["message", "ended"])


class SendTests(UpstreamTestCase):
    def test_sendWritesLine(self) -> None:
        """send() writes the raw message and one newline, and returns True."""
        self.assertTrue(self.upstream.send(MESSAGE))
        self.assertEqual(self.child.written, [MESSAGE + b"\n"])

    def direct(self) -> tuple[_PipeWriter, int]:
        import os

        r, w = os.pipe()
        os.set_blocking(w, False)
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        writer = _PipeWriter(w)
        self.upstream._stdin = writer
        return writer, r

    def test_sendStraightIntoThePipe(self) -> None:
        """With nothing queued, a message goes straight into the child's stdin (no transport write)."""
        import os

        writer, r = self.direct()
        self.assertTrue(self.upstream.send(MESSAGE))
        self.assertEqual(os.read(r, 4096), MESSAGE + b"\n")
        self.assertEqual((writer.written, self.child.written), ([], []))

    def test_sendToAFullPipeIsQueued(self) -> None:
        """A pipe that takes nothing (the child is not reading): the message is queued whole."""
        import os

        writer, r = self.direct()
        try:
            while True:
                os.write(writer.fd, b"x" * 65536)
        except BlockingIOError:
            pass
        self.assertTrue(self.upstream.send(MESSAGE))
        self.assertEqual(writer.written, [MESSAGE + b"\n"])

    def test_sendBehindQueuedDataKeepsOrder(self) -> None:
        """With data already queued, a message goes behind it through the transport."""
        writer, _ = self.direct()
        writer._tempDataLen = 10
        self.assertTrue(self.upstream.send(MESSAGE))
        self.assertEqual(self.child.written, [MESSAGE + b"\n"])

    def test_largeMessageThroughTheTransport(self) -> None:
        """A message of DIRECT_WRITE bytes or more is left to the transport."""
        writer, _ = self.direct()
        big = b"x" * stdio.DIRECT_WRITE
        self.assertTrue(self.upstream.send(big))
        self.assertEqual(self.child.written, [big + b"\n"])

    def test_sendAfterEnd(self) -> None:
        """send() after the child exited writes nothing and returns False."""
        self.child.exit(0)
        self.assertFalse(self.upstream.send(MESSAGE))
        self.assertEqual(self.child.written, [])

    def test_sendWhileStopping(self) -> None:
        """send() after stop() writes nothing and returns False."""
        self.upstream.stop()
        self.assertFalse(self.upstream.send(MESSAGE))
        self.assertEqual(self.child.written, [])

    def test_sendBeforeSpawn(self) -> None:
        """send() on an upstream that was never spawned returns False."""
        upstream = StdioUpstream(server_config(), self.delegate, self.reactor)
        self.assertFalse(upstream.send(MESSAGE))

    def test_pauseAndResume(self) -> None:
        """pauseProducing/resumeProducing stop and restart reading the child's stdout."""
        self.upstream.pauseProducing()
        self.assertTrue(self.child.paused)
        self.upstream.resumeProducing()
        self.assertFalse(self.child.paused)


class StopTests(UpstreamTestCase):
    def test_closesStdinAtOnce(self) -> None:
        """stop() closes the child's stdin at once and sends no signal yet."""
        d = self.upstream.stop()
        self.assertEqual(self.child.stdinClosed, 1)
        self.assertEqual(self.killpg, [])
        self.assertNoResult(d)

    def test_sigtermAfterGrace(self) -> None:
        """SIGTERM goes to the child's process group after stopGrace, not before."""
        upstream = self.make(stopGrace=2.0)
        upstream.stop()
        self.reactor.advance(1.999)
        self.assertEqual(self.killpg, [])
        self.reactor.advance(0.001)
        self.assertEqual(self.killpg, [(upstream.pid, signal.SIGTERM)])

    def test_sigkillAfterTwiceGrace(self) -> None:
        """SIGKILL follows at 2 * stopGrace; the Deferred is still waiting for the exit."""
        upstream = self.make(stopGrace=2.0)
        d = upstream.stop()
        self.reactor.advance(3.999)
        self.assertEqual(self.killpg, [(upstream.pid, signal.SIGTERM)])
        self.reactor.advance(0.001)
        self.assertEqual(self.killpg, [(upstream.pid, signal.SIGTERM), (upstream.pid, signal.SIGKILL)])
        self.assertNoResult(d)

    def test_signalsLogged(self) -> None:
        """Each signal sent is logged by name with server and pid."""
        self.upstream.stop()
        self.reactor.advance(2 * self.upstream.server.stopGrace)
        events = self.logs.formats("sending {sig}")
        self.assertEqual([(e["server"], e["pid"], e["sig"]) for e in events],
                         [("time", self.child.pid, "SIGTERM"), ("time", self.child.pid, "SIGKILL")])

    def test_firesAtProcessEnded(self) -> None:
        """The stop() Deferred fires only when processEnded arrives."""
        d = self.upstream.stop()
        self.reactor.advance(10)
        self.assertNoResult(d)
        self.child.exit(signal=signal.SIGKILL)
        self.assertIsNone(self.successResultOf(d))

    def test_earlyExitCancelsTimers(self) -> None:
        """A child that exits within the grace period gets no signal; the timers are cancelled."""
        d = self.upstream.stop()
        self.child.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        sent = list(self.killpg)
        self.reactor.advance(10)
        self.assertEqual(self.killpg, sent)
        self.assertNotIn(signal.SIGTERM, [sig for _, sig in sent])

    def test_groupKilledAtExit(self) -> None:
        """At exit the child's process group gets SIGKILL (grandchildren may outlive the leader)."""
        pid = self.child.pid
        self.child.exit(0)
        self.assertIn((pid, signal.SIGKILL), self.killpg)
        self.assertEqual({sig for _, sig in self.killpg}, {signal.SIGKILL})

    def test_groupKilledWhenLeaderExits(self) -> None:
        """processExited (the child reaped, pipes maybe still open) kills the group but does not end the upstream yet."""
        pid = self.child.pid
        self.upstream.processExited(Failure(ProcessDone(0)))
        self.assertEqual(self.killpg, [(pid, signal.SIGKILL)])
        self.assertEqual(self.delegate.ended, [])
        self.assertFalse(self.upstream.ended)

    def test_stopTwice(self) -> None:
        """A second stop() closes stdin once, schedules no more timers, and both Deferreds fire at exit."""
        d1 = self.upstream.stop()
        d2 = self.upstream.stop()
        self.assertEqual(self.child.stdinClosed, 1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 2)
        self.child.exit(0)
        self.successResultOf(d1)
        self.successResultOf(d2)

    def test_stopAfterExit(self) -> None:
        """stop() after the child exited fires at once and touches nothing."""
        self.child.exit(0)
        self.successResultOf(self.upstream.stop())
        self.assertEqual(self.child.stdinClosed, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class StopWithoutSetsidTests(UpstreamTestCase):
    setsid = None

    def test_signalsViaTransport(self) -> None:
        """Without setsid, TERM then KILL go through the process transport, and no killpg is used."""
        self.upstream.stop()
        self.reactor.advance(2 * self.upstream.server.stopGrace)
        self.assertEqual(self.child.signals, [signal.SIGTERM, signal.SIGKILL])
        self.child.exit(signal=signal.SIGKILL)
        self.assertEqual(self.killpg, [])

    def test_signalAfterExitIgnored(self) -> None:
        """ProcessExitedAlready from the transport is swallowed."""
        self.upstream.stop()
        self.child.pid = None  # exited, processEnded not yet delivered
        self.reactor.advance(2 * self.upstream.server.stopGrace)
        self.assertEqual(self.child.signals, [])


class ProcessEndedTests(UpstreamTestCase):
    def test_exitZero(self) -> None:
        """A clean exit reaches the delegate as 'exited with status 0'."""
        self.child.exit(0)
        self.assertEqual(self.delegate.ended, ["exited with status 0"])
        self.assertTrue(self.upstream.ended)

    def test_exitStatus(self) -> None:
        """A non-zero exit status is reported."""
        self.child.exit(3)
        self.assertEqual(self.delegate.ended, ["exited with status 3"])
        self.assertEqual(self.upstream.exit_reason, "exited with status 3")

    def test_killedBySignal(self) -> None:
        """Death by signal is reported with the signal number."""
        self.child.exit(signal=9)
        self.assertEqual(self.delegate.ended, ["killed by signal 9"])

    def test_exitLogged(self) -> None:
        """The exit is logged with server, pid, how and the child's lifetime from the reactor clock."""
        self.reactor.advance(2.5)
        pid = self.child.pid
        self.child.exit(0)
        [event] = self.logs.formats("after {duration")
        self.assertEqual((event["server"], event["pid"], event["how"], event["duration"]),
                         ("time", pid, "exited with status 0", 2.5))

    def test_statusAndSignalLogged(self) -> None:
        """The exit's status and signal are fields of the log event (None when there is none)."""
        self.child.exit(3)
        upstream = self.make()
        self.child.exit(signal=15)
        first, second = self.logs.formats("after {duration")
        self.assertEqual((first["status"], first["signal"], first["requested"]), (3, None, False))
        self.assertEqual((second["status"], second["signal"]), (None, 15))
        self.assertEqual(upstream.exit_reason, "killed by signal 15")

    def test_crashesCounted(self) -> None:
        """The server's activity counts a child that exited unasked as a crash; one the gateway
        stopped is not counted."""
        activity = stdio.ServerActivity()
        self.upstream.activity = activity
        self.child.exit(3)
        stopped = self.make()
        stopped.activity = activity
        stopped.stop()
        self.child.exit(0)
        self.assertEqual((activity.starts, activity.crashes), (0, 1))  # starts: counted by spawn, set before it


_PROBE = r"""
import json, os, socket, sys
from twisted.internet import reactor
from mcpgw.config import StdioServer
from mcpgw.upstream import stdio

held = [socket.socket(), open(os.devnull), os.pipe()]  # the gateway's own descriptors: not the child's
inherited = os.open(os.devnull, os.O_RDONLY)
os.set_inheritable(inherited, True)  # as if the gateway had been started with it: closed in the child too
child_code = ("import json, os, sys; line = sys.stdin.readline(); "
              "print(json.dumps({'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0), 'line': line, "
              "'fds': sorted(int(f) for f in os.listdir('/proc/self/fd'))}), flush=True); sys.stdin.read()")
server = StdioServer(name="probe", command=sys.executable, executable=sys.executable, args=("-c", child_code))
out = {}

class Delegate:
    def upstreamMessage(self, raw, msg):
        out.update(msg, leader=upstream._own_group)
        upstream.stop()
    def upstreamProtocolError(self, reason):
        reactor.stop()
    def upstreamEnded(self, reason):
        out["ended"] = reason
        reactor.stop()

upstream = stdio.StdioUpstream(server, Delegate(), reactor)
def start():
    upstream.spawn()
    out["direct"] = upstream._stdin is not None
    upstream.send(b'{"jsonrpc":"2.0","method":"hello"}')  # straight into the pipe (nothing queued)

reactor.callWhenRunning(start)
reactor.callLater(20, reactor.stop)
reactor.run()
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.fast_paths
class RealSpawnTests(SynchronousTestCase):
    """A real child on the real reactor (in a subprocess, so this test process's reactor is untouched)."""

    def test_childLeadsItsOwnSessionWithOnlyItsPipes(self) -> None:
        """posix_spawn(setsid=True): the child is its own session and group leader (no ``setsid``
        exec), and of the gateway's descriptors it has only its three pipes; a message sent at once
        is written straight into its stdin and arrives whole."""
        import json
        import subprocess
        import sys

        from mcpgw._fast import process as fast_process

        if not fast_process.can_spawn_leader():
            self.skipTest("no posix_spawn with setsid on this platform (Linux has it)")
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual((out["pgid"], out["sid"]), (out["pid"], out["pid"]))
        self.assertTrue(out["leader"])
        self.assertEqual(out["fds"], [0, 1, 2, 3])  # 3: the listing's own directory descriptor
        self.assertEqual(out["ended"], "exited with status 0")
        self.assertTrue(out["direct"])
        self.assertEqual(out["line"], '{"jsonrpc":"2.0","method":"hello"}\n')


class TuneAllocatorTests(SynchronousTestCase):
    """tune_allocator: glibc's mmap/trim thresholds set once, unless the operator set them."""

    def test_operatorSettingWins(self) -> None:
        self.patch(stdio, "_tuned", None)
        self.assertFalse(stdio.tune_allocator({"MALLOC_MMAP_THRESHOLD_": "131072"}))
        self.assertFalse(stdio.tune_allocator({}))  # decided once per process

    def test_onceOnly(self) -> None:
        self.patch(stdio, "_tuned", None)
        first = stdio.tune_allocator({})
        self.assertEqual(stdio.tune_allocator({}), first)
        import platform

        if platform.libc_ver()[0] == "glibc":
            self.assertTrue(first)


class _PipeWriter:
    """What StdioUpstream.send (mcpgw._fast.process.write_stdin) reads of Twisted's ProcessWriter, on a
    real pipe; ``write`` recorded."""

    def __init__(self, fd: int):
        self.fd = fd
        self._tempDataLen = 0
        self.offset = 0
        self.dataBuffer = b""
        self.connected = 1
        self.disconnecting = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
