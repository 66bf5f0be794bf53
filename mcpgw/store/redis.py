"""Redis for several gateway instances: the connection, the session store, the instance registry.

``RedisConnection`` keeps two connections to one Redis server (txredisapi's
protocols over Twisted endpoints on the injected reactor): one for commands,
one subscribed to this instance's pub/sub channel. Each is opened with AUTH and
SELECT (and SUBSCRIBE), watched, and re-opened with a doubling backoff when it
drops; every command has a timeout, and a command sent while the connection is
down fails at once with ``RedisUnavailable`` instead of waiting.

``RedisSessionStore`` keeps session records in Redis hashes that expire after
``session.maxAge`` of idleness. The owning instance never waits on Redis for
its own sessions: it keeps their records in memory, refreshes the expiry of
the ones used in batches (``InstanceRegistry``), and writes them all again
whenever the connection comes back (a restarted Redis may have lost them).

``InstanceRegistry`` is the instance's heartbeat: a key with a TTL that says
the instance is alive, written every ``redis.heartbeat`` seconds.

Keys (``PREFIX`` = ``redis.keyPrefix``, default ``mcpgw:``)::

    PREFIX session:ID          hash: server transport instance created seen [proto] [owner]; PEXPIRE idle
    PREFIX instance:ID         string: {"pid", "host", "started"}; PX heartbeat TTL
    PREFIX to:ID               pub/sub channel of one instance (mcpgw.cluster)
    PREFIX events:ID:STREAM    stream: one SSE stream's event log (mcpgw.cluster); PEXPIRE idle
    PREFIX streams:ID          set: the event-log keys of a session, deleted with it
    PREFIX rate:KEY            rate-limit window counter (mcpgw.ratelimit)
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw import jsonrpc, logs
from mcpgw.ratelimit import Decision, IRateLimiter, MemoryRateLimiter
from mcpgw.store import ISessionStore, SessionRecord

DEFAULT_PORT = 6379


class RedisUnavailable(Exception):
    """Redis cannot be used now: not connected, or an operation timed out."""


# -- addresses ---------------------------------------------------------------------


@attrs.frozen
class RedisAddress:
    """Where Redis is and how to log in (``repr`` never shows the password)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False
    #: A Unix socket path instead of host/port.
    path: str | None = None
    #: PEM file of the CAs that sign the server's certificate (rediss://, default: the system's).
    ca_file: str | None = None
    #: False: rediss:// without checking the certificate (``ssl_cert_reqs=none``).
    verify: bool = True

    def describe(self) -> str:
        where = f"unix:{self.path}" if self.path else f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"
        return f"{where}/{self.db}"


def parse_url(url: str, password: str | None = None) -> RedisAddress:
    """``redis://[[user]:pass@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path?db=N``.

    ``password`` (``redis.password`` / ``REDIS_PASSWORD``) wins over one in the URL.
    Raises ValueError naming what is wrong.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r} is not a valid URL: {e}") from None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"db", "ssl_ca_certs", "ssl_cert_reqs"}
    if unknown:
        raise ValueError(f"unknown URL parameter {min(unknown)!r} (known: db, ssl_ca_certs, ssl_cert_reqs)")
    db_text = query.get("db")
    if parts.scheme in ("redis", "rediss") and parts.path not in ("", "/"):
        db_text = parts.path.lstrip("/")
    try:
        db = int(db_text) if db_text is not None else 0
    except ValueError:
        raise ValueError(f"the database number must be an integer, not {db_text!r}") from None
    if db < 0:
        raise ValueError(f"the database number must not be negative, not {db}")
    username = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password is not None else None
    password = password if password is not None else url_password
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path (unix:///run/redis.sock)")
        return RedisAddress(path=parts.path, db=db, username=username, password=password)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"must start with redis://, rediss:// or unix://, not {url!r}")
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise ValueError(f"ssl_cert_reqs must be 'required' or 'none', not {reqs!r}")
    return RedisAddress(
        host=parts.hostname or "127.0.0.1", port=port or DEFAULT_PORT, db=db, username=username or None,
        password=password, tls=parts.scheme == "rediss", ca_file=query.get("ssl_ca_certs"), verify=reqs == "required",
    )


@attrs.frozen
class Keys:
    """Every Redis key and channel name the gateway uses."""

    prefix: str = "mcpgw:"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def instance(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    def channel(self, instance: str) -> str:
        return f"{self.prefix}to:{instance}"

    def events(self, session_id: str, stream: int) -> str:
        return f"{self.prefix}events:{session_id}:{stream}"

    def streams(self, session_id: str) -> str:
        return f"{self.prefix}streams:{session_id}"

    def rate(self, key: str) -> str:
        return f"{self.prefix}rate:{key}"


def client_name(keys: Keys, instance: str) -> str:
    """The ``CLIENT SETNAME`` of ``instance``'s connections (Redis allows no spaces in it)."""
    return "".join("_" if c.isspace() else c for c in keys.instance(instance))


