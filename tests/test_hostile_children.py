"""Issue 15, findings 6 and 12: what a hostile child MCP server can reach of the gateway, and
whether what it leaves running outlives its session.

Real ``twistd mcpgw`` processes with ``tests/fixtures/hostile_server.py``, whose tools read
``/proc/<parent>/environ``, list their working directory for the gateway's config file, and
double-fork a ``setsid`` helper that closes its descriptors and keeps running. When the tests run
as root, the gateway is started as ``nobody`` (setpriv) so that its children are of the same,
unprivileged user: root's CAP_SYS_PTRACE would read any process's environ, which is not what is
tested here; the ``user`` key (the gateway as root, the child as another account) has its own test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import procsec
from mcpgw.config import StdioServer
from mcpgw.upstream import stdio
from mcpgw.upstream.stdio import StdioUpstream
from tests import runas, wire
from tests.fake_process import FakeProcessReactor
from tests.gateway_process import TWISTD, Gateway, pid_alive, wait_until
from tests.hostile import LegitClient, proc_stats
from tests.test_stdio_upstream import RecordingDelegate

HOSTILE_SERVER = Path(__file__).resolve().parent / "fixtures" / "hostile_server.py"
NOBODY = 65534
ENV_SECRET = "env-" + secrets.token_hex(16)
CLOUD_KEY = "AKIA" + secrets.token_hex(8).upper()
CONFIG_SECRET = "cfg-" + secrets.token_hex(16)


#: The fixture is standard library only: a system interpreter that any account can run (this
#: test's own may live under a directory only root can enter).
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def hostile_server(**extra: Any) -> dict[str, Any]:
    return {"command": PYTHON, "args": [str(runas.readable_copy(HOSTILE_SERVER))], **extra}


class GatewayAs(Gateway):
    """``tests.gateway_process.Gateway`` started as ``uid`` (setpriv) when given, its directory and
    config file (mode 0600) owned by that account: an unprivileged gateway as an operator runs one."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None, uid: int | None = None):
        config = {"host": "127.0.0.1", "port": 0, **config}
        self._dir = tempfile.TemporaryDirectory(prefix="mcpgw-test-")
        self.config_path = os.path.join(self._dir.name, "gateway.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        os.chmod(self.config_path, 0o600)
        command = TWISTD
        if uid is not None:
            for path in (self._dir.name, self.config_path):
                os.chown(path, uid, uid)
            runtime = runas.runtime_for(uid)
            command = [*runas.setpriv(uid), *runtime.python, *TWISTD[1:]]
            env = {**(env or {}), **runtime.env}
        self.proc = subprocess.Popen(
            [*command, "mcpgw", "--config", self.config_path, "--listen", "tcp:0:interface=127.0.0.1",
             "--metrics-listen", "tcp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=self._dir.name,
        )
        self.lines: list[str] = []
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()


def start_gateway(servers: dict[str, Any], as_root: bool = False) -> GatewayAs:
    uid = None if as_root or os.geteuid() != 0 else NOBODY
    return GatewayAs({"mcpServers": servers, "session": {"secret": CONFIG_SECRET}},
                     env={"SESSION_SECRET": ENV_SECRET, "AWS_SECRET_ACCESS_KEY": CLOUD_KEY}, uid=uid)


@pytest.fixture(scope="module")
def gw():
    g = start_gateway({"hostile": hostile_server(default=True)})
    yield g
    g.stop()


def call(c: Any, sid: str, name: str, arguments: dict[str, Any] | None = None, id: int = 2) -> Any:
    r = c.post("/mcp", headers=wire.session_headers(sid), json=wire.tool_call(id, name, arguments))
    [reply] = wire.messages_of(r)
    return reply


def tool_json(reply: Any) -> Any:
    return json.loads(reply["result"]["content"][0]["text"])


def stat_of(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of ``pid``, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[3])


def zombies_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split()[1].startswith("Z")]


def secrets_in(text: str) -> list[str]:
    return [s for s in (ENV_SECRET, CLOUD_KEY, CONFIG_SECRET) if s in text]


@pytest.mark.integration
class TestWhatAChildReads:
    def test_gateway_environ_and_proc_entries_are_closed_to_a_same_user_child(self, gw):
        """Finding 6: PR_SET_DUMPABLE 0 makes /proc/<gateway>/environ, cwd and fd root-owned
        (proc(5): ptrace access mode checks), so a child of the gateway's own user gets EACCES."""
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            reply = call(c, sid, "peek_parent")
            wire.delete_session(c, sid)
        seen = tool_json(reply)
        assert seen["parent"] == gw.proc.pid  # setpriv execs twistd: the same pid
        assert seen["environ"].get("errno") == 13, seen["environ"]  # EACCES
        assert seen["cwd"].get("errno") == 13, seen["cwd"]
        assert seen["fds"].get("errno") == 13, seen["fds"]
        assert secrets_in(json.dumps(seen)) == []
        # The gateway reads its own /proc entries as before (Twisted lists its descriptors there).
        assert proc_stats(gw.proc.pid).fds > 3

    def test_child_starts_in_an_empty_private_directory(self, gw):
        """A child's default cwd is a fresh empty directory (mode 0700), never the gateway's, where
        the config file is; the directory is removed when the child ends."""
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            seen = tool_json(call(c, sid, "look_around"))
            cwd = seen["cwd"]
            assert seen["entries"] == [] and seen["files"] == {}
            assert os.path.realpath(cwd) != os.path.realpath(gw._dir.name)
            assert "gateway.json" not in json.dumps(seen["parent_listing"])
            assert os.stat(cwd).st_mode & 0o777 == 0o700
            assert secrets_in(json.dumps(seen)) == []
            wire.delete_session(c, sid)
        assert wait_until(lambda: not os.path.exists(cwd), timeout=10), f"{cwd} left behind"

    def test_two_sessions_get_two_directories(self, gw):
        with wire.http_client(gw.url) as c:
            sids = [wire.open_session(c) for _ in range(2)]
            cwds = [tool_json(call(c, sid, "look_around"))["cwd"] for sid in sids]
            for sid in sids:
                wire.delete_session(c, sid)
        assert cwds[0] != cwds[1]


@pytest.mark.integration
class TestEscapedHelpers:
    def test_setsid_helper_is_killed_when_its_session_is_deleted(self, gw):
        """Finding 12: a double-forked setsid helper is re-parented to the gateway (a child
        subreaper), found by its child's tag and killed at DELETE, then reaped: no zombie. A
        legitimate client's calls go on meanwhile."""
        before = proc_stats(gw.proc.pid)
        helpers = []
        with LegitClient(gw.url + "/mcp") as legit, wire.http_client(gw.url) as c:
            for _ in range(5):
                sid = wire.open_session(c)
                escaped = tool_json(call(c, sid, "escape"))
                helper = escaped["helper"]
                assert pid_alive(helper)
                state, ppid, session = stat_of(helper)
                assert ppid == gw.proc.pid, "the orphaned helper is re-parented to the gateway (subreaper)"
                assert session == escaped["sid"] != stat_of(gw.proc.pid)[2]
                started = time.monotonic()
                assert wire.delete_session(c, sid) == 200
                assert wait_until(lambda helper=helper: stat_of(helper) is None, timeout=10), \
                    f"helper {helper} survived DELETE"
                helpers.append(time.monotonic() - started)
        legit.assert_healthy()
        assert zombies_of(gw.proc.pid) == []
        # Every kill within the child's stop (stdin EOF, grace, TERM): well under 5 s each.
        assert max(helpers) < 5, helpers
        assert proc_stats(gw.proc.pid).fds - before.fds < 20

    def test_helper_of_a_child_that_exits_is_killed(self, gw):
        """The child exits on its own (here: its session ends while the helper runs) and also when
        the child crashes: the tag scan finds the helper among the gateway's re-parented processes."""
        with wire.http_client(gw.url) as c:
            sid = wire.open_session(c)
            helper = tool_json(call(c, sid, "escape"))["helper"]
            child = [p for p in gw.child_pids() if stat_of(p) and stat_of(p)[1] == gw.proc.pid and p != helper]
            for pid in child:
                os.kill(pid, 9)
            assert wait_until(lambda: stat_of(helper) is None, timeout=10), f"helper {helper} outlived its child"
            wire.delete_session(c, sid)
        assert zombies_of(gw.proc.pid) == []

    def test_scrubbed_helper_is_killed_at_shutdown_at_the_latest(self):
        """A helper that drops its environment (exec with none) carries no tag: DELETE does not find
        it; the gateway kills everything still re-parented to it when it shuts down."""
        g = start_gateway({"hostile": hostile_server(default=True)})
        try:
            with wire.http_client(g.url) as c:
                sid = wire.open_session(c)
                helper = tool_json(call(c, sid, "escape", {"scrub": True}))["helper"]
                assert wait_until(lambda: _environ_empty(helper), timeout=5)
                wire.delete_session(c, sid)
                assert wait_until(lambda: not g.child_pids() or g.child_pids() == [helper], timeout=10)
                assert pid_alive(helper), "documented: an untagged helper survives its session"
        finally:
            g.stop()
        assert not pid_alive(helper), f"helper {helper} outlived the gateway"
        assert stat_of(helper) is None or stat_of(helper)[0] == "Z" and stat_of(helper)[1] == 1


def _environ_empty(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"MCPGW_CHILD" not in f.read()
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="running a child as another account needs the gateway to be root")
class TestChildAsAnotherUser:
    def test_user_key_runs_the_child_as_that_account(self):
        """``user``: the gateway (root) runs the child as nobody: the child cannot read the
        gateway's environ either way, starts in a directory of its own, and its helper dies at DELETE."""
        g = start_gateway({"hostile": hostile_server(default=True, user="nobody")}, as_root=True)
        try:
            with wire.http_client(g.url) as c:
                sid = wire.open_session(c)
                seen = tool_json(call(c, sid, "peek_parent"))
                assert seen["environ"].get("errno") == 13 and secrets_in(json.dumps(seen)) == []
                around = tool_json(call(c, sid, "look_around", id=3))
                assert around["entries"] == [] and os.stat(around["cwd"]).st_uid == NOBODY
                helper = tool_json(call(c, sid, "escape", id=4))["helper"]
                with open(f"/proc/{helper}/status") as f:
                    assert any(line.split()[:2] == ["Uid:", str(NOBODY)] for line in f)
                assert wire.delete_session(c, sid) == 200
                assert wait_until(lambda: stat_of(helper) is None, timeout=10)
                assert zombies_of(g.proc.pid) == []
        finally:
            g.stop()


# -- in memory: StdioUpstream.spawn on the fake process reactor ---------------------------------


class RecordingReactor(FakeProcessReactor):
    def __init__(self) -> None:
        super().__init__()
        self.options: list[dict[str, Any]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None, path: Any = None,
                     **kwargs: Any) -> Any:
        self.options.append(kwargs)
        return super().spawnProcess(proto, executable, args, env, path)


class FakeGuard:
    running = True
    def __init__(self) -> None:
        self.killed: list[str] = []

    def new_tag(self) -> str:
        return "77.1"

    def kill_tagged(self, tag: str) -> int:
        self.killed.append(tag)
        return 0

    def reap_soon(self) -> None:
        pass


class SpawnHardeningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(stdio.os, "killpg", lambda pid, sig: None)
        self.reactor = RecordingReactor()

    def spawn(self, **kw: Any) -> StdioUpstream:
        server = StdioServer(name="h", command="h", executable="/opt/h", **kw)
        upstream = StdioUpstream(server, RecordingDelegate(), self.reactor)
        upstream.spawn()
        return upstream

    def test_default_cwd_is_a_fresh_private_directory_removed_at_exit(self) -> None:
        self.spawn()
        child = self.reactor.spawned[-1]
        cwd = child.path
        self.assertNotEqual(os.path.realpath(cwd), os.path.realpath(os.getcwd()))
        self.assertEqual((os.listdir(cwd), os.stat(cwd).st_mode & 0o777), ([], 0o700))
        with open(os.path.join(cwd, "left-behind"), "w") as f:
            f.write("x")
        child.exit()
        self.assertFalse(os.path.exists(cwd))

    def test_cwd_key_is_used_and_kept(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, d)
        self.spawn(cwd=d)
        self.assertEqual(self.reactor.spawned[-1].path, d)
        self.reactor.spawned[-1].exit()
        self.assertTrue(os.path.isdir(d))

    def test_tag_and_escaped_processes_with_a_guard(self) -> None:
        """With the EscapeGuard (twistd mcpgw), the child's environment carries its tag, and its
        tagged processes and those listed at stop are killed once it has exited."""
        guard = FakeGuard()
        self.patch(procsec, "_guard", guard)
        listed: list[Any] = []
        self.patch(procsec, "snapshot", lambda pid: [(pid + 1, 99)])
        self.patch(procsec, "kill_snapshot", lambda taken: listed.append(taken) or len(taken))
        upstream = self.spawn()
        child = self.reactor.spawned[-1]
        self.assertEqual(child.env[procsec.TAG_VARIABLE], "77.1")
        upstream.stop()
        child.exit()
        self.assertEqual(listed, [[(upstream.pid + 1, 99)]])  # the list taken at stop, once
        self.assertEqual(guard.killed, ["77.1", "77.1"])  # processExited and processEnded

    def test_no_tag_without_a_guard(self) -> None:
        self.patch(procsec, "_guard", None)
        self.spawn()
        self.assertNotIn(procsec.TAG_VARIABLE, self.reactor.spawned[-1].env)

    def test_user_runs_the_child_through_the_uid_path(self) -> None:
        """posix_spawn cannot switch accounts: spawnProcess gets uid/gid, HOME is the account's,
        and the fresh directory is the account's."""
        self.patch(procsec, "account", lambda user, group: (4321, 4322, "/home/svc"))
        owners: list[Any] = []
        self.patch(stdio.os, "chown", lambda path, uid, gid: owners.append((uid, gid)))
        self.spawn(user="svc")
        self.assertEqual(self.reactor.options[-1], {"uid": 4321, "gid": 4322})
        self.assertEqual(self.reactor.spawned[-1].env["HOME"], "/home/svc")
        self.assertEqual(owners, [(4321, 4322)])
        self.reactor.spawned[-1].exit()


_GUARD_PROBE = r"""
import json, os, sys, time
from twisted.internet.task import Clock
from mcpgw import procsec
guard = procsec.EscapeGuard(Clock())
tagged = os.posix_spawn("/bin/sleep", ["sleep", "30"], {procsec.TAG_VARIABLE: "1.1"})
other = os.posix_spawn("/bin/sleep", ["sleep", "30"], {procsec.TAG_VARIABLE: "1.2"})
quick = os.posix_spawn("/bin/true", ["true"], {})
while procsec.stat(quick)[0] != "Z":
    time.sleep(0.01)
out = {"strays": sorted(guard.strays()) == sorted([tagged, other, quick]), "swept": guard.sweep()}
out["killed"] = guard.kill_tagged("1.1")
while procsec.stat(tagged)[0] != "Z":
    time.sleep(0.01)
out["reaped"] = guard.sweep()
out["other_alive"] = procsec.stat(other)[0] != "Z"
guard.shutdown()
out["after_shutdown"] = [procsec.stat(p) for p in (tagged, other, quick)]
print(json.dumps(out))
"""


@pytest.mark.integration  # a real child interpreter spawning real processes
class EscapeGuardTests(SynchronousTestCase):
    """EscapeGuard on real processes, in a subprocess of its own (its sweeps reap any child that
    Twisted did not spawn: never this test runner's)."""

    def test_kill_by_tag_reap_and_shutdown(self) -> None:
        if not procsec.LINUX:
            self.skipTest("Linux only")
        done = subprocess.run([sys.executable, "-c", _GUARD_PROBE], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual(out, {"strays": True, "swept": 1, "killed": 1, "reaped": 1, "other_alive": True,
                               "after_shutdown": [None, None, None]})


class AccountConfigTests(SynchronousTestCase):
    """``user`` / ``group`` are checked at load: each error names its key."""

    def parse(self, **extra: Any) -> Any:
        from mcpgw.config import parse

        return parse({"mcpServers": {"s": {"command": sys.executable, **extra}}}, {})

    def error(self, **extra: Any) -> str:
        from mcpgw.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.parse(**extra)
        return str(caught.exception)

    def test_unknown_names(self) -> None:
        self.assertIn("mcpServers.s.user", self.error(user="no-such-user-here"))
        self.assertIn("mcpServers.s.group", self.error(user=str(os.geteuid()), group="no-such-group-here"))

    def test_group_needs_user(self) -> None:
        self.assertIn("mcpServers.s.group: only applies together with user", self.error(group="0"))

    def test_not_a_name(self) -> None:
        self.assertIn("mcpServers.s.user", self.error(user=["root"]))

    def test_own_account_needs_no_root(self) -> None:
        import pwd

        me = pwd.getpwuid(os.geteuid()).pw_name
        self.assertEqual(self.parse(user=me).servers["s"].user, me)

    def test_another_account_needs_root(self) -> None:
        if os.geteuid() == 0:
            self.assertEqual(self.parse(user="nobody").servers["s"].user, "nobody")
        else:
            self.assertIn("needs the gateway to start as root", self.error(user="nobody"))
