"""Twisted's process spawning and pipes, past their public API: three shortcuts for a child that
speaks over stdin and stdout (mcpgw.upstream.stdio).

- :func:`spawn_leader` starts the child with one ``posix_spawnp(..., setsid=True)``: it leads its
  own session and process group without an exec of the ``setsid`` binary first, and only the
  child's three pipes, 0-2 and the inheritable descriptors the gateway was started with are looked
  at (Twisted's own posix_spawn path asks every open descriptor of the gateway for its
  close-on-exec flag: one ``fcntl`` per socket, per spawn). It subclasses Twisted's ``Process``
  (pipes, reaping, the ProcessProtocol calls) and overrides ``_trySpawnInsteadOfFork``, with
  ``_listOpenFDs`` and ``_getFileActions``.
- :func:`tune_pipes` reads the child's stdout PIPE_READ bytes at a time (Twisted's ProcessReader
  reads 8 KiB: a 1 MiB reply is 128 wake-ups of a child blocked on the full pipe; 64 KiB, the
  pipe's capacity, makes it 16), by replacing ``doRead`` of the Process's ``pipes[1]``.
- :func:`write_stdin` writes a message straight into the child's stdin when Twisted has nothing
  queued for it (``ProcessWriter``'s ``_tempDataLen``, ``offset``, ``dataBuffer``): Twisted's
  ``write`` only buffers, and each message would cost an ``epoll_ctl`` to watch the pipe, a reactor
  turn to write it and another ``epoll_ctl``.

:func:`probe` checks, when this module is imported, the exact names and signatures each shortcut
reads against the installed Twisted; a shortcut whose check fails writes one warning line and stays
off. The public paths, taken when a probe fails or the fast paths are off (mcpgw._fast), are
``reactor.spawnProcess`` (the caller runs the child under the ``setsid`` binary), Twisted's own
reads into ``ProcessProtocol.outReceived``, and ``transport.write``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from functools import partial
from typing import Any

from twisted.internet import process as _process
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import PosixReactorBase

from mcpgw import _fast
from mcpgw._fast.probe import Need, first_missing, missing, params, params_start, same_as, sets, uses

#: Bytes per read of a child's stdout (tune_pipes): a pipe's capacity.
PIPE_READ = 65536

#: posix_spawn with POSIX_SPAWN_SETSID (Linux, glibc >= 2.26); not a Twisted matter, so no warning
#: when it is missing. Cleared for good when the C library turns out to lack it (spawn_leader).
_platform_spawn = sys.platform.startswith("linux") and not missing([
    Need(os, "posix_spawnp", "os.posix_spawnp"), Need(os, "POSIX_SPAWN_DUP2", "os.POSIX_SPAWN_DUP2"),
])

#: What the probe found usable in the installed Twisted, one flag per shortcut.
spawn_usable = False
reads_usable = False
stdin_usable = False


# -- the probe -----------------------------------------------------------------------------------

#: What spawn_leader reads: Process's constructor, the spawn hook it overrides (called by ``_fork``,
#: setting ``pid`` and ``status``), and the two module functions it calls.
_SPAWN = (
    Need(_process, "Process.__init__", "Process(reactor, executable, args, environment, path, proto)",
         params_start("self", "reactor", "executable", "args", "environment", "path", "proto")),
    Need(_process, "Process._trySpawnInsteadOfFork",
         "Process._trySpawnInsteadOfFork(self, path, uid, gid, executable, args, environment, kwargs)",
         params("self", "path", "uid", "gid", "executable", "args", "environment", "kwargs")),
    Need(_process, "Process._fork", "Process._fork calling _trySpawnInsteadOfFork", uses("_trySpawnInsteadOfFork")),
    Need(_process, "Process._trySpawnInsteadOfFork", "Process._trySpawnInsteadOfFork setting pid and status",
         uses("pid", "status")),
    Need(_process, "_listOpenFDs", "twisted.internet.process._listOpenFDs()", params()),
    Need(_process, "_getFileActions", "twisted.internet.process._getFileActions(fdState, childToParentFD, doClose, doDup2)",
         params("fdState", "childToParentFD", "doClose", "doDup2")),
)
#: What tune_pipes reads: the Process's pipes, and the reader its stdout gets.
_READS = (
    Need(_process, "Process", "Process.pipes", sets("pipes")),
    Need(_process, "Process.processReaderFactory", "Process.processReaderFactory (ProcessReader)",
         same_as(_process, "ProcessReader")),
    Need(_process, "ProcessReader.doRead", "ProcessReader.doRead(self)", params("self")),
    Need(_process, "ProcessReader.dataReceived", "ProcessReader.dataReceived(self, data)", params("self", "data")),
    Need(_process, "ProcessReader", "ProcessReader.fd", sets("fd")),
)
#: What write_stdin reads: the writer its stdin gets, and that writer's buffers.
_STDIN = (
    Need(_process, "Process", "Process.pipes", sets("pipes")),
    Need(_process, "Process.processWriterFactory", "Process.processWriterFactory (ProcessWriter)",
         same_as(_process, "ProcessWriter")),
    *(Need(_process, "ProcessWriter", f"ProcessWriter.{name}", sets(name))
      for name in ("_tempDataLen", "offset", "dataBuffer", "connected", "disconnecting", "fd")),
    Need(_process, "ProcessWriter.write", "ProcessWriter.write(self, data)", params("self", "data")),
)


def probe() -> bool:
    """Check each shortcut against the installed Twisted; one warning line per shortcut that stays
    off. True when all three may be used (mcpgw._fast.enabled() still decides whether they are)."""
    global spawn_usable, reads_usable, stdin_usable
    found: dict[str, bool] = {}
    for name, what, needs in (
        ("spawn", "starting a child in its own session", _SPAWN),
        ("reads", "reading a child's stdout", _READS),
        ("stdin", "writing to a child's stdin", _STDIN),
    ):
        gone = first_missing(needs)
        found[name] = gone is None
        if gone is not None:
            _fast.probe_failed("Twisted", what, gone)
    spawn_usable, reads_usable, stdin_usable = found["spawn"], found["reads"], found["stdin"]
    return spawn_usable and reads_usable and stdin_usable


# -- starting a child ------------------------------------------------------------------------------

class _NoFdmap(NotImplementedError):
    """Twisted called ``_trySpawnInsteadOfFork`` without the pipes' ``fdmap``."""


