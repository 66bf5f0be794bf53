"""Connection caps and descriptor pressure for GatewayChannel: how many connections a site and a
peer address may hold, and which to shed first when descriptors run low."""

from __future__ import annotations

import os
import resource as _rlimit
import socket
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw import jsonrpc, logs

#: Descriptor pressure: above this share of RLIMIT_NOFILE, connections without a complete head are shed.
PRESSURE_SHARE = 0.8

_log = Logger(namespace="mcpgw.channel", observer=logs.observer)


def fileno(transport: Any) -> int | None:
    try:
        return transport.fileno()
    except Exception:  # noqa: BLE001 - a transport without a descriptor of its own (TLS over a wrapper, memory)
        return None


def open_descriptors(fallback: int) -> int:
    """Descriptors this process holds (/proc/self/fd on Linux; ``fallback`` elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:
        return fallback


DESCRIPTORS = "too many open connections (descriptors are short)"


class Connections:
    """The open connections of one site: ``limits.maxConnections``, ``limits.maxConnectionsPerIp``
    (keyed by the peer address: behind a proxy every client is the proxy, so leave it 0 there), and
    descriptor pressure.

    Each new connection's descriptor number is checked against 80 % of RLIMIT_NOFILE (the kernel
    gives the lowest free number, so a high one means few are free: no syscall per connection).
    Past that mark the connections that have not completed a request head (slow heads, idle
    keep-alive connections), oldest first, are closed to bring the count back under the mark; a
    reserve of descriptors above it stays for clients that send a request promptly and for the
    children's pipes. A new connection that would eat into the reserve is answered 503 and closed.
    Requests being answered, SSE streams and WebSockets are never shed.
    """

    def __init__(self, clock: Any, max_connections: int = 0, max_per_ip: int = 0, nofile: int | None = None,
                 descriptors: Any = None):
        self._clock = clock
        #: How many descriptors are open (given the new one's number): /proc/self/fd by default.
        self._descriptors = descriptors or open_descriptors
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        if nofile is None:
            soft = _rlimit.getrlimit(_rlimit.RLIMIT_NOFILE)[0]
            nofile = soft if soft != _rlimit.RLIM_INFINITY else 1 << 20
        self.nofile = nofile
        self.pressure_at = int(nofile * PRESSURE_SHARE)
        #: Descriptors kept free for prompt clients and children: a new connection past them is refused.
        self.reserve = max(8, nofile // 20)
        self.count = 0
        self._per_ip: dict[str, int] = {}
        #: Every counted connection. The ones without a complete request head have a
        #: ``waiting_since`` (a serial number, set by the channel): the smallest has waited longest.
        self._open: set[Any] = set()
        #: Connections shed and not yet closed (their descriptors are still open).
        self._shedding: set[Any] = set()
        self.serial = 0
        #: WebSockets: the transport and its address, counted until the socket is seen closed.
        self._upgraded: dict[Any, str] = {}
        #: Descriptors ran out during this turn of the reactor: new connections are closed unanswered.
        self.exhausted = False
        self._in_use = 0
        self.shed_total = 0
        self.refused_total = 0
        self._last_warning = float("-inf")

    # -- what channels report ----------------------------------------------------------------

    def opened(self, channel: Any, ip: str, fd: int | None) -> str | None:
        """Count a new connection; the reason it is refused, or None."""
        refusal = None
        if fd is not None and fd >= self.pressure_at:
            refusal = self._relieve(fd)
        if refusal is None and self.max_connections and self.count >= self.max_connections:
            self._prune_upgraded()
            if self.count >= self.max_connections:
                refusal = f"too many connections (limits.maxConnections {self.max_connections})"
        if refusal is None and self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            self._prune_upgraded()
            if self._per_ip.get(ip, 0) >= self.max_per_ip:
                refusal = f"too many connections from your address (limits.maxConnectionsPerIp {self.max_per_ip})"
        if refusal is DESCRIPTORS and self._in_use >= self.nofile - self.reserve // 2 and not self.exhausted:
            # A 503 holds its descriptor until the reactor's next turn, while one accept burst can
            # take a hundred connections: this close to RLIMIT_NOFILE the rest of the burst is
            # closed as it is accepted (buildProtocol None), the same end Twisted's EMFILE path
            # gives a connection, without running out first.
            self.exhausted = True
            self._clock.callLater(0, self._recovered)
        if refusal is not None:
            self.refused_total += 1
            self._warn(refusal)
            return refusal
        self.count += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._open.add(channel)
        self.serial += 1
        channel.waiting_since = self.serial
        return None

    def _recovered(self) -> None:
        self.exhausted = False

    def closed(self, channel: Any) -> None:
        self._open.discard(channel)
        self._shedding.discard(channel)
        self._forget(channel._ip)

    def waiting(self, channel: Any) -> None:
        """``channel`` answered a request and waits for the next head: the youngest in line, and
        shed only after every connection that has not completed a request. (GatewayChannel does
        the same inline, once per request.)"""
        self.serial += 1
        channel.waiting_since = self.serial
        channel.kept_alive = True

    @staticmethod
    def head_complete(channel: Any) -> None:
        channel.waiting_since = None

    def upgraded(self, channel: Any, transport: Any) -> None:
        self._open.discard(channel)
        self._upgraded[transport] = channel._ip

    # -- limits ------------------------------------------------------------------------------

    def _forget(self, ip: str) -> None:
        self.count -= 1
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def _prune_upgraded(self) -> None:
        """Drop the WebSockets whose socket has closed (their end is not reported here)."""
        for transport, ip in list(self._upgraded.items()):
            if not transport.connected:  # FileDescriptor's (through a TLS wrapper, the TCP one's)
                del self._upgraded[transport]
                self._forget(ip)

    def _relieve(self, fd: int) -> str | None:
        """Descriptors are past the mark: shed waiting connections, oldest first, back under it."""
        in_use = self._in_use = self._descriptors(fd + 1)
        excess = in_use - self.pressure_at
        if excess <= 0:
            return None
        self._prune_upgraded()
        waiting = [channel for channel in self._open if channel.waiting_since is not None]
        waiting.sort(key=lambda channel: channel.waiting_since)
        # Connections that never completed a request go first, as many as the count is over the
        # mark: those shed earlier in this accept burst still hold their descriptors until the
        # reactor's next turn, so shedding ahead is what keeps the burst short of RLIMIT_NOFILE.
        victims = [channel for channel in waiting if not channel.kept_alive][:excess]
        # A kept-alive connection, idle between a client's requests, goes only for descriptors
        # not already on their way back (nginx, too, closes idle keep-alive connections last):
        # a client whose next request crosses the close sees it fail.
        owed = excess - len(self._shedding) - len(victims)
        if owed > 0:
            victims += [channel for channel in waiting if channel.kept_alive][:owed]
        for channel in victims:
            channel.waiting_since = None
            self._shedding.add(channel)
            channel.shed()
        self.shed_total += len(victims)
        if victims:
            self._warn(f"descriptors short ({in_use} of {self.nofile} open): closed {len(victims)} "
                       "connection(s) without a complete request head")
        if in_use - len(victims) >= self.nofile - self.reserve:
            return DESCRIPTORS
        return None

    def _warn(self, what: str) -> None:
        """One line per 10 s at most: an attack must not also flood the log."""
        now = self._clock.seconds()
        if now - self._last_warning >= 10:
            self._last_warning = now
            _log.warn("connections: {what} (shed so far: {shed}, refused: {refused})", what=what,
                      shed=self.shed_total, refused=self.refused_total)


#: Reads of 64 KiB at most when a shed or refused connection's unread input is dropped.
_DROP_READS = 4


def drop_unread(transport: Any) -> None:
    """Read and drop what a client sent that the reactor has not read yet (a connection closed in the
    burst that accepted it): a socket closed with input unread ends in a reset (RFC 1122 4.2.2.13),
    and the client would lose the answer before it. Plain TCP only; a bounded read."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return
    try:
        for _ in range(_DROP_READS):
            if not handle.recv(65536, socket.MSG_DONTWAIT):
                return
    except OSError:  # nothing left (EAGAIN), or the connection is gone already
        return


