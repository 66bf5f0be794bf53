"""The stdio side: one child MCP server speaking newline-delimited JSON-RPC.

Framing follows LineOnlyReceiver (explicit delimiter, maximum length) but keeps
chunks in a list so a 16 MiB line costs one join, not a quadratic rebuild.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw import jsonrpc, logs, procsec
from mcpgw._fast import process as fast_process
from mcpgw.config import PRIVATE_ENV, StdioServer
from mcpgw.interfaces import IUpstream, IUpstreamDelegate, upstream_kind
from mcpgw.metrics import NULL_BOUND, BoundMetrics
from mcpgw.upstream.stdin import StdinGate

#: Variables a child gets from the gateway's environment when they are set (and LC_*).
_BASE_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ")
_SETSID = shutil.which("setsid")

#: Messages shorter than this are written to a child's stdin at once when nothing is queued (send).
DIRECT_WRITE = 65536


#: glibc malloc settings for relaying large messages (``tune_allocator``).
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
_tuned: bool | None = None


def tune_allocator(environ: Any = os.environ) -> bool:
    """Keep the buffers of large messages on the heap (glibc only; once per process).

    glibc serves every allocation over its (dynamic) mmap threshold with a fresh ``mmap`` and
    trims the heap's top above twice that: each of the several MiB-sized buffers a 1 MiB
    round trip allocates (the body, the decoded payload, the child's line, the transport's
    joins) would be a new mapping whose pages the kernel faults in and zeroes, most of the
    system time of a large round trip (docs/performance.md). With these thresholds freed memory
    is reused instead; at most MALLOC_TRIM_THRESHOLD of free heap is kept. An
    operator's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ take precedence.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _tuned = bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
    return _tuned


def child_environment(server: StdioServer, environ: Any) -> dict[str, str]:
    """A minimal, explicit environment: PATH, HOME, locale and TZ if set, the server's
    ``inheritEnv`` names, then its ``env``. Nothing else of the gateway's (its secrets,
    tokens, REDIS_PASSWORD) reaches a child."""
    env = {k: v for k, v in environ.items() if (k in _BASE_ENV or k.startswith("LC_")) and k not in PRIVATE_ENV}
    env.setdefault("PATH", os.defpath)
    for name in server.inheritEnv:
        if name in environ and name not in PRIVATE_ENV:
            env[name] = environ[name]
    env.update(server.env)
    return env


#: The directory that holds the children's own working directories (``_fresh_cwd``), made at the
#: first spawn and removed when the reactor shuts down (twistd ends by re-raising SIGTERM: no
#: ``atexit``) or, failing that, when the interpreter exits.
_cwd_parent: str | None = None


def _fresh_cwd(owner: tuple[int, int] | None, reactor: Any = None) -> str:
    """A new empty directory for one child to start in (mode 0700; owned by ``owner`` (uid, gid)
    when the child runs as another account). Never the gateway's own directory, which may hold
    its config file and anything else the gateway was started beside."""
    global _cwd_parent
    if _cwd_parent is None or not os.path.isdir(_cwd_parent):
        _cwd_parent = tempfile.mkdtemp(prefix="mcpgw-children-")
        # Other accounts (``user``) may pass through to their own directory, not list the others.
        os.chmod(_cwd_parent, 0o711)
        atexit.register(shutil.rmtree, _cwd_parent, True)
        if IReactorCore.providedBy(reactor):  # a test's Clock has no shutdown to hook
            reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, _cwd_parent, True)
    path = tempfile.mkdtemp(prefix="cwd-", dir=_cwd_parent)
    if owner is not None:
        os.chown(path, *owner)
    return path


# -- a child's line that cannot be parsed --------------------------------------------------------

