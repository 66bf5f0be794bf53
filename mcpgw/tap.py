"""``twistd mcpgw``: options and the service tree."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import prometheus_client
from twisted.application import service, strports
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from mcpgw import _fast, heap, logs
from mcpgw.config import EXAMPLE_SECRETS, LOG_FORMATS, ConfigError, GatewayConfig, load
from mcpgw.metrics import Metrics, NoMetrics
from mcpgw.observability import Observability
from mcpgw.origin import HostChecked, HostPolicy, listen_interface
from mcpgw.pool import PoolManager
from mcpgw.session import SessionManager
from mcpgw.transports.common import GatewayContext
from mcpgw.transports.sse import Heartbeat
from mcpgw.web import build_site


class Options(usage.Options):
    optFlags = [
        ["insecure-dev", None, "Start even with an example secret (change-this-secret) on a non-loopback address."],
    ]
    optParameters = [
        ["config", "c", "conf/gateway.json", "Path to the gateway's JSON config file."],
        ["metrics-listen", None, None,
         "Endpoint for /metrics, overriding host/metrics.port (e.g. tcp:9091:interface=127.0.0.1); "
         "metrics.enabled: false still turns metrics off."],
        ["log-format", None, None, "Log lines as text or json (overrides logFormat / LOG_FORMAT)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, overriding host/port (e.g. tcp:3000:interface=127.0.0.1); give it
        again to listen on several (Host and Origin are checked against every one)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if self["log-format"] is not None and self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self['log-format']!r}")
        install_default_reactor(self)


def install_default_reactor(options: usage.Options) -> bool:
    """Under ``twistd mcpgw`` without ``--reactor``: install mcpgw's epoll reactor (mcpgw._fast.reactor)
    in place of Twisted's default; True if it did.

    twistd installs the reactor named by ``--reactor`` while it parses its own options, before this
    subcommand's; without one, the first ``from twisted.internet import reactor`` installs Twisted's
    default, which twistd does only after every option is parsed. So the global reactor is still
    free here exactly when the user chose none. An Options parsed outside twistd (an embedding
    application, a test) has no twistd parent and installs nothing.
    """
    from twisted.application.app import ServerOptions

    if not isinstance(options.parent, ServerOptions):
        return False
    if "twisted.internet.reactor" in sys.modules or not sys.platform.startswith("linux"):
        return False
    from mcpgw._fast import reactor as fast_reactor

    fast_reactor.install()
    return True


class GatewayService(service.MultiService):
    """The gateway's service tree; also gives twistd the JSON log observer when asked.

    twistd (``AppLogger.start``) takes the log observer from the application's
    ``ILogObserver`` component. makeService cannot see the application, but
    twistd hands it to ``setServiceParent``, before logging starts.
    """

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_log = Logger(namespace="mcpgw.tap", observer=logs.observer)


#: ``--listen``: one strports description, several, or None (host/port from the config).
Listens = str | Sequence[str] | None


def listens_of(listen: Listens) -> list[str]:
    """The ``--listen`` descriptions as a list (empty: host/port from the config)."""
    if listen is None:
        return []
    return [listen] if isinstance(listen, str) else list(listen)


def listens_on_loopback_only(config: GatewayConfig, listen: Listens) -> bool:
    """True when the gateway can be reached from this machine only (or a Unix socket), on every
    endpoint it listens on."""
    listens: list[str | None] = [*listens_of(listen)] or [None]
    return all(_on_loopback(config, one) for one in listens)


def _on_loopback(config: GatewayConfig, listen: str | None) -> bool:
    if listen is None:
        host = config.host
    elif listen.startswith("unix:"):
        return True
    else:
        m = re.search(r"(?:^|:)interface=((?:\\.|[^:])*)", listen)
        host = m.group(1).replace("\\", "") if m else "0.0.0.0"
    return host in _LOOPBACK or host.startswith("127.")


def check_secrets(config: GatewayConfig, listen: Listens, insecure_dev: bool) -> None:
    """Refuse an example secret (docs, .env.example) unless on loopback or ``--insecure-dev``."""
    if insecure_dev or listens_on_loopback_only(config, listen):
        return
    jwt = config.auth.jwt
    for key, value in (("session.secret", config.session.secret), ("auth.jwt.secret", jwt.secret if jwt else None)):
        if value in EXAMPLE_SECRETS:
            raise ConfigError(key, f"is the example value {value!r}: set a random secret (openssl rand -hex 32), "
                                   "listen on loopback only, or pass --insecure-dev")


#: Pending connections the kernel queues for accept(); Twisted's default of 50 drops
#: connections when a thousand clients connect at once.
LISTEN_BACKLOG = 1024


def endpoint_for(config: GatewayConfig) -> str:
    host = config.host.replace(":", "\\:")
    return f"tcp:{config.port}:interface={host}:backlog={LISTEN_BACKLOG}"


def metrics_endpoint_for(config: GatewayConfig) -> str:
    host = config.metrics.host.replace(":", "\\:")
    return f"tcp:{config.metrics.port}:interface={host}"


def build_service(
    config: GatewayConfig, reactor: Any, listen: Listens = None, metrics_listen: str | None = None,
    serve: bool = True,
) -> GatewayService:
    """Everything one gateway runs: sessions (and their children), keepalive, the web endpoint,
    and the metrics endpoint (its own port) unless ``metrics.enabled`` is false.

    ``serve=False`` (mcpgw.Gateway, embedded in another application): no listening port at all;
    the caller mounts ``top.site.resource`` where it likes."""
    logs.set_level(config.logLevel)
    top = GatewayService()
    # The first service: stopped last, once the sessions' last answers have ended their spans and audit lines.
    observed = Observability(config, reactor)
    observed.setServiceParent(top)
    metrics = Metrics(config.servers) if config.metrics.enabled else NoMetrics()
    top.metrics = metrics  # type: ignore[attr-defined]
    cluster = None
    if config.redis is not None:
        from mcpgw.cluster import Cluster

        # Before the sessions: stopped after them, so their records are removed over a live connection.
        cluster = Cluster(config, reactor, metrics=metrics)
        cluster.setServiceParent(top)
    pools = PoolManager(config, reactor)  # "sessions": "pooled" servers' children
    # A pooled server's sessions, on any transport, are served by its pool.
    sessions = SessionManager(config, reactor, store=cluster.store if cluster else None, metrics=metrics,
                              pooled=pools.session_factory, unavailable=cluster.unavailable if cluster else None)
    sessions.setServiceParent(top)
    heartbeat = Heartbeat(config.sse.keepalive, reactor)
    heartbeat.setServiceParent(top)
    pools.setServiceParent(top)
    web_listens = listens_of(listen) or [endpoint_for(config)]
    extra: dict[str, Any] = {}
    if cluster is not None and config.rateLimit.enabled:
        # Shared counters: the limit holds for the whole cluster, whichever instance is hit.
        from mcpgw.store.redis import RedisRateLimiter

        rl = config.rateLimit
        extra["limiter"] = RedisRateLimiter(cluster.redis, cluster.keys, rl.max, rl.window_seconds, reactor, rl.maxKeys)
    ctx = GatewayContext(config=config, sessions=sessions, heartbeat=heartbeat, reactor=reactor, metrics=metrics,
                         cluster=cluster, pools=pools, tracer=observed.tracer, audit=observed.audit,
                         # Host and Origin are judged by where the site really listens (--listen wins over host/port).
                         hosts=HostPolicy.for_listens(config, web_listens if serve else None), **extra)
    if cluster is not None:
        cluster.bind(ctx)
    top.context = ctx  # type: ignore[attr-defined]
    site = build_site(ctx)
    top.site = site  # type: ignore[attr-defined]
    _control(top, ctx, site, reactor)
    if not serve:
        return top
    for web_listen in web_listens:
        strports.service(web_listen, site).setServiceParent(top)
    if metrics.enabled:
        m_listen = metrics_listen or metrics_endpoint_for(config)
        strports.service(m_listen, _host_checked(metrics.site(), config, m_listen)).setServiceParent(top)
    return top


def _host_checked(site: Any, config: GatewayConfig, listen: str) -> Any:
    """The metrics site, behind a Host check of its own when its listen endpoint is on loopback
    (a DNS-rebinding page must not read /metrics); a scraper on another host sends any name."""
    policy = HostPolicy([listen_interface(listen)], config.allowedHosts)
    if policy.loopback:
        site.resource = HostChecked(site.resource, policy)
    return site


def _control(top: GatewayService, ctx: GatewayContext, site: Any, reactor: Any) -> None:
    """Runtime control (``top.control``: mcpgw.control), and the admin API, console and stats
    sampler when an admin token is configured (mcpgw.admin)."""
    from mcpgw.control import ServerControl

    control = ServerControl(ctx, site.resource)
    top.control = control  # type: ignore[attr-defined]
    admin = ctx.config.admin
    if admin.token is not None:
        from mcpgw import admin as admin_api
        from mcpgw.stats import StatsSampler

        sampler = StatsSampler(ctx.metrics, control.sessions_by_transport, reactor, admin.statsInterval)
        sampler.setServiceParent(top)
        top.stats = sampler  # type: ignore[attr-defined]
        admin_api.install(site.resource, control, sampler, admin.token, audit=ctx.audit, failures=ctx.failures)


def warn_if_open(config: GatewayConfig, listen: Listens, log: Logger = _log) -> None:
    """One warning line when anyone who reaches the port may start the servers' children."""
    if config.auth.enabled or listens_on_loopback_only(config, listen):
        return
    address = ", ".join(listens_of(listen)) or f"{config.host}:{config.port}"
    log.warn("listening on {address} without authentication: anyone who can reach it can start "
             "every configured server's children (set auth, or bind 127.0.0.1 / MCPGW_HOST=127.0.0.1)",
             address=address)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load(options["config"])
        check_secrets(config, options["listen"], bool(options["insecure-dev"]))
    except ConfigError as e:
        # One clear line, a non-zero exit, nothing listening.
        sys.stderr.write(f"mcpgw: config error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    # This process is twistd's own: no ``*_created`` series (they double a scrape and no panel uses them).
    prometheus_client.disable_created_metrics()
    # Before anything is built: the config's fastPaths decides which paths the service takes (mcpgw._fast).
    _fast.configure(config.fastPaths)
    # The process is the gateway's alone: non-dumpable (a child cannot read its environ or memory)
    # and the subreaper of whatever its children leave behind (mcpgw.procsec).
    from mcpgw import procsec

    guard = procsec.harden(reactor)
    top = build_service(config, reactor, options["listen"], options["metrics-listen"])
    if guard is not None:
        procsec.GuardService(guard).setServiceParent(top)
    warn_if_open(config, options["listen"])
    # What startup made is frozen and collections spaced out when the service starts (mcpgw.heap).
    heap.Settle().setServiceParent(top)
    # Text or JSON, behind logLevel and the cleaning of client-controlled fields (mcpgw.logs).
    top.log_observer = logs.observer_for(options.parent, options["log-format"] or config.logFormat)
    return top