def new_instance_id() -> str:
    """A random 9-digit instance id (digits only: it is the high part of SSE stream numbers)."""
    return str(secrets.randbelow(900_000_000) + 100_000_000)


# -- the connection ----------------------------------------------------------------


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

    lost_reason: Any = None

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
    e = getattr(failure_or_exc, "value", failure_or_exc)
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
            reason = getattr(protocol.lost_reason, "value", None)
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
            info = _text(await self._timed(protocol.execute_command("INFO", "server"), self.timeout))
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


@attrs.frozen
class Script:
    """A Lua script run by its SHA1; every one is loaded on each new connection."""

    source: str
    sha: str = attrs.field(init=False)
    #: Every script made, for SCRIPT LOAD when a connection opens (EVALSHA then never misses).
    made: ClassVar[list[Script]] = []

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        Script.made.append(self)


# -- the session store -------------------------------------------------------------

#: KEYS[1] the record; ARGV[1] TTL ms, then field/value pairs.
WRITE = Script("""
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
""")

#: KEYS[1] the record; ARGV field/value pairs: set only if the record exists.
UPDATE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
""")

#: KEYS records; ARGV (seen, TTL ms) per key. Returns the 1-based indexes of records that are gone.
TOUCH = Script("""
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'seen', ARGV[2 * i - 1])
    redis.call('PEXPIRE', key, ARGV[2 * i])
  else
    missing[#missing + 1] = i
  end
end
return missing
""")

#: KEYS[1] the record, KEYS[2] the set of its event-log keys: delete them all.
REMOVE = Script("""
local logs = redis.call('SMEMBERS', KEYS[2])
for _, key in ipairs(logs) do
  redis.call('DEL', key)
end
redis.call('DEL', KEYS[2])
return redis.call('DEL', KEYS[1])
""")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def record_from_hash(session_id: str, flat: list[Any]) -> SessionRecord | None:
    fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    try:
        return SessionRecord(
            id=session_id, server=fields["server"], transport=fields["transport"], created=float(fields["created"]),
            protocol_version=fields.get("proto") or None, instance=fields.get("instance") or None,
            last_seen=float(fields["seen"]) if fields.get("seen") else None, owner=fields.get("owner") or None,
        )
    except (KeyError, ValueError):
        return None


def record_fields(record: SessionRecord) -> list[Any]:
    flat: list[Any] = [
        "server", record.server, "transport", record.transport, "created", repr(record.created),
        "seen", repr(record.last_seen if record.last_seen is not None else record.created),
    ]
    if record.instance is not None:
        flat += ["instance", record.instance]
    if record.protocol_version is not None:
        flat += ["proto", record.protocol_version]
    if record.owner is not None:
        flat += ["owner", record.owner]
    return flat


#: Transports whose sessions live as long as their connection: never idle-expired while owned.
CONNECTED_TRANSPORTS = ("sse", "ws")


@implementer(ISessionStore)
class RedisSessionStore:
    """Session records in Redis hashes; this instance's own records also in memory.

    A record expires ``session.maxAge`` after its last use plus ``grace`` (the
    owner refreshes it in batches, so a crashed owner's records go away by
    themselves). Redis errors propagate as failed Deferreds; callers that only
    record something log them, and ``restore()`` writes every owned record again
    once Redis is back.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, keys: Keys, instance: str, max_age_ms: int, reactor: Any,
                 grace: float = 60.0):
        self._redis = redis
        self.keys = keys
        self.instance = instance
        self._max_age = max_age_ms / 1000.0
        self._reactor = reactor
        self.grace = grace
        self._local: dict[str, SessionRecord] = {}
        #: Told when one of this instance's sessions ends (mcpgw.cluster tells the other instances).
        self.on_remove: Callable[[str], None] | None = None

    def owned(self) -> list[SessionRecord]:
        return list(self._local.values())

    def local(self, session_id: str) -> SessionRecord | None:
        """This instance's own record of a session (what Redis was last told), or None."""
        return self._local.get(session_id)

    def ttl_ms(self, record: SessionRecord) -> int:
        now = self._reactor.seconds()
        if record.transport in CONNECTED_TRANSPORTS:
            left = self._max_age
        else:
            seen = record.last_seen if record.last_seen is not None else record.created
            left = max(0.0, self._max_age - (now - seen))
        return max(1, int((left + self.grace) * 1000))

    def _write(self, record: SessionRecord) -> defer.Deferred[None]:
        d = self._redis.eval(WRITE, [self.keys.session(record.id)], [self.ttl_ms(record), *record_fields(record)])
        return d.addCallback(lambda _: None)

    # ISessionStore

    def add(self, record: SessionRecord) -> defer.Deferred[None]:
        if record.instance is None:
            record.instance = self.instance
        if record.last_seen is None:
            record.last_seen = record.created
        self._local[record.id] = record
        return self._write(record)

    def get(self, session_id: str) -> defer.Deferred[SessionRecord | None]:
        local = self._local.get(session_id)
        if local is not None:
            return defer.succeed(local)
        d = self._redis.execute("HGETALL", self.keys.session(session_id))
        return d.addCallback(lambda flat: record_from_hash(session_id, flat) if flat else None)

    def update(self, session_id: str, **fields: Any) -> defer.Deferred[None]:
        record = self._local.get(session_id)
        if record is not None:
            for name, value in fields.items():
                setattr(record, name, value)
        names = {"protocol_version": "proto", "last_seen": "seen", "owner": "owner", "instance": "instance"}
        flat: list[Any] = []
        for name, value in fields.items():
            if name in names and value is not None:
                flat += [names[name], value if isinstance(value, str) else repr(value)]
        if not flat:
            return defer.succeed(None)
        return self._redis.eval(UPDATE, [self.keys.session(session_id)], flat).addCallback(lambda _: None)

    def touch(self, seen: Mapping[str, float]) -> defer.Deferred[None]:
        keys: list[str] = []
        args: list[Any] = []
        records: list[SessionRecord] = []
        for session_id, when in seen.items():
            record = self._local.get(session_id)
            if record is None:
                continue
            record.last_seen = when
            records.append(record)
            keys.append(self.keys.session(session_id))
            args += [repr(when), self.ttl_ms(record)]
        if not keys:
            return defer.succeed(None)

        def rewrite(missing: list[int]) -> Any:
            # Gone from Redis (a restart without persistence, an eviction): write them whole again.
            again = [self._write(records[i - 1]) for i in missing or [] if records[i - 1].id in self._local]
            return defer.gatherResults(again, consumeErrors=True).addCallback(lambda _: None) if again else None

        return self._redis.eval(TOUCH, keys, args).addCallback(rewrite)

    def remove(self, session_id: str) -> defer.Deferred[None]:
        if self._local.pop(session_id, None) is not None and self.on_remove is not None:
            self.on_remove(session_id)
        d = self._redis.eval(REMOVE, [self.keys.session(session_id), self.keys.streams(session_id)])
        return d.addCallback(lambda _: None)

    # for the registry

    def restore(self) -> defer.Deferred[None]:
        """Write every owned record again (Redis came back, maybe empty)."""
        writes = [self._write(record) for record in self.owned()]
        return defer.gatherResults(writes, consumeErrors=True).addCallback(lambda _: None)


