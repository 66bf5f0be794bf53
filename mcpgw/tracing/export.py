"""Finished spans to the collector: a bounded queue the reactor fills, a thread that POSTs batches.

The reactor's part of a span's end is its encoding (mcpgw.tracing.otlp's ``Encoder.span``: a few
dozen bytes, mostly cached) and one ``deque.append`` (and, once per full batch, an ``Event.set``):
it never waits on the network. A full queue drops the span and counts it (``dropped``), as
OpenTelemetry's BatchSpanProcessor does. The thread wakes when a batch is full, and sends full
batches only, or after ``interval`` seconds without one, and sends what there is; it wraps each
batch (``Encoder.envelope``) and POSTs it over one kept-alive HTTP connection (OTLP/HTTP,
``application/x-protobuf``). The SDK's environment variables for both (``OTEL_BSP_*``, the
exporter's timeout, gzip and certificates) apply.

Why spans are encoded where they end and not in the thread: the work is the same either way (both
measured at the same instructions per call with callgrind), but done at the end a span's objects go
at once rather than waiting in the queue for the thread, and the thread holds the GIL only to hand a
batch to the socket, not for its encoding in the middle of the reactor's turns.
"""

from __future__ import annotations

import gzip
import http.client
import ssl
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from twisted.logger import Logger

from mcpgw import __version__

log = Logger()

#: Entries per export request (an entry: a span, or a request's span and the leg that ended with it):
#: the per-request costs (HTTP, the resource and scope) spread over this many.
MAX_BATCH = 512
#: Entries waiting at most; more are dropped. Several batches: the thread can fall behind a burst.
MAX_QUEUE = 8192
#: Seconds between exports of a batch that is not full.
INTERVAL = 2.0
#: Retried once (a new connection): the collector closed the kept-alive one, or is restarting.
_RETRIED = frozenset({429, 502, 503, 504})


class Settings(NamedTuple):
    """What the OpenTelemetry SDK's BatchSpanProcessor and OTLP/HTTP exporter read from the environment
    (``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_[TRACES_]*``), honoured here too."""

    max_batch: int = MAX_BATCH
    max_queue: int = MAX_QUEUE
    interval: float = INTERVAL
    timeout: float = 10.0
    gzip: bool = False
    cafile: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Unset or unusable values (not a positive number) keep the default, as the SDK does."""
        def otlp(name: str) -> str | None:
            return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or None

        def positive(value: str | None, default: float) -> float:
            try:
                number = float(value) if value else default
            except ValueError:
                return default
            return number if number > 0 else default

        d = cls()
        return cls(
            max_batch=int(positive(environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), d.max_batch)),
            max_queue=int(positive(environ.get("OTEL_BSP_MAX_QUEUE_SIZE"), d.max_queue)),
            interval=positive(environ.get("OTEL_BSP_SCHEDULE_DELAY"), d.interval * 1000) / 1000,
            timeout=positive(otlp("TIMEOUT"), d.timeout),
            gzip=(otlp("COMPRESSION") or "").strip().lower() == "gzip",
            cafile=otlp("CERTIFICATE"), client_cert=otlp("CLIENT_CERTIFICATE"), client_key=otlp("CLIENT_KEY"),
        )


class OtlpHttp:
    """POSTs encoded export requests to ``endpoint`` (an OTLP/HTTP ``/v1/traces`` URL)."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], settings: Settings | None = None):
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": f"mcpgw/{__version__}", **headers}
        self._settings = settings = settings or Settings()
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._connection: http.client.HTTPConnection | None = None

    def send(self, body: bytes) -> bool:
        """True when the collector took it (2xx)."""
        if self._settings.gzip:
            body = gzip.compress(body, compresslevel=6)
        status: int | str = "no answer"
        for _attempt in range(2):
            try:
                connection = self._connection or self._connect()
                connection.request("POST", self._path, body=body, headers=self._headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as e:
                self.close()
                status = type(e).__name__
                continue
            if 200 <= status < 300:
                return True
            if status not in _RETRIED:
                break
            self.close()
        log.warn("tracing: the collector did not take {count} bytes of spans ({status})", count=len(body), status=status)
        return False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPConnection:
        settings = self._settings
        if self._https:
            context = ssl.create_default_context(cafile=settings.cafile)
            if settings.client_cert:
                context.load_cert_chain(settings.client_cert, settings.client_key)
            self._connection = http.client.HTTPSConnection(self._host, self._port, timeout=settings.timeout, context=context)
        else:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=settings.timeout)
        return self._connection


class BatchExport:
    """The queue between the reactor and the export thread; ``put`` is the reactor's side."""

    def __init__(self, encode: Callable[[list[Any]], bytes], send: Callable[[bytes], bool], *,
                 max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE, interval: float = INTERVAL):
        self._encode = encode
        self._send = send
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._interval = interval
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._stopping = False
        #: Spans dropped because the queue was full; spans the collector did not take.
        self.dropped = 0
        self.failed = 0
        self.exported = 0
        # Started by the first span, not here: twistd builds the service before it forks into the
        # background, and a thread does not follow a fork.
        self._thread: threading.Thread | None = None

    def put(self, span: Any) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            self.dropped += 1
            return
        queue.append(span)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mcpgw-otlp-export", daemon=True)
            self._thread.start()
        if len(queue) == self._max_batch:
            self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Export what is queued, stop the thread (blocks: the service calls it in a thread pool)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.dropped or self.failed:
            log.warn("tracing: {dropped} spans dropped (queue full), {failed} not taken by the collector",
                     dropped=self.dropped, failed=self.failed)

    def _run(self) -> None:
        while True:
            full = self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping
            # Woken by a full batch: full batches only (what follows goes with the next; a batch is
            # sent per max_batch spans, not per wake-up); by the interval or the stop: everything.
            self._drain(self._max_batch if full and not stopping else 1)
            if stopping:
                return

    def _drain(self, least: int) -> None:
        queue = self._queue
        while len(queue) >= least and queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            try:
                sent = self._send(self._encode(batch))
            except Exception:  # noqa: BLE001 - the export thread outlives one bad batch
                log.failure("tracing: a batch of {count} spans could not be exported", count=len(batch))
                sent = False
            if sent:
                self.exported += len(batch)
            else:
                self.failed += len(batch)
