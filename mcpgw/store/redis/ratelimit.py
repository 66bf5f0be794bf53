"""Shared rate-limit counters: one fixed window per key for every instance, counted in Redis."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mcpgw import logs
from mcpgw.ratelimit import Decision, IRateLimiter, MemoryRateLimiter
from mcpgw.store.redis.connection import RedisConnection, RedisUnavailable
from mcpgw.store.redis.keys import RATE_HIT, Keys


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
