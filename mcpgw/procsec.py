"""What a child MCP server can reach of the gateway process, and the processes a child leaves behind.

Linux only (``prctl``, ``/proc``); elsewhere every call here is a no-op and ``harden`` logs one line.

- ``harden`` marks the gateway non-dumpable (``PR_SET_DUMPABLE`` 0: ``/proc/<gateway>/environ``,
  ``mem``, ``fd/``, ``cwd`` and ``ptrace`` are closed to every process without ``CAP_SYS_PTRACE``,
  children of the same user included; ``execve`` resets the flag, so children stay dumpable) and a
  child subreaper (``PR_SET_CHILD_SUBREAPER``: a process orphaned anywhere below the gateway, a
  ``setsid`` + double-fork helper included, is re-parented to the gateway instead of init).
- ``EscapeGuard`` (installed by ``harden``) finds those re-parented processes: each child carries
  a tag in its environment (``TAG_VARIABLE``) that its descendants inherit; when the child ends,
  the gateway's own children that carry its tag are killed with their descendants. It reaps
  re-parented processes once they exit (Twisted waits only for the pids it spawned) and, at
  shutdown, kills every process still re-parented to the gateway.
- ``snapshot`` / ``kill_snapshot``: a child's descendants (``/proc`` parent links), listed when
  the gateway stops the child and killed once it has exited, whatever process group or session
  they moved to.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import sys
import time
from functools import lru_cache
from typing import Any

from twisted.application.service import Service
from twisted.internet import process as _twisted_process
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw import logs

log = Logger(namespace="mcpgw.procsec", observer=logs.observer)

LINUX = sys.platform.startswith("linux")
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
#: The environment variable every child gets when the EscapeGuard runs: ``<gateway pid>.<serial>``.
TAG_VARIABLE = "MCPGW_CHILD"
#: Seconds between sweeps that reap re-parented processes which exited on their own.
SWEEP_INTERVAL = 1.0
#: Most processes one walk of a child's tree lists (a fork bomb is not walked for ever).
MAX_TREE = 4096
#: Kill rounds at shutdown (a process forking while it is killed leaves new orphans each round).
SHUTDOWN_ROUNDS = 8
#: Seconds a shutdown round waits for the processes it killed to be reaped.
SHUTDOWN_WAIT = 1.0

_guard: EscapeGuard | None = None


def guard() -> EscapeGuard | None:
    """The process's EscapeGuard while it runs (the subreaper is a property of the whole process;
    a gateway service built but never started, as in tests, tags nothing), or None."""
    return _guard if _guard is not None and _guard.running else None


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def set_non_dumpable() -> bool:
    return LINUX and _prctl(PR_SET_DUMPABLE, 0)


def set_subreaper() -> bool:
    return LINUX and _prctl(PR_SET_CHILD_SUBREAPER, 1)


def harden(reactor: Any) -> EscapeGuard | None:
    """Mark this process non-dumpable and a child subreaper, and install the EscapeGuard
    (``twistd mcpgw`` calls this once, at startup). Returns the guard, or None when the
    subreaper could not be set (not Linux)."""
    global _guard
    dumpable_off = set_non_dumpable()
    subreaper = set_subreaper()
    if not LINUX:
        log.warn("process hardening skipped on {platform}: children of the gateway's user can read its environment, "
                 "and a child's escaped helpers outlive it", platform=sys.platform)
        return None
    log.info("process hardening: non-dumpable={dumpable} child-subreaper={subreaper}", dumpable=dumpable_off,
             subreaper=subreaper)
    if subreaper and _guard is None:
        _guard = EscapeGuard(reactor)
    return _guard


# -- reading /proc ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (every thread's ``/proc/PID/task/TID/children``)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return found


def stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), at most MAX_TREE."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < MAX_TREE:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out[:MAX_TREE]


def snapshot(pid: int | None) -> list[tuple[int, int]]:
    """``pid``'s descendants as (pid, start time): kill_snapshot kills them later, but not a
    process that took a recycled pid since."""
    if not LINUX or pid is None:
        return []
    out = []
    for p in descendants(pid):
        st = stat(p)
        if st is not None:
            out.append((p, st[1]))
    return out


def kill_snapshot(taken: list[tuple[int, int]]) -> int:
    """SIGKILL every process of a snapshot that is still the same process; how many were signalled."""
    killed = 0
    for pid, started in taken:
        st = stat(pid)
        if st is None or st[1] != started or st[0] == "Z":
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def has_tag(pid: int, tag: bytes) -> bool:
    """Whether ``pid``'s environment (as it was exec'd) holds ``TAG_VARIABLE=tag``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    return b"\0" + tag + b"\0" in b"\0" + env + b"\0"


# -- the guard ----------------------------------------------------------------------------------