#: Descriptors above 2 that the gateway was started with and that are not close-on-exec (a
#: supervisor's, a shell's ``3>file``): listed once, at the first spawn, and closed in every child.
_inherited: list[int] | None = None


def _inherited_fds() -> list[int]:
    global _inherited
    if _inherited is None:
        found = []
        for fd in _process._listOpenFDs():
            if fd > 2:
                try:
                    if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                        found.append(fd)
                except OSError:
                    pass
        _inherited = found
    return _inherited


class _LeaderProcess(_process.Process):
    """Twisted's ``Process`` started by one ``posix_spawnp(..., setsid=True)``.

    Every descriptor the gateway opens itself is close-on-exec (PEP 446: Python's sockets, pipes,
    files and epoll are created non-inheritable; so are Twisted's), so the file actions cover only
    the child's pipes (made its 0-2), the gateway's own 0-2 and the inheritable descriptors it was
    started with (``_inherited_fds``, listed once): the child gets its pipes and nothing else.
    """

    def _trySpawnInsteadOfFork(self, path: Any, uid: Any, gid: Any, executable: Any, args: Any, environment: Any,
                               kwargs: Any) -> bool:
        if uid is not None or gid is not None:
            return False  # spawn_leader is never asked to switch accounts; Twisted's fork path does
        fdmap = kwargs.get("fdmap")
        if fdmap is None:
            raise _NoFdmap("Process._fork(..., fdmap=...)")
        if path is None:
            self._spawn(executable, args, environment, fdmap)
            return True
        # O_PATH: the gateway's directory needs no read permission to be returned to.
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # posix_spawn has no chdir action here (Python 3.11): the child inherits the directory
            # the gateway is in at the spawn, so the gateway stands in ``path`` for the spawn only.
            # The reactor thread is the only one that spawns or uses relative paths.
            os.chdir(path)
            try:
                self._spawn(executable, args, environment, fdmap)
            finally:
                os.fchdir(here)
        finally:
            os.close(here)
        return True

    def _spawn(self, executable: Any, args: Any, environment: Any, fdmap: dict[int, int]) -> None:
        state = [(fd, False) for fd in _inherited_fds()]  # closed in the child (a later entry for a reused number wins)
        for fd in {0, 1, 2, *fdmap.values()}:
            try:
                state.append((fd, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)))
            except OSError:
                pass
        self.pid = os.posix_spawnp(
            executable, args, environment,
            file_actions=_process._getFileActions(state, fdmap, doClose=os.POSIX_SPAWN_CLOSE, doDup2=os.POSIX_SPAWN_DUP2),
            setsigdef=[s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN],
            setsid=True,
        )
        self.status = -1


