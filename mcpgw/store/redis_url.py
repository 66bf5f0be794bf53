"""Where Redis is: ``redis.url`` (and ``redis.password``) parsed into a ``RedisAddress``.

Standard library and attrs only, outside the ``mcpgw.store.redis`` package: the
configuration validates ``redis.url`` without importing txredisapi or the store.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import attrs

DEFAULT_PORT = 6379


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