def raw_reply(status: bytes, message: str | None, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer written by the channel itself (no request to render it): a
    JSON-RPC error body like every other refusal of the gateway, and ``Connection: close``."""
    body = jsonrpc.error_bytes(None, jsonrpc.INVALID_REQUEST, message) if message else b""
    head = b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n" + extra
    if body:
        head += b"Content-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


#: What a connection accepted while descriptors are exhausted reads before the end of stream.
_SHORT_OF_DESCRIPTORS = raw_reply(b"503 Service Unavailable", f"Service Unavailable: {DESCRIPTORS}",
                                  b"Retry-After: 1\r\n")


class ClosedAtOnce(Protocol):
    """A connection accepted after descriptors ran out in this turn of the reactor (one accept
    burst can take a hundred): a 503 written straight to the socket, its unread input dropped and
    the socket closed before the next accept, so the burst cannot reach EMFILE.

    Twisted closes a socket at once when ``buildProtocol`` returns None, but without a shutdown:
    a client whose request was already in the kernel's buffer then reads a reset instead of an
    answer and an end of stream (RFC 1122 4.2.2.13). Here the socket is shut down first (a FIN),
    then closed through the transport's own ``connectionLost``, as the reactor would on its next
    turn. A transport that is not a plain socket (TLS), or has no ``connectionLost``, is closed by
    ``loseConnection``."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        handle = getattr(transport, "getHandle", lambda: None)()
        lost = getattr(transport, "connectionLost", None)
        if not isinstance(handle, socket.socket) or lost is None:
            transport.loseConnection()
            return
        try:
            handle.send(_SHORT_OF_DESCRIPTORS, socket.MSG_DONTWAIT)
        except OSError:  # the peer is gone already: nothing to answer
            pass
        drop_unread(transport)
        try:
            handle.shutdown(socket.SHUT_RDWR)  # the FIN now, whatever the close below does
        except OSError:
            pass
        lost(Failure(ConnectionDone()))
