"""What the gateway keeps in Redis: the key schema, and the Lua scripts that change it atomically.

Keys (``PREFIX`` = ``redis.keyPrefix``, default ``mcpgw:``)::

    PREFIX session:ID          hash: server transport instance created seen [proto] [owner]; PEXPIRE idle
    PREFIX instance:ID         string: {"pid", "host", "started"}; PX heartbeat TTL
    PREFIX to:ID               pub/sub channel of one instance (mcpgw.cluster)
    PREFIX events:ID:STREAM    stream: one SSE stream's event log (mcpgw.cluster); PEXPIRE idle
    PREFIX streams:ID          set: the event-log keys of a session, deleted with it
    PREFIX rate:KEY            rate-limit window counter (mcpgw.ratelimit)

No Redis client here: the names and scripts are plain data, and a ``Script`` is
registered when it is made so that every connection loads all of them.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import ClassVar

import attrs


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


# -- the session store's scripts (mcpgw.store.redis.sessions) ------------------------

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


# -- the shared rate-limit counter's script (mcpgw.store.redis.ratelimit) ------------

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
