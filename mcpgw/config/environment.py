"""The gateway's own environment variables: which override the file, and which a child never sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcpgw.config.checks import ConfigError
from mcpgw.config.oauth import CLIENT_SECRET_ENV

#: Environment variables the gateway reads for itself (secrets and its own settings); a child never
#: sees them, and ``inheritEnv`` naming one is a config error.
PRIVATE_ENV = frozenset({
    "SESSION_SECRET", "REDIS_PASSWORD", "REDIS_URL", "MCPGW_PORT", "MCPGW_HOST",
    "MCPGW_AUTH_TOKENS", "MCPGW_JWT_SECRET", "MCPGW_ADMIN_TOKEN", CLIENT_SECRET_ENV,
})


def with_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the top-level document with the environment's overrides of the file applied.

    The overrides of a section (``auth``, ``admin``) are applied by its own parser. A section of the
    wrong type is left as it is for its own check to name.
    """
    raw = dict(raw)
    if "MCPGW_PORT" in environ:
        try:
            raw["port"] = int(environ["MCPGW_PORT"])
        except ValueError:
            raise ConfigError("MCPGW_PORT", f"must be an integer, not {environ['MCPGW_PORT']!r}") from None
    if "MCPGW_HOST" in environ:
        raw["host"] = environ["MCPGW_HOST"]
    if "LOG_LEVEL" in environ:
        raw["logLevel"] = environ["LOG_LEVEL"].lower()
    if "LOG_FORMAT" in environ:
        raw["logFormat"] = environ["LOG_FORMAT"].lower()
    if "SESSION_SECRET" in environ and isinstance(raw.get("session", {}), dict):
        raw["session"] = {**raw.get("session", {}), "secret": environ["SESSION_SECRET"]}
    if "REDIS_PASSWORD" in environ and "REDIS_URL" not in environ and raw.get("redis") is None:
        # A password alone says nothing about where Redis is: turning cluster mode on at a default
        # address would make a single gateway depend on a Redis it was never told about.
        raise ConfigError("REDIS_PASSWORD", "is set but neither redis (in the config file) nor REDIS_URL is: "
                                            "set one of them to use Redis, or unset REDIS_PASSWORD")
    if ("REDIS_URL" in environ or "REDIS_PASSWORD" in environ) and isinstance(raw.get("redis") or {}, dict):
        redis_raw = dict(raw.get("redis") or {})
        if "REDIS_URL" in environ:
            redis_raw["url"] = environ["REDIS_URL"]
        if "REDIS_PASSWORD" in environ:
            redis_raw["password"] = environ["REDIS_PASSWORD"]
        raw["redis"] = redis_raw
    return raw
