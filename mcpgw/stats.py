"""A 15-minute ring of the gateway's own figures, for the console's chart (``GET /admin/stats``).

Every ``interval`` seconds (a LoopingCall on the injected reactor) the sampler
reads the gateway's Metrics: requests answered or not, errors of every kind,
and the latency histograms. Each sample holds the rates over the interval
since the previous one and the p50/p99 latency of the responses in it
(interpolated within the histogram buckets, as Prometheus'
``histogram_quantile`` does), plus the live sessions by transport.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcpgw import logs
from mcpgw.metrics import DURATION_BUCKETS, Metrics

WINDOW = 15 * 60.0


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q`` quantile (seconds) of a histogram given as counts per bucket (DURATION_BUCKETS, then +Inf)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(DURATION_BUCKETS):
                return DURATION_BUCKETS[-1]  # beyond the last bound: say the bound
            low = DURATION_BUCKETS[i - 1] if i else 0.0
            return low + (DURATION_BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return DURATION_BUCKETS[-1]


class Totals:
    """Cumulative figures read from one Metrics at one moment."""

    def __init__(self, metrics: Metrics):
        self.requests = 0
        self.errors = 0.0
        self.histogram = [0] * (len(DURATION_BUCKETS) + 1)
        if not metrics.enabled:
            return
        for bound in list(metrics._bound.values()):
            self.requests += sum(bound.requests.values())
        for family in metrics.errors.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    self.errors += sample.value
        for histogram in metrics.durations.values():
            for i, count in enumerate(histogram.counts):
                self.histogram[i] += count


class StatsSampler(Service):
    """Keeps the last 15 minutes of samples; ``snapshot()`` is what ``/admin/stats`` answers."""

    log = Logger(observer=logs.observer)

    def __init__(self, metrics: Metrics, sessions: Callable[[], dict[str, int]], reactor: Any, interval: float = 5.0):
        self._metrics = metrics
        self._sessions = sessions
        self._reactor = reactor
        self.interval = interval
        self.samples: deque[dict[str, Any]] = deque(maxlen=max(1, math.ceil(WINDOW / interval)))
        self._last: Totals | None = None
        self._last_time = 0.0
        self._loop: LoopingCall | None = None

    def sample(self) -> None:
        """Take one sample (the LoopingCall's call; tests call it on a Clock)."""
        now = self._reactor.seconds()
        totals = Totals(self._metrics)
        last, self._last = self._last, totals
        elapsed, self._last_time = now - self._last_time, now
        if last is None or elapsed <= 0:
            return  # the first reading is the baseline
        histogram = [b - a for a, b in zip(last.histogram, totals.histogram)]
        p50, p99 = quantile(0.5, histogram), quantile(0.99, histogram)
        self.samples.append({
            "time": round(now, 3),
            "requests": totals.requests - last.requests,
            "requestRate": round((totals.requests - last.requests) / elapsed, 4),
            "errors": totals.errors - last.errors,
            "errorRate": round((totals.errors - last.errors) / elapsed, 4),
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
            "sessions": self._sessions(),
        })

    def snapshot(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "window": WINDOW,
            "metricsEnabled": self._metrics.enabled,
            "now": round(self._reactor.seconds(), 3),
            "latencyUnit": "ms",
            "samples": list(self.samples),
        }

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(lambda f: self.log.failure("stats sampler stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