def can_spawn_leader() -> bool:
    """Whether spawn_leader may start children here (platform, probe and switch)."""
    return _platform_spawn and spawn_usable and _fast.enabled()


def spawn_leader(reactor: Any, proto: Any, argv: list[str], env: dict[str, str], path: str) -> bool:
    """Start ``argv`` in ``path`` as the leader of its own session and process group, connected to
    ``proto`` (a ProcessProtocol). True when started; False when this shortcut is not available
    (the fast paths are off, the probe failed, the platform or C library lacks posix_spawn with
    setsid, or ``reactor`` is not Twisted's POSIX reactor): the caller spawns through
    ``reactor.spawnProcess`` instead."""
    global _platform_spawn, spawn_usable
    if not (can_spawn_leader() and isinstance(reactor, PosixReactorBase)):
        return False
    try:
        _LeaderProcess(reactor, argv[0], argv, env, path, proto)
    except _NoFdmap as e:
        spawn_usable = False
        _fast.probe_failed("Twisted", "starting a child in its own session", str(e))
        return False
    except NotImplementedError:  # a C library without POSIX_SPAWN_SETSID (glibc < 2.26)
        _platform_spawn = False
        return False
    return True


# -- the child's pipes -----------------------------------------------------------------------------

def _read_pipe(reader: Any) -> Any:
    """``ProcessReader.doRead`` (``fdesc.readFromFD``) with PIPE_READ-sized reads."""
    try:
        data = os.read(reader.fd, PIPE_READ)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EINTR):
            return None
        return CONNECTION_LOST
    if not data:
        return CONNECTION_DONE
    reader.dataReceived(data)
    return None


def _read_whole_pipe(reader: Any) -> None:
    # This instance only: the reactor calls ``doRead`` by name on the descriptor it watches.
    reader.doRead = partial(_read_pipe, reader)


def tune_pipes(transport: Any) -> Any:
    """Take over what the shortcuts allow of a started child's pipes (from ``connectionMade``):
    stdout read PIPE_READ bytes at a time; returns its stdin writer for :func:`write_stdin`, or None
    (the transport's ``write`` only)."""
    if not _fast.enabled():
        return None
    if not isinstance(transport, _process.Process):
        return None  # a test's stand-in, or a PTY process: Twisted's own reads and writes
    pipes = transport.pipes
    reader = pipes.get(1)
    if reads_usable and isinstance(reader, _process.ProcessReader):
        _read_whole_pipe(reader)
    writer = pipes.get(0)
    if stdin_usable and isinstance(writer, _process.ProcessWriter):
        return writer
    return None


def write_stdin(writer: Any, data: bytes) -> bool:
    """Write ``data`` and a newline into the child's stdin pipe when nothing is queued before it
    (``writer`` from :func:`tune_pipes`); what the pipe does not take is queued behind. False when
    something is queued or the pipe is closing: the caller writes through the transport."""
    if writer._tempDataLen or writer.offset != len(writer.dataBuffer) or not writer.connected or writer.disconnecting:
        return False
    line = data + b"\n"
    try:
        written = os.write(writer.fd, line)
    except OSError:  # full (EAGAIN), or the child is gone: the transport finds out and reports it
        written = 0
    if written < len(line):
        writer.write(line[written:] if written else line)
    return True


probe()
