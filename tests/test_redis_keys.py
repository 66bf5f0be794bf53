"""The Redis key schema, the session hash layout and the package's public names, without a Redis server.

Other gateway instances (possibly another version during a rolling upgrade) and
the exporter read these keys and fields, so their names are pinned here; the
store's behaviour against a real server is in tests/test_redis_store.py.
"""

from __future__ import annotations

import ast
import hashlib
import pathlib

import pytest

import mcpgw.store.redis as redis_store
from mcpgw.store import SessionRecord, redis_url
from mcpgw.store.redis import (
    RATE_HIT,
    REMOVE,
    TOUCH,
    UPDATE,
    WRITE,
    Keys,
    Script,
    client_name,
    record_fields,
    record_from_hash,
)


class TestKeys:
    def test_default_prefix(self):
        """Every key and channel name under the default prefix ``mcpgw:``."""
        keys = Keys()
        assert keys.session("s1") == "mcpgw:session:s1"
        assert keys.instance("123456789") == "mcpgw:instance:123456789"
        assert keys.channel("123456789") == "mcpgw:to:123456789"
        assert keys.events("s1", 123456789_00000001) == "mcpgw:events:s1:12345678900000001"
        assert keys.streams("s1") == "mcpgw:streams:s1"
        assert keys.rate("tools/call:alice") == "mcpgw:rate:tools/call:alice"

    def test_prefix_on_every_name(self):
        """redis.keyPrefix starts every name, so two gateways can share one Redis database."""
        keys = Keys("blue:")
        names = [keys.session("s"), keys.instance("i"), keys.channel("i"), keys.events("s", 1), keys.streams("s"),
                 keys.rate("k")]
        assert all(name.startswith("blue:") and not name.startswith("blue:mcpgw:") for name in names)

    def test_client_name_has_no_whitespace(self):
        """CLIENT SETNAME refuses spaces: the instance key with whitespace replaced names the connections."""
        assert client_name(Keys(), "123456789") == "mcpgw:instance:123456789"
        assert client_name(Keys("my gw\t"), "1") == "my_gw_instance:1"


class TestScripts:
    def test_sha_is_sha1_of_source(self):
        """EVALSHA uses the SHA1 that Redis computes for SCRIPT LOAD of the same source."""
        for script in (WRITE, UPDATE, TOUCH, REMOVE, RATE_HIT):
            assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()

    def test_every_script_is_registered(self):
        """The store's and the rate limiter's scripts are registered on import, so every connection loads them."""
        assert {WRITE, UPDATE, TOUCH, REMOVE, RATE_HIT} <= set(Script.made)

    def test_new_script_is_registered(self):
        """A script made elsewhere (mcpgw.cluster's) is loaded on new connections too."""
        script = Script("return 'test_redis_keys'")
        try:
            assert Script.made[-1] is script
        finally:
            Script.made.remove(script)


class TestSessionHash:
    def test_fields(self):
        """The hash fields of a session record, as other instances and the exporter read them."""
        record = SessionRecord(id="s1", server="fs", transport="streamable", created=100.5, protocol_version="2025-06-18",
                               instance="123456789", last_seen=101.25, owner="alice")
        assert record_fields(record) == [
            "server", "fs", "transport", "streamable", "created", "100.5", "seen", "101.25",
            "instance", "123456789", "proto", "2025-06-18", "owner", "alice",
        ]

    def test_optional_fields_left_out(self):
        """Unset optional fields are not written; ``seen`` defaults to ``created``."""
        record = SessionRecord(id="s1", server="fs", transport="sse", created=7.0)
        assert record_fields(record) == ["server", "fs", "transport", "sse", "created", "7.0", "seen", "7.0"]

    def test_round_trip_from_reply_bytes(self):
        """HGETALL replies are bytes (the connections have no charset); they read back into the same record."""
        record = SessionRecord(id="s1", server="fs", transport="ws", created=1.0, protocol_version="2025-03-26",
                               instance="123456789", last_seen=2.0, owner="bob")
        flat = [v.encode() for v in record_fields(record)]
        assert record_from_hash("s1", flat) == record

    @pytest.mark.parametrize("flat", [
        [b"server", b"fs", b"transport", b"sse"],
        [b"server", b"fs", b"transport", b"sse", b"created", b"yesterday"],
    ])
    def test_unreadable_hash_is_no_record(self, flat):
        """A hash without a required field, or with a bad number, is no record (not an error)."""
        assert record_from_hash("s1", flat) is None


class TestPackage:
    @pytest.mark.parametrize("name", [
        "InstanceRegistry", "Keys", "RedisAddress", "RedisConnection", "RedisRateLimiter", "RedisSessionStore",
        "RedisUnavailable", "Script", "client_name", "new_instance_id", "parse_url",
    ])
    def test_names_importers_use(self, name):
        """The names mcpgw.cluster, mcpgw.exporter, mcpgw.tap and the tests import from mcpgw.store.redis."""
        assert name in redis_store.__all__ and hasattr(redis_store, name)

    def test_one_url_parser(self):
        """The package's parse_url is the configuration's."""
        assert redis_store.parse_url is redis_url.parse_url

    def test_url_parser_without_redis_client(self):
        """Validating redis.url needs neither txredisapi nor the store: the parser imports only these."""
        tree = ast.parse(pathlib.Path(redis_url.__file__).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert imported == {"__future__", "urllib.parse", "attrs"}