# -- the instance registry ---------------------------------------------------------


class InstanceRegistry(Service):
    """This instance's heartbeat key, and the batched refresh of its sessions' records.

    Every ``interval`` seconds: ``SET PREFIX instance:ID ... PX ttl`` and a PING on the
    pub/sub connection (so a silent network drop is noticed); every
    ``touch_interval`` seconds: one TOUCH script for the owned sessions used
    since the last one (and every SSE/WebSocket session, which live as long as
    their connection). When Redis comes back: the heartbeat and every owned
    record at once.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, store: RedisSessionStore, reactor: Any, interval: float = 1.0,
                 sessions: Callable[[], Iterable[Any]] = lambda: (), touch_interval: float = 30.0):
        self._redis = redis
        self.store = store
        self.keys = store.keys
        self.instance = store.instance
        self._reactor = reactor
        self.interval = interval
        self.ttl = max(3 * interval, interval + 1.0)
        self.touch_interval = max(interval, touch_interval)
        self._sessions = sessions
        self._loop: LoopingCall | None = None
        self._last_touch = 0.0
        #: The rewrite of every owned record after the last reconnect.
        self.restoring: defer.Deferred[None] = defer.succeed(None)
        self.started = reactor.seconds()
        self._info = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started}
        self._failures = 0

    def startService(self) -> None:
        super().startService()
        self._redis.on_change(self._changed)
        self._last_touch = self._reactor.seconds()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(lambda f: self.log.failure("registry loop stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self._redis.commands.up:
            return defer.succeed(None)
        # Gone at once for the others (not after the TTL): their requests for our sessions get 404.
        d = self._redis.execute("DEL", self.keys.instance(self.instance))
        return d.addErrback(lambda f: self.log.debug("registry: heartbeat key not deleted: {e}", e=f.getErrorMessage()))

    def _changed(self, available: bool) -> None:
        if available and self.running:
            self.beat(force_touch=True)
            self.restoring = self.store.restore().addErrback(self._failed, "restoring session records")

    def beat(self, force_touch: bool = False) -> None:
        if not self._redis.commands.up:
            return
        self._redis.execute("SET", self.keys.instance(self.instance), self.heartbeat(), "PX", int(self.ttl * 1000)) \
            .addCallbacks(self._ok, self._failed, errbackArgs=("heartbeat",))
        if self._redis.pubsub.up:
            self._redis.ping_pubsub().addErrback(self._failed, "pub/sub ping")
        now = self._reactor.seconds()
        if force_touch or now - self._last_touch >= self.touch_interval:
            self._last_touch = now
            self.touch()

    def heartbeat(self) -> bytes:
        """The heartbeat key's value; ``redis``: the Redis run it is written to (see ``alive``)."""
        return jsonrpc.dumps({**self._info, "redis": self._redis.run_id})

    def touch(self) -> defer.Deferred[None]:
        """Refresh the records of the sessions used since the last touch."""
        now = self._reactor.seconds()
        seen: dict[str, float] = {}
        for session in self._sessions():
            record = self.store.local(session.id)
            if record is None:
                continue
            if session.transport in CONNECTED_TRANSPORTS:
                seen[session.id] = now
            elif session.last_seen != record.last_seen:
                seen[session.id] = session.last_seen
        if not seen:
            return defer.succeed(None)
        return self.store.touch(seen).addErrback(self._failed, "refreshing session records")

    def alive(self, instance: str, connected: bool = False) -> defer.Deferred[bool]:
        """Whether ``instance`` has written its heartbeat within its TTL; with ``connected``, also
        whether its process still holds a connection to Redis.

        ``connected`` is for the moment a publish to ``instance`` reached nobody: a killed process
        loses its connections at once (the kernel closes them), while its heartbeat key lasts up to
        its TTL. A live instance that only lost its pub/sub connection still has its command
        connection (named with ``CLIENT SETNAME``), so it is not taken for dead. A heartbeat written
        to an earlier run of Redis (a persistent Redis restarted, the instance not reconnected yet),
        or a Redis that refuses CLIENT LIST: the heartbeat alone decides.
        """
        if instance == self.instance:
            return defer.succeed(True)
        if not connected:
            return self._redis.execute("EXISTS", self.keys.instance(instance)).addCallback(lambda n: bool(n))
        return self._redis.execute("GET", self.keys.instance(instance)).addCallback(self._connected, instance)

    def _connected(self, heartbeat: Any, instance: str) -> Any:
        if heartbeat is None:
            return False
        try:
            written_to = jsonrpc.loads(heartbeat).get("redis")
        except (ValueError, AttributeError):
            written_to = None
        if written_to is None or written_to != self._redis.run_id:
            return True
        name = client_name(self.keys, instance).encode()
        return self._redis.connected_names().addCallbacks(lambda names: names is None or name in names,
                                                         lambda f: True)

    def _ok(self, _: Any) -> None:
        self._failures = 0

    def _failed(self, f: Any, what: str) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 60 == 0:
            self.log.warn("registry: {what} failed: {error}", what=what, error=f.getErrorMessage())  # noqa: G010 (twisted.logger)


