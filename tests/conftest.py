import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.gateway_process import Gateway
from tests.redis_server import REDIS_SERVER, RedisServer

# -- the fast paths' own tests --------------------------------------------------------
#
# .ci/run runs the transports' tests a second time with MCPGW_FAST_PATHS=0. A test of a fast
# path itself (``@pytest.mark.fast_paths``, or a unittest class whose ``fast`` is True, which
# switches its connections onto the fast paths) has nothing to check there: it is deselected,
# so that run shows no skip.


def _needs_fast_paths(item: pytest.Item) -> bool:
    return item.get_closest_marker("fast_paths") is not None or getattr(getattr(item, "cls", None), "fast", None) is True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MCPGW_FAST_PATHS", "1") != "0":
        return
    deselected = [item for item in items if _needs_fast_paths(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not _needs_fast_paths(item)]


# -- the unit layer's guard -------------------------------------------------------------
#
# ``pytest -m "not integration"`` is the fast layer: it must start no process and listen on
# nothing but loopback. A test that starts a real process carries ``@pytest.mark.integration``
# (or its module's ``pytestmark``); an unmarked one that spawns, or binds a non-loopback
# address, fails here with the reason, even when the code under test swallows the error.


class GuardViolation(AssertionError):
    """An unmarked test started a process or bound a non-loopback address."""


def _loopback_or_local(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", None) or family not in (socket.AF_INET, socket.AF_INET6):
        return True  # a Unix socket (or netlink and the like): nothing on the network
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode()
    try:
        # 127.0.0.0/8 and ::1: hostile_http binds other 127.x source addresses as other clients.
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # "", "localhost" and other names: say 127.0.0.1


@contextmanager
def _guard(item: pytest.Item) -> Iterator[list[str]]:
    """Patch process creation and ``bind`` while ``item`` (unmarked) sets up and runs."""
    violations: list[str] = []

    def refuse(what: str) -> Any:
        message = (f"{item.nodeid} {what} but is not marked @pytest.mark.integration "
                   "(the unit layer starts no process: mark it, or use tests/fake_process.py)")
        violations.append(message)
        raise GuardViolation(message)

    def no_popen(self: Any, args: Any, *a: Any, **kw: Any) -> None:
        refuse(f"starts a process ({args!r})")

    def no_spawn(*a: Any, **kw: Any) -> Any:
        return refuse(f"starts a process ({a[:3]!r})")

    real_bind = socket.socket.bind

    def checked_bind(self: socket.socket, address: Any) -> None:
        if not _loopback_or_local(self.family, address):
            violations.append(f"{item.nodeid} binds {address!r}: tests bind 127.0.0.1 (or ::1, a Unix socket) only")
            raise GuardViolation(violations[-1])
        real_bind(self, address)

    from twisted.internet import reactor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", no_popen)
        mp.setattr(reactor, "spawnProcess", no_spawn)
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                mp.setattr(os, name, no_spawn)
        mp.setattr(socket.socket, "bind", checked_bind)
        yield violations


def _guarded_phase(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("integration") is not None:
        return (yield)
    with _guard(item) as violations:
        result = yield
    if violations:  # raised where it happened, but swallowed on the way (a Deferred's errback, a broad except)
        raise GuardViolation("\n".join(violations))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Setup too: a module- or class-scoped fixture starts with the first test that uses it."""
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded_phase(item))


# -- gateways ---------------------------------------------------------------------------


def _gateway_factory():
    started: list[Gateway] = []

    def start(config, env=None, port=0) -> Gateway:
        gw = Gateway(config, env, port=port)
        started.append(gw)
        return gw

    return started, start


@pytest.fixture
def make_gateway():
    """Start gateways on free ports; stop every one (and check its children are gone) at the end."""
    started, start = _gateway_factory()
    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def make_module_gateway():
    """Like ``make_gateway``, but the gateways live until the test module ends (one per module)."""
    started, start = _gateway_factory()
    yield start
    for gw in started:
        gw.stop()


# -- Redis ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server (tests/redis_server.py: a free loopback port, no persistence) for the module.
    tests/test_cluster.py overrides it with a password-protected one it restarts."""
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary (.ci/run installs it)")
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis(redis_server):
    """The module's redis-server, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server