#: Bytes of an unparsable line's head scanned for its top-level ``id``, ``result``, ``error`` and
#: ``method`` keys; and bytes of its tail searched for a final ``"id": ...}``.
HEAD_SCAN = 4096
TAIL_SCAN = 512
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]|"', re.S)
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_ID_VALUE = re.compile(rb'-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_TAIL_ID = re.compile(rb'[,{][ \t\r\n]*"id"[ \t\r\n]*:[ \t\r\n]*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|"[^"\\]*(?:\\.[^"\\]*)*")'
                      rb'[ \t\r\n]*\}[ \t\r\n]*\Z', re.S)


class UnreadableReply(dict[str, Any]):
    """The JSON-RPC error the gateway answers in place of a child's reply that cannot be parsed
    (the session counts it as ``upstream_protocol``, not as the server's own ``upstream_error``)."""


def _id_value(raw: bytes) -> Any:
    try:
        value = jsonrpc.loads(raw)
    except (jsonrpc.DecodeError, ValueError):
        return None
    return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def reply_id(line: bytes, whole: bool) -> Any:
    """The request id a line that cannot be parsed answers, or None when it is not recognisably a
    response (JSON-RPC 2.0 section 5: a top-level ``result`` or ``error`` and no ``method``).

    The top-level members in the first HEAD_SCAN bytes are walked (strings and brackets only, so a
    nested ``"id"`` is not taken for the reply's); with ``whole`` (the line is complete: it broke
    on a byte or on nesting depth, not by ending early) an ``"id": ...}`` that closes the line is
    taken too (serializers that write ``id`` last: the TypeScript SDK's ``{result, jsonrpc, id}``).
    """
    head = line[:HEAD_SCAN]
    start = len(head) - len(head.lstrip())
    if not head.startswith(b"{", start):
        return None
    depth = 0
    found: Any = None
    response = False
    for m in _TOKEN.finditer(head, start):
        token = m.group()
        c = token[0]
        if c == 0x7B or c == 0x5B:
            depth += 1
        elif c == 0x7D or c == 0x5D:
            depth -= 1
            if depth <= 0:
                break
        elif token == b'"':  # a string the head cuts short
            break
        elif depth == 1:
            colon = _COLON.match(head, m.end())
            if colon is None:
                continue  # a value, not a member name
            if token == b'"method"':
                return None  # a request or notification from the server: not an answer to the client
            if token == b'"result"' or token == b'"error"':
                response = True
            elif token == b'"id"' and found is None:
                value = _ID_VALUE.match(head, colon.end())
                if value is not None:
                    found = _id_value(value.group())
    if found is None and whole:
        tail = _TAIL_ID.search(line, max(0, len(line) - TAIL_SCAN))
        if tail is not None:
            found = _id_value(tail.group(1))
    return found if response else None


def _whole(line: bytes, exc: Exception) -> bool:
    """Whether the parser failed inside ``line`` (a bad byte, nesting too deep), not at its end."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    return isinstance(exc, json.JSONDecodeError) and exc.pos < len(line) - 1


class ServerActivity:
    """What one server's children did, across sessions, for the admin API: the last
    ``max_lines`` stderr lines (a bounded ring), children started, children that exited unasked
    (``crashes``: a per-session child is never started again, its client re-initializes)."""

    def __init__(self, max_lines: int = 50, max_line_length: int = 2000):
        self.stderr: deque[dict[str, Any]] = deque(maxlen=max_lines)
        self.max_line_length = max_line_length
        self.starts = 0
        self.crashes = 0

    def line(self, when: float, pid: int | None, text: str) -> None:
        self.stderr.append({"time": when, "pid": pid, "line": text[: self.max_line_length]})


class LineFramer:
    """Split a byte stream into lines of at most ``max_length`` bytes."""

    def __init__(self, max_length: int, line: Callable[[bytes], None], overflow: Callable[[int], None]):
        self._max = max_length
        self._line = line
        self._overflow = overflow
        self._chunks: list[bytes | memoryview] = []
        self._pending = 0
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken or not data:
            return
        nl = data.find(b"\n")
        if nl < 0:
            self._chunks.append(data)
            self._pending += len(data)
            if self._too_long(self._pending, data):
                self._break(self._pending)
            return
        start = 0
        if self._chunks:
            # The line that was waiting ends in this read: one join of its pieces (a memoryview of
            # this read's part, so a 1 MiB line read in 16 pieces is copied once, not twice).
            self._chunks.append(memoryview(data)[:nl])
            line = b"".join(self._chunks)
            self._chunks = []
            self._pending = 0
            if not self._deliver(line):
                return
            start = nl + 1
            nl = data.find(b"\n", start)
        while nl >= 0:
            if not self._deliver(data[start:nl]):
                return
            start = nl + 1
            nl = data.find(b"\n", start)
        if start < len(data):
            rest = data[start:] if start else data
            self._chunks = [rest]
            self._pending = len(rest)
            if self._too_long(self._pending, rest):
                self._break(self._pending)
        else:
            self._pending = 0

    def _deliver(self, line: bytes) -> bool:
        """Hand one line on (without its CR, unless blank); False once the framer is broken."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max:
            self._break(len(line))
            return False
        # isspace() stops at the first non-blank byte; strip() would copy a line with blank ends.
        if line and not line.isspace():
            self._line(line)
        return not self.broken

    def flush(self) -> None:
        """Deliver a last line that had no newline (the child exited)."""
        if self._chunks and not self.broken:
            line = b"".join(self._chunks)
            self._chunks = []
            self._pending = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                self._line(line)

    def _too_long(self, pending: int, tail: bytes) -> bool:
        # The CR of a CRLF whose LF has not arrived yet does not count.
        return pending > self._max + (1 if tail.endswith(b"\r") else 0)

    def _break(self, length: int) -> None:
        self.broken = True
        self._chunks = []
        self._pending = 0
        self._overflow(length)


@upstream_kind("stdio")
@implementer(IUpstream)
class StdioUpstream(ProcessProtocol):
    """A child process for one session; relays raw lines both ways."""

    log = Logger(observer=logs.observer)
    #: Twisted's Process (an IProcessTransport that is also the IPushProducer of the child's
    #: stdout) or a test's stand-in; None until the child is started.
    transport: Any = None
    #: Child process gauges (set by the Session); ``_counted`` while this child is in them.
    metrics: BoundMetrics = NULL_BOUND
    _counted = False
    #: The server's activity record (set by the SessionManager; None: not kept).
    activity: ServerActivity | None = None
    #: The child leads its own process group (signals and the final kill go to the group).
    _own_group = False
    #: spawn() has started the child (a lazily started legacy SSE session's has not, until its first message).
    spawned = False
    #: The child's stdin for direct writes (send, mcpgw._fast.process.write_stdin); None: only the transport.
    _stdin: Any = None
    #: The directory made for the child to start in (``_fresh_cwd``), removed when it has ended.
    _own_cwd: str | None = None
    #: The child's ``procsec.TAG_VARIABLE`` value (the EscapeGuard finds its escaped helpers by it).
    _tag: str | None = None
    #: The child's descendants (``procsec.snapshot``) when it was asked to stop; killed once it has exited.
    _tree: list[tuple[int, int]] = []

    def __init__(self, server: StdioServer, delegate: IUpstreamDelegate, reactor: Any):
        self.server = server
        self.delegate = delegate
        self._reactor = reactor
        self.pid: int | None = None
        self.ended = False
        self.exit_reason = ""
        self._stopping = False
        self._waiters: list[defer.Deferred[None]] = []
        self._timers: list[Any] = []
        self._out = LineFramer(server.maxMessageBytes, self._outLine, self._outOverflow)
        self._err = LineFramer(64 * 1024, self._errLine, lambda n: None)
        self.started_at = reactor.seconds()
        #: Over its high-water mark while the child does not read its stdin (mcpgw.upstream.stdin).
        self.stdin_gate = StdinGate()

    # -- spawning ---------------------------------------------------------

    def spawn(self) -> None:
        """Start the child in its own process group (so stop reaches its whole tree), in its
        ``cwd`` or a fresh empty directory, as its ``user`` / ``group`` when they are set."""
        reactor: IReactorProcess = self._reactor
        executable = self.server.executable
        # The child starts elsewhere than the gateway: a path relative to the gateway's directory is made whole.
        argv = [executable if os.path.isabs(executable) else os.path.abspath(executable), *self.server.args]
        env = child_environment(self.server, os.environ)
        uid = gid = None
        if self.server.user is not None:
            uid, gid, home = procsec.account(self.server.user, self.server.group)
            if (uid, gid) == (os.geteuid(), os.getegid()):
                uid = gid = None  # already that account: nothing to switch
            elif home is not None:
                env["HOME"] = home
        guard = procsec.guard()
        if guard is not None:
            self._tag = env[procsec.TAG_VARIABLE] = guard.new_tag()
        cwd = self.server.cwd
        if cwd is None:
            cwd = self._own_cwd = _fresh_cwd(None if uid is None or gid is None else (uid, gid), reactor)
        try:
            self._start(reactor, argv, env, cwd, uid, gid)
        except BaseException:
            self._remove_cwd()
            raise
        self.spawned = True
        self._counted = True
        self.metrics.child_started()
        if self.activity is not None:
            self.activity.starts += 1

    def _start(self, reactor: Any, argv: list[str], env: dict[str, str], cwd: str, uid: int | None, gid: int | None) -> None:
        # One posix_spawn that makes the child its own session leader (mcpgw._fast.process), when
        # the fast paths allow it and the child keeps the gateway's account.
        if uid is None and fast_process.spawn_leader(reactor, self, argv, env, cwd):
            self._own_group = True
            return
        # Another account (posix_spawn cannot switch: Twisted forks, switches and execs), the fast
        # paths off, another platform, or a test's reactor: the public spawnProcess.
        if _SETSID:
            argv = [_SETSID, *argv]
        self._own_group = bool(_SETSID)
        if uid is None:
            reactor.spawnProcess(self, argv[0], argv, env=env, path=cwd)
        else:
            reactor.spawnProcess(self, argv[0], argv, env=env, path=cwd, uid=uid, gid=gid)

    def _remove_cwd(self) -> None:
        """Remove the directory made for the child (what it left there too, off the reactor thread)."""
        path, self._own_cwd = self._own_cwd, None
        if path is None:
            return
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            if not IReactorThreads.providedBy(self._reactor):  # a test's reactor: no threads to hand it to
                shutil.rmtree(path, ignore_errors=True)
                return
            from twisted.internet.threads import deferToThreadPool

            d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutil.rmtree, path)
            d.addErrback(lambda f: self.log.warn("child {server}: cannot remove {path}: {error}",
                                                 server=self.server.name, path=path, error=f.getErrorMessage()))

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        # Larger reads of stdout, and the stdin pipe for direct writes, where the fast paths allow.
        self._stdin = fast_process.tune_pipes(self.transport)
        self.stdin_gate.register(self.transport)
        self.log.info("child {server} started pid={pid}", server=self.server.name, pid=self.pid)

    # -- child -> gateway -------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self._out.feed(data)

    def _outLine(self, line: bytes) -> None:
        try:
            if len(line) >= jsonrpc.LARGE_MESSAGE and self.delegate.routes_on_view:
                msg = jsonrpc.route_view(line)  # id/method without decoding a large payload
            else:
                msg = jsonrpc.loads(line)
        except (jsonrpc.DecodeError, UnicodeDecodeError, ValueError) as e:
            self._unreadable(line, e)
            return
        if not isinstance(msg, dict):
            self.metrics.error("upstream_protocol")
            self.log.warn("child {server} pid={pid} wrote a non-object message; dropped", server=self.server.name, pid=self.pid)
            return
        self.delegate.upstreamMessage(line, msg)

    def _unreadable(self, line: bytes, exc: Exception) -> None:
        """A line that is not JSON, not UTF-8 (MCP stdio transport: UTF-8 JSON-RPC) or nested too
        deep: if it answers a request (``reply_id``), that request gets a JSON-RPC error now
        rather than at limits.requestTimeout; otherwise it is dropped. Counted as upstream_protocol."""
        self.metrics.error("upstream_protocol")
        text = str(exc)
        why = "invalid UTF-8" if isinstance(exc, UnicodeDecodeError) or "UTF-8" in text else \
            "nested too deep" if "depth" in text or "recursion" in text else "malformed"
        id = reply_id(line, _whole(line, exc))
        if id is None:
            self.log.warn("child {server} pid={pid} wrote a line that is not JSON ({why}, {size} bytes); dropped",
                          server=self.server.name, pid=self.pid, why=why, size=len(line))
            return
        self.log.warn("child {server} pid={pid} answered a request with a line that is not JSON ({why}, {size} bytes): "
                      "the request gets an error", server=self.server.name, pid=self.pid, why=why, size=len(line))
        reply = UnreadableReply(jsonrpc.error(
            id, jsonrpc.INTERNAL_ERROR, f"the MCP server's reply could not be read: {why} JSON"))
        self.delegate.upstreamMessage(jsonrpc.dumps(reply), reply)

    def _outOverflow(self, length: int) -> None:
        reason = f"message from the MCP server exceeds {self.server.maxMessageBytes} bytes"
        self.log.error("child {server} pid={pid}: {reason}", server=self.server.name, pid=self.pid, reason=reason)
        self.delegate.upstreamProtocolError(reason)

    def errReceived(self, data: bytes) -> None:
        self._err.feed(data)

    def _errLine(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self.log.info("[{server} pid={pid}] {line}", server=self.server.name, pid=self.pid, line=text, stderr=True)
        if self.activity is not None:
            self.activity.line(self._reactor.seconds(), self.pid, text)

    # -- gateway -> child -------------------------------------------------

    def send(self, raw: bytes, msg: Any = None) -> bool:
        """Write one message (``msg`` unused: the bytes go as they are); False if the child can no
        longer take input.

        A message under DIRECT_WRITE bytes goes straight into the pipe when nothing is queued
        before it (Twisted's ``write`` only buffers: each message would cost an ``epoll_ctl`` to watch
        the pipe, a reactor turn to write it and another ``epoll_ctl``); what the pipe does not
        take, and everything else, goes through the transport.
        """
        if self.ended or self._stopping or self.transport is None:
            return False
        writer = self._stdin
        if writer is not None and len(raw) < DIRECT_WRITE and fast_process.write_stdin(writer, raw):
            return True
        self.transport.writeSequence([raw, b"\n"])
        return True

    def pauseProducing(self) -> None:
        """Stop reading the child's stdout (a slow client): the pipe fills, the child blocks."""
        if not self.ended and self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.ended and self.transport is not None:
            self.transport.resumeProducing()

    # -- ending ----------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        """Close stdin, SIGTERM the group after a grace period, SIGKILL last.

        The Deferred fires once the child has really exited.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if not self.ended and not self.spawned:  # a lazily started session that never needed its child
            self.ended = True
            self.exit_reason = "never started"
        if self.ended:
            d.callback(None)
            return d
        self._waiters.append(d)
        if not self._stopping:
            self._stopping = True
            # Its descendants now, wherever they moved (setsid): killed with it (processExited).
            self._tree = procsec.snapshot(self.pid)
            if self._counted:
                self.metrics.child_stopping()
            try:
                self.transport.closeStdin()
            except Exception:  # noqa: BLE001 - stdin may be gone already; the signals below still stop the child
                pass
            grace = self.server.stopGrace
            self._timers = [
                self._reactor.callLater(grace, self._signal, signal.SIGTERM),
                self._reactor.callLater(2 * grace, self._signal, signal.SIGKILL),
            ]
        return d

    def _signal(self, sig: int) -> None:
        if self.ended or self.pid is None:
            return
        self.log.info("child {server} pid={pid}: sending {sig}", server=self.server.name, pid=self.pid, sig=signal.Signals(sig).name)
        try:
            if self._own_group:
                os.killpg(self.pid, sig)
            else:
                self.transport.signalProcess(sig)
        except (ProcessLookupError, PermissionError, error.ProcessExitedAlready, OSError):
            pass

    def processExited(self, reason: Failure) -> None:
        """The child itself is gone: end the rest of its group now.

        processEnded waits for every pipe to close; a grandchild that still
        holds the child's stdout or stderr (``sh -c 'helper & exec server'``)
        would otherwise keep the session, and its pending requests, waiting.
        Output already in the pipes is still read.
        """
        self._kill_group()
        self._kill_escaped()

    def processEnded(self, reason: Failure) -> None:
        self._out.flush()
        self._err.flush()
        self.ended = True
        for t in self._timers:
            if t.active():
                t.cancel()
        # Grandchildren (npm exec -> sh -> node) may outlive the leader.
        self._kill_group()
        self._kill_escaped()
        self._remove_cwd()
        value = reason.value
        status = killed_by = None
        if isinstance(value, (error.ProcessDone, error.ProcessTerminated)):  # what Twisted reports an exit with
            status, killed_by = value.exitCode, value.signal
        if isinstance(value, error.ProcessDone):
            self.exit_reason = "exited with status 0"
        elif killed_by:
            self.exit_reason = f"killed by signal {killed_by}"
        else:
            self.exit_reason = f"exited with status {'?' if status is None else status}"
        duration = self._reactor.seconds() - self.started_at
        if self._counted:
            self._counted = False
            self.metrics.child_exited(self._stopping)
        if self.activity is not None and not self._stopping:
            self.activity.crashes += 1
        self.log.info(
            "child {server} pid={pid} {how} after {duration:.3f}s",
            server=self.server.name, pid=self.pid, how=self.exit_reason, duration=duration,
            status=status, signal=killed_by, requested=self._stopping,
        )
        self.delegate.upstreamEnded(self.exit_reason)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _kill_group(self) -> None:
        if self._own_group and self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def _kill_escaped(self) -> None:
        """Kill what left the child's process group: the descendants listed when it was asked to
        stop, and the processes re-parented to the gateway that carry its tag (mcpgw.procsec)."""
        tree, self._tree = self._tree, []
        killed = procsec.kill_snapshot(tree) if tree else 0
        guard = procsec.guard()
        if guard is not None and self._tag is not None:
            killed += guard.kill_tagged(self._tag)
            if killed:
                guard.reap_soon()
        if killed:
            self.log.info("child {server} pid={pid}: killed {count} process(es) outside its group",
                          server=self.server.name, pid=self.pid, count=killed)
