"""Redis for several gateway instances, one module per responsibility.

- ``mcpgw.store.redis_url``: ``redis.url`` parsed into a ``RedisAddress`` (no Redis client, for the config);
- ``keys``: the key schema and the Lua scripts;
- ``connection``: ``RedisConnection``, the command and pub/sub connections kept open;
- ``sessions``: ``RedisSessionStore``, session records in Redis hashes;
- ``registry``: ``InstanceRegistry``, this instance's heartbeat and the batched record refresh;
- ``ratelimit``: ``RedisRateLimiter``, rate-limit counters shared by every instance.

The names are re-exported here so that users import them from ``mcpgw.store.redis``
without knowing the layout. Importing this package imports txredisapi; the
configuration imports ``mcpgw.store.redis_url`` instead.
"""

from __future__ import annotations

from mcpgw.store.redis.connection import RedisConnection, RedisUnavailable
from mcpgw.store.redis.keys import RATE_HIT, REMOVE, TOUCH, UPDATE, WRITE, Keys, Script, client_name, new_instance_id
from mcpgw.store.redis.ratelimit import RedisRateLimiter
from mcpgw.store.redis.registry import InstanceRegistry
from mcpgw.store.redis.sessions import CONNECTED_TRANSPORTS, RedisSessionStore, record_fields, record_from_hash
from mcpgw.store.redis_url import DEFAULT_PORT, RedisAddress, parse_url

__all__ = [
    "CONNECTED_TRANSPORTS",
    "DEFAULT_PORT",
    "RATE_HIT",
    "REMOVE",
    "TOUCH",
    "UPDATE",
    "WRITE",
    "InstanceRegistry",
    "Keys",
    "RedisAddress",
    "RedisConnection",
    "RedisRateLimiter",
    "RedisSessionStore",
    "RedisUnavailable",
    "Script",
    "client_name",
    "new_instance_id",
    "parse_url",
    "record_fields",
    "record_from_hash",
]