# -- shared rate-limit counters ------------------------------------------------------

#: KEYS[1] the window's counter; ARGV[1] the window in ms. Returns {count, ms left in the window}.
RATE_HIT = Script("""
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
""")


@implementer(IRateLimiter)
class RedisRateLimiter:
    """``mcpgw.ratelimit.IRateLimiter`` with the counters in Redis: one fixed window per key for
    every instance, counted atomically by one script (INCR, PEXPIRE on the first hit, PTTL).

    While Redis is unavailable the instance counts on its own (a MemoryRateLimiter with the same
    limit and window): limits are then per instance, not off, and requests are not slowed down.
    """

    log = Logger(observer=logs.observer)

    def __init__(self, redis: RedisConnection, keys: Keys, limit: int, window: float, clock: Any,
                 max_keys: int = 100_000):
        self._redis = redis
        self._keys = keys
        self.limit = limit
        self.window = window
        self._fallback = MemoryRateLimiter(limit, window, clock, max_keys)
        self._degraded = False

    def hit(self, key: str) -> defer.Deferred[Any]:
        if not self._redis.commands.up:
            return defer.succeed(self._local(key, self._redis.problem()))
        d = self._redis.eval(RATE_HIT, [self._keys.rate(key)], [max(1, int(self.window * 1000))])
        return d.addCallbacks(self._decided, self._failed, errbackArgs=(key,))

    def _decided(self, reply: list[Any]) -> Any:
        if self._degraded:
            self._degraded = False
            self.log.info("rate limiter: counting in Redis again")
        count, ttl = int(reply[0]), max(0, int(reply[1]))
        allowed = count <= self.limit
        return Decision(allowed, self.limit, self.limit - count if allowed else 0, ttl / 1000.0, self.window)

    def _failed(self, f: Any, key: str) -> Any:
        if not f.check(RedisUnavailable):
            return f
        return self._local(key, f.getErrorMessage())

    def _local(self, key: str, why: str | None) -> Any:
        if not self._degraded:
            self._degraded = True
            self.log.warn("rate limiter: Redis unavailable ({why}); counting per instance until it is back", why=why)  # noqa: G010 (twisted.logger)
        return self._fallback.decide(key)
