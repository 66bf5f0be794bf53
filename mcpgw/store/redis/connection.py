"""The connection: a command connection and a pub/sub connection to one Redis, kept open.

``RedisConnection`` keeps two connections to one Redis server (txredisapi's
protocols over Twisted endpoints on the injected reactor): one for commands,
one subscribed to this instance's pub/sub channel. Each is opened with AUTH and
SELECT (and SUBSCRIBE), watched, and re-opened with a doubling backoff when it
drops; every command has a timeout, and a command sent while the connection is
down fails at once with ``RedisUnavailable`` instead of waiting.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw import logs
from mcpgw.store.redis.keys import Script
from mcpgw.store.redis_url import RedisAddress


class RedisUnavailable(Exception):
    """Redis cannot be used now: not connected, or an operation timed out."""


def reply_text(value: Any) -> str:
    """A Redis reply as text (the connections run without a charset, so replies are bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _NoFactory:
    """What txredisapi's protocol asks of its factory on its error paths; connections here are ours."""

    isLazy = True

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        pass


class _Once(Factory):
    """connectProtocol's factory, without a log line per connection attempt."""

    noisy = False

    def __init__(self, protocol: Any):
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


class _Lost(Protocol):
    """Keeps why the connection was lost (a TLS handshake error shows up only there).

    A mixin before txredisapi's protocol class; its Protocol base (already in theirs) gives the
    ``super()`` call a declared target."""

    lost_reason: Failure | None = None

    def connectionLost(self, why: Failure = connectionDone) -> None:
        self.lost_reason = why
        super().connectionLost(why)


class _Commands(_Lost, txredisapi.RedisProtocol):
    pass


class _Subscriber(_Lost, txredisapi.SubscriberProtocol):
    on_message: Callable[[bytes, bytes], None] = staticmethod(lambda channel, message: None)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.on_message(channel, message)


def _describe(failure_or_exc: Any) -> str:
    e = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    if isinstance(e, (defer.TimeoutError, error.TimeoutError)):
        return "timed out"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "cannot resolve the host name"
    text = str(e) or type(e).__name__
    if text.startswith(("WRONGPASS", "NOAUTH")) or "AUTH" in text:
        return f"authentication failed ({text})"
    return text


class _Link:
    """One connection to Redis kept open: connect, AUTH, SELECT (SUBSCRIBE); reconnect with backoff."""

    log = Logger(observer=logs.observer)

    def __init__(self, owner: RedisConnection, name: str, protocol: type, prepare: Callable[[Any], Any]):
        self._owner = owner
        self.name = name
        self._protocol_class = protocol
        self._prepare = prepare
        self.protocol: Any = None
        self.problem: str | None = "connecting"
        self.attempts = 0
        self._running = False
        self._sleeping: defer.Deferred[None] | None = None
        self._attempt: defer.Deferred[Any] | None = None
        self._done: defer.Deferred[None] | None = None

    @property
    def up(self) -> bool:
        return self.protocol is not None

    def start(self) -> None:
        self._running = True
        self._done = defer.Deferred.fromCoroutine(self._run())
        self._done.addErrback(lambda f: self.log.failure("redis {link}: connection loop failed", f, link=self.name))

    def stop(self) -> defer.Deferred[None]:
        self._running = False
        for d in (self._sleeping, self._attempt):
            if d is not None and not d.called:
                d.cancel()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
        return self._done if self._done is not None else defer.succeed(None)

    async def _run(self) -> None:
        owner = self._owner
        while self._running:
            try:
                self._attempt = defer.Deferred.fromCoroutine(self._open())
                protocol = await self._attempt
            except Exception as e:  # noqa: BLE001 - whatever failed, the answer is to report it and retry
                if not self._running:
                    break
                self.attempts += 1
                problem = _describe(e)
                delay = owner.backoff(self.attempts)
                if problem != self.problem or self.attempts == 1:
                    self.log.warn("redis: {link} connection to {address}: {problem}; retrying in {delay:.1f}s (attempt {attempt})",  # noqa: G010 (twisted.logger)
                                  link=self.name, address=owner.address.describe(), problem=problem, delay=delay,
                                  attempt=self.attempts)
                self.problem = problem
                self._sleeping = deferLater(owner._reactor, delay, lambda: None)
                try:
                    await self._sleeping
                except defer.CancelledError:
                    break
                continue
            finally:
                self._attempt = None
            lost: defer.Deferred[Any] = protocol.whenDisconnected()
            self.protocol = protocol
            self.problem = None
            if self.attempts:
                self.log.info("redis: {link} connection to {address} is back after {attempts} failed attempts",
                              link=self.name, address=owner.address.describe(), attempts=self.attempts)
            self.attempts = 0
            owner._changed()
            await lost
            self.protocol = None
            self.problem = "connection lost"
            if self._running:
                self.log.warn("redis: {link} connection to {address} lost; reconnecting", link=self.name,  # noqa: G010 (twisted.logger)
                              address=owner.address.describe())
            owner._changed()

    async def _open(self) -> Any:
        owner = self._owner
        protocol = self._protocol_class(charset=None, replyTimeout=None, convertNumbers=False)
        protocol.factory = _NoFactory()
        try:
            await owner._timed(owner._endpoint().connect(_Once(protocol)), owner.connect_timeout)
            address = owner.address
            if address.password is not None:
                auth = (address.username, address.password) if address.username else (address.password,)
                await owner._timed(protocol.execute_command("AUTH", *auth), owner.timeout)
            if address.db:
                await owner._timed(protocol.execute_command("SELECT", address.db), owner.timeout)
            await owner._name(protocol)
            await self._prepare(protocol)
        except BaseException as e:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            reason = protocol.lost_reason.value if protocol.lost_reason is not None else None
            if isinstance(e, txredisapi.ConnectionError) and reason is not None and "SSL" in type(reason).__module__ + type(reason).__name__:
                raise ConnectionError(f"TLS handshake failed: {reason}") from None
            raise
        return protocol


class RedisConnection(Service):
    """A command connection and a pub/sub connection to one Redis, kept open; timeouts on everything."""

    log = Logger(observer=logs.observer)
    initial_delay = 0.2
    max_delay = 5.0

    def __init__(self, address: RedisAddress, reactor: Any, timeout: float = 2.0, metrics: Any = None,
                 connect_timeout: float | None = None):
        self.address = address
        self._reactor = reactor
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else max(timeout, 2.0)
        self._metrics = metrics
        self._channels: dict[bytes, Callable[[bytes], None]] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self.available = False
        #: ``CLIENT SETNAME`` of both connections (None: unnamed), so that other instances can tell
        #: from ``CLIENT LIST`` whether this process still holds a connection to Redis.
        self.client_name: str | None = None
        #: Redis refused CLIENT SETNAME or CLIENT LIST (a managed Redis may rename them away).
        self.client_list_refused = False
        #: The ``run_id`` of the Redis process the command connection is on (new at every Redis start).
        self.run_id: str | None = None
        self.commands = _Link(self, "command", _Commands, self._prepare_commands)
        self.pubsub = _Link(self, "pub/sub", _Subscriber, self._prepare_subscriber)

    # -- state ---------------------------------------------------------------

    def problem(self) -> str | None:
        """Why Redis cannot be used now (for ``/ready``), or None. Without the address: this text
        reaches clients (``/ready``, errors); the links' log lines name the address."""
        links = [link for link in (self.commands, self.pubsub) if link.problem]
        if not links:
            return None
        if len({link.problem for link in links}) == 1:
            return links[0].problem
        return "; ".join(f"{link.name} connection: {link.problem}" for link in links)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(available)`` whenever both connections come up, or one goes down."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        available = self.commands.up and self.pubsub.up
        if available == self.available:
            return
        self.available = available
        for listener in list(self._listeners):
            try:
                listener(available)
            except Exception:  # noqa: BLE001 - one listener's bug must not keep the others uninformed
                self.log.failure("redis: state listener failed")

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.initial_delay * 2 ** min(attempt - 1, 20))
        return delay * random.uniform(0.8, 1.2)

    def startService(self) -> None:
        super().startService()
        self.commands.start()
        self.pubsub.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.DeferredList([self.commands.stop(), self.pubsub.stop()]).addCallback(lambda _: None)

    # -- plumbing ------------------------------------------------------------

    def _endpoint(self) -> IStreamClientEndpoint:
        address = self.address
        if address.path:
            return endpoints.UNIXClientEndpoint(self._reactor, address.path, timeout=self.connect_timeout)
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(self._reactor, address.host, address.port, timeout=self.connect_timeout)
        if address.tls:
            from twisted.internet import ssl

            if not address.verify:
                options: Any = ssl.CertificateOptions(verify=False)
            else:
                trust = None
                if address.ca_file:
                    with open(address.ca_file, "rb") as f:
                        trust = ssl.Certificate.loadPEM(f.read())
                options = ssl.optionsForClientTLS(address.host, trustRoot=trust)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        return endpoint

    def _timed(self, d: defer.Deferred[Any], seconds: float) -> defer.Deferred[Any]:
        return d.addTimeout(seconds, self._reactor)

    async def _name(self, protocol: Any) -> None:
        if self.client_name is None or self.client_list_refused:
            return
        try:
            await self._timed(protocol.execute_command("CLIENT", "SETNAME", self.client_name), self.timeout)
        except txredisapi.ResponseError as e:
            self.client_list_refused = True
            self.log.warn("redis: CLIENT SETNAME refused ({error}); a killed instance is noticed only when its "  # noqa: G010 (twisted.logger)
                          "heartbeat expires", error=str(e))

    def connected_names(self) -> defer.Deferred[set[bytes] | None]:
        """The client names of every connection Redis holds now (None: Redis refuses CLIENT LIST)."""
        if self.client_list_refused:
            return defer.succeed(None)

        def names(listing: Any) -> set[bytes]:
            text = listing if isinstance(listing, bytes) else str(listing).encode()
            return {field[5:] for line in text.splitlines() for field in line.split(b" ") if field.startswith(b"name=")}

        def refused(f: Any) -> None:
            f.trap(txredisapi.ResponseError)
            self.client_list_refused = True
            self.log.warn("redis: CLIENT LIST refused ({error}); a killed instance is noticed only when its "  # noqa: G010 (twisted.logger)
                          "heartbeat expires", error=f.getErrorMessage())
            return None

        return self.execute("CLIENT", "LIST").addCallbacks(names, refused)

    async def _prepare_commands(self, protocol: Any) -> None:
        await self._timed(protocol.execute_command("PING"), self.timeout)
        try:
            info = reply_text(await self._timed(protocol.execute_command("INFO", "server"), self.timeout))
        except txredisapi.ResponseError:
            self.run_id = None
        else:
            self.run_id = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                                if line.startswith("run_id:")), None)
        for script in list(Script.made):
            await self._timed(protocol.execute_command("SCRIPT", "LOAD", script.source), self.timeout)

    async def _prepare_subscriber(self, protocol: Any) -> None:
        protocol.on_message = self._message
        for channel in list(self._channels):
            await self._timed(protocol.subscribe([channel]), self.timeout)

    def _message(self, channel: bytes, message: bytes) -> None:
        handler = self._channels.get(channel)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:  # noqa: BLE001 - a bad message must not end the subscription
            self.log.failure("redis: handler of channel {channel} failed", channel=channel.decode("latin-1"))

    def _count(self, op: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.redis_op(op, outcome)

    # -- operations ----------------------------------------------------------

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        """One command on the command connection; RedisUnavailable when down or after ``timeout``."""
        op = str(args[0]).lower()
        protocol = self.commands.protocol
        if protocol is None:
            self._count(op, "error")
            return defer.fail(RedisUnavailable(f"Redis unavailable: {self.problem()}"))
        try:
            d = protocol.execute_command(*args)
        except (txredisapi.RedisError, ConnectionError) as e:
            self._count(op, "error")
            return defer.fail(RedisUnavailable(f"Redis unavailable: {e}"))
        return self._watch(d, op, protocol)

    def _watch(self, d: defer.Deferred[Any], op: str, protocol: Any) -> defer.Deferred[Any]:
        def ok(result: Any) -> Any:
            self._count(op, "ok")
            return result

        def failed(f: Any) -> Any:
            if f.check(defer.TimeoutError):
                self._count(op, "timeout")
                # A server that does not answer in time is as good as gone: reconnect.
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
                raise RedisUnavailable(f"Redis did not answer {op.upper()} within {self.timeout:g}s")
            self._count(op, "error")
            if f.check(txredisapi.ConnectionError):
                raise RedisUnavailable(f"Redis connection lost during {op.upper()}")
            return f

        return d.addTimeout(self.timeout, self._reactor).addCallbacks(ok, failed)

    def eval(self, script: Script, keys: Iterable[Any] = (), args: Iterable[Any] = ()) -> defer.Deferred[Any]:
        """Run a Lua script by its SHA1, loading it first when Redis does not know it."""
        keys, args = list(keys), list(args)

        def noscript(f: Any) -> Any:
            if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
                return self.execute("EVAL", script.source, len(keys), *keys, *args)
            return f

        return self.execute("EVALSHA", script.sha, len(keys), *keys, *args).addErrback(noscript)

    def publish(self, channel: str, message: bytes) -> defer.Deferred[int]:
        """PUBLISH; fires with how many subscribers got it (0: nobody listens on ``channel``)."""
        return self.execute("PUBLISH", channel, message)

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> defer.Deferred[Any]:
        """Hand every message on ``channel`` to ``handler``, across reconnects."""
        key = channel.encode()
        self._channels[key] = handler
        protocol = self.pubsub.protocol
        if protocol is None:
            return defer.succeed(None)  # subscribed when the connection (re)opens
        return self._watch(protocol.subscribe([key]), "subscribe", protocol)

    def ping_pubsub(self) -> defer.Deferred[Any]:
        """PING on the subscribed connection: a silent network drop shows up as a timeout."""
        protocol = self.pubsub.protocol
        if protocol is None:
            return defer.fail(RedisUnavailable(f"Redis unavailable: {self.problem()}"))
        return self._watch(protocol.execute_command("PING"), "ping", protocol)