class GuardService(Service):
    """Runs an EscapeGuard's sweep while the gateway's service runs (so building the service in a
    test starts no timer)."""

    def __init__(self, guard: EscapeGuard):
        self._guard = guard

    def startService(self) -> None:
        super().startService()
        self._guard.start()

    # No stopService of its own: children end while the other services stop, and their escaped
    # helpers are still found by tag until the reactor's shutdown trigger (EscapeGuard.shutdown).


class EscapeGuard:
    """The processes re-parented to this (subreaper) gateway: killed by tag when their child ends,
    reaped when they exit, all killed at shutdown."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self._pid = os.getpid()
        self._serial = itertools.count(1)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor
        self._soon: Any = None
        #: Re-parented processes killed and reaped since start (logged at shutdown).
        self.killed = 0
        self.reaped = 0

    def start(self) -> None:
        if self._sweeper.running:
            return
        d = self._sweeper.start(SWEEP_INTERVAL, now=False)
        d.addErrback(lambda f: log.failure("escaped-process sweep stopped", f))
        self._reactor.addSystemEventTrigger("after", "shutdown", self.shutdown)

    @property
    def running(self) -> bool:
        return self._sweeper.running

    def new_tag(self) -> str:
        """A tag for one child's environment (``TAG_VARIABLE``), unique in this gateway's life."""
        return f"{self._pid}.{next(self._serial)}"

    def strays(self) -> list[int]:
        """This process's children that Twisted did not spawn: processes re-parented to it."""
        known = _twisted_process.reapProcessHandlers
        return [p for p in children(self._pid) if p not in known]

    def kill_tagged(self, tag: str) -> int:
        """Kill the re-parented processes that carry ``tag`` (one child's escaped helpers), with
        their descendants; how many were signalled."""
        marker = f"{TAG_VARIABLE}={tag}".encode()
        taken: list[tuple[int, int]] = []
        for pid in self.strays():
            st = stat(pid)
            if st is not None and st[0] != "Z" and has_tag(pid, marker):
                taken.append((pid, st[1]))
                taken.extend(snapshot(pid))
        killed = kill_snapshot(taken)
        if killed:
            self.killed += killed
            log.info("killed {count} escaped process(es) of child {tag}", count=killed, tag=tag)
            self.reap_soon()
        return killed

    def reap_soon(self) -> None:
        """A sweep shortly (a SIGKILLed process is a zombie within milliseconds)."""
        if self._soon is None or not self._soon.active():
            self._soon = self._reactor.callLater(0.05, self.sweep)

    def sweep(self) -> int:
        """Reap re-parented processes that have exited (never ``waitpid(-1)``: Twisted's own
        children's statuses stay Twisted's)."""
        reaped = 0
        for pid in self.strays():
            st = stat(pid)
            if st is not None and st[0] == "Z" and _reap(pid):
                reaped += 1
        self.reaped += reaped
        return reaped

    def shutdown(self) -> None:
        """Every child has exited (the services are stopped): kill what is still re-parented to
        the gateway, with its descendants, and reap it."""
        if self._sweeper.running:
            self._sweeper.stop()
        killed = 0
        for _ in range(SHUTDOWN_ROUNDS):
            strays = self.strays()
            if not strays:
                break
            taken: list[tuple[int, int]] = []
            for pid in strays:
                st = stat(pid)
                if st is not None:
                    taken.append((pid, st[1]))
                    taken.extend(snapshot(pid))
            killed += kill_snapshot(taken)
            _reap_all(strays, SHUTDOWN_WAIT)
        self.killed += killed
        if killed:
            log.info("shutdown: killed {count} process(es) that escaped their children", count=killed)


def _reap(pid: int) -> bool:
    """waitpid one re-parented process without blocking; True once it is reaped (or not ours)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    except OSError as e:
        if e.errno == errno.EINTR:
            return False
        raise
    return done == pid


def _reap_all(pids: list[int], timeout: float) -> None:
    """Reap SIGKILLed processes, waiting at most ``timeout`` seconds for them (the reactor has
    stopped: this runs once, at exit; a process the kill did not reach is left to init)."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left:
        left = {pid for pid in left if not _reap(pid)}
        if not left or time.monotonic() >= deadline:
            return
        time.sleep(0.005)


@lru_cache(maxsize=64)
def account(user: str | int | None, group: str | int | None) -> tuple[int, int, str | None]:
    """(uid, gid, home) of a server's ``user`` / ``group`` (names or numbers); the group defaults
    to the user's primary group. KeyError for an unknown name."""
    import grp
    import pwd

    entry = None
    if isinstance(user, int) or (isinstance(user, str) and user.isdigit()):
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            pass
    else:
        try:
            entry = pwd.getpwnam(str(user))
        except KeyError:
            raise KeyError(f"user {user!r}") from None
        uid = entry.pw_uid
    if group is None:
        if entry is None:
            raise KeyError(f"uid {uid} has no passwd entry, so no primary group: name a group")
        gid = entry.pw_gid
    elif isinstance(group, int) or group.isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeyError(f"group {group!r}") from None
    return uid, gid, entry.pw_dir if entry is not None else None
