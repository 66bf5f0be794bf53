"""The ``tracing`` and ``auditLog`` sections: OpenTelemetry export and the audit trail.

``parse_tracing`` folds the standard ``OTEL_*`` variables that name one of its keys into the record,
so that the tracer (mcpgw.tracing) is built from one checked value; like every ``MCPGW_*`` variable,
the environment overrides the file (a deployment points the same config at its own collector):

========================================  =====================================================
``OTEL_SDK_DISABLED=true``                tracing off
``OTEL_TRACES_EXPORTER``                  ``none``: tracing off; ``otlp``: tracing on, with or
                                          without a ``tracing`` section
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``    ``endpoint``, as given (the full URL)
``OTEL_EXPORTER_OTLP_ENDPOINT``           ``endpoint``, a base URL (``/v1/traces`` appended)
``OTEL_EXPORTER_OTLP_PROTOCOL``           must be ``http/protobuf`` (the one exporter mcpgw has)
``OTEL_EXPORTER_OTLP[_TRACES]_HEADERS``   ``headers`` (``k=v,k2=v2``, values URL-encoded)
``OTEL_SERVICE_NAME``                     ``serviceName`` (else ``service.name`` in
                                          ``OTEL_RESOURCE_ATTRIBUTES``)
``OTEL_TRACES_SAMPLER`` / ``_ARG``        ``sampleRatio`` and ``parentBased``
========================================  =====================================================

The SDK reads the other ``OTEL_*`` variables itself (``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_EXPORTER_OTLP_COMPRESSION``, certificates, the rest of ``OTEL_RESOURCE_ATTRIBUTES``).

Only ``mcpgw.config.checks`` is imported here, and no OpenTelemetry module: the default install
has none, and a config that enables tracing without the ``otel`` extra fails here, by name.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import attrs

from mcpgw.config.checks import ConfigError, check_object, expect

#: Where an OTLP/HTTP collector listens for traces unless told otherwise (the OTLP default).
DEFAULT_TRACES_ENDPOINT = "http://localhost:4318/v1/traces"
TRACES_PATH = "/v1/traces"
DEFAULT_AUDIT_MAX_BYTES = 100 * 1024 * 1024
#: The modules tracing needs; the ``otel`` extra installs them.
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
#: OTEL_TRACES_SAMPLER -> (parent-based, the fixed ratio or None: OTEL_TRACES_SAMPLER_ARG's).
_SAMPLERS: dict[str, tuple[bool, float | None]] = {
    "always_on": (False, 1.0), "always_off": (False, 0.0), "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0), "parentbased_always_off": (True, 0.0), "parentbased_traceidratio": (True, None),
}
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@attrs.frozen
class TracingConfig:
    """``tracing``: spans of client requests exported over OTLP/HTTP (mcpgw.tracing)."""

    enabled: bool = False
    #: The full URL spans are POSTed to (``.../v1/traces``).
    endpoint: str = DEFAULT_TRACES_ENDPOINT
    serviceName: str = "mcpgw"
    #: The share of new traces recorded (0..1), by trace id.
    sampleRatio: float = 1.0
    #: A client's ``traceparent`` decides for its trace (its sampled flag); false: ``sampleRatio`` decides alone.
    parentBased: bool = True
    #: Sent with every export (a collector's API key); never logged.
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Tool arguments on the request span (``gen_ai.tool.call.arguments``): off, they may hold secrets.
    recordArguments: bool = False


@attrs.frozen
class AuditConfig:
    """``auditLog``: one JSON line per audited operation (mcpgw.audit), in a file of its own."""

    path: str
    format: str = "json"
    #: The file is rotated (``path.1`` ... ``path.<keep>``) once it holds this many bytes.
    maxBytes: int = DEFAULT_AUDIT_MAX_BYTES
    keep: int = 10
    #: Most lines waiting for the disk; past it lines are dropped, and counted on the next line written.
    maxQueue: int = 10_000


def parse_tracing(raw: Any, key: str = "tracing", environ: Mapping[str, str] | None = None) -> TracingConfig:
    """Check the ``tracing`` section (None: absent) and apply the ``OTEL_*`` variables above.

    A present section is on unless it says ``"enabled": false``."""
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {"enabled": False}
    check_object(raw, key, {"enabled", "endpoint", "serviceName", "sampleRatio", "parentBased", "headers", "recordArguments"})
    enabled = expect(raw.get("enabled", True), bool, f"{key}.enabled", "true or false")
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise ConfigError("OTEL_TRACES_EXPORTER", f'must be "otlp" or "none" (mcpgw exports OTLP only), not {exporter!r}')
    if exporter:  # named: the environment decides, as it overrides the file everywhere
        enabled = exporter == "otlp"
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        enabled = False
    ratio, parent_based = _sampling(raw, key, environ)
    config = TracingConfig(
        enabled=enabled,
        endpoint=_endpoint(raw, key, environ),
        serviceName=_service_name(raw, key, environ),
        sampleRatio=ratio,
        parentBased=parent_based,
        headers=_headers(raw, key, environ),
        recordArguments=expect(raw.get("recordArguments", False), bool, f"{key}.recordArguments", "true or false"),
    )
    if enabled:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol is not None and protocol.strip() != "http/protobuf":
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", f'must be "http/protobuf" (mcpgw exports OTLP over HTTP), not {protocol!r}')
        missing = [name for name in OTEL_MODULES if not _installed(name)]
        if missing:
            raise ConfigError(f"{key}.enabled", f"needs the OpenTelemetry SDK ({missing[0]} is not installed): pip install 'mcpgw[otel]'")
    return config


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing (or blocked): not installed
        return False


def _endpoint(raw: dict[str, Any], key: str, environ: Mapping[str, str]) -> str:
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return _url(environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip(), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _traces_url(_url(environ["OTEL_EXPORTER_OTLP_ENDPOINT"].strip(), "OTEL_EXPORTER_OTLP_ENDPOINT"))
    if "endpoint" not in raw:
        return DEFAULT_TRACES_ENDPOINT
    # A base URL like OTEL_EXPORTER_OTLP_ENDPOINT's: people write the collector's address.
    return _traces_url(_url(expect(raw["endpoint"], str, f"{key}.endpoint", "a URL"), f"{key}.endpoint"))


def _url(value: str, key: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(key, f"must be an http:// or https:// URL, not {value[:80]!r}")
    if "@" in value.split("/", 3)[2]:
        raise ConfigError(key, "must not carry credentials (user:password@): put them in headers")
    return value


def _traces_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _service_name(raw: dict[str, Any], key: str, environ: Mapping[str, str]) -> str:
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        return environ["OTEL_SERVICE_NAME"].strip()
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        name, _, value = pair.partition("=")
        if name.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    name = expect(raw.get("serviceName", "mcpgw"), str, f"{key}.serviceName", "a string")
    if not name.strip():
        raise ConfigError(f"{key}.serviceName", "must not be empty")
    return name


def _sampling(raw: dict[str, Any], key: str, environ: Mapping[str, str]) -> tuple[float, bool]:
    ratio = _ratio(raw.get("sampleRatio", 1.0), f"{key}.sampleRatio")
    parent_based = expect(raw.get("parentBased", True), bool, f"{key}.parentBased", "true or false")
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    fixed: float | None = None
    if sampler:
        if sampler not in _SAMPLERS:
            raise ConfigError("OTEL_TRACES_SAMPLER", f"must be one of {', '.join(_SAMPLERS)}, not {sampler!r}")
        parent_based, fixed = _SAMPLERS[sampler]
    if fixed is not None:
        return fixed, parent_based
    if environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        text = environ["OTEL_TRACES_SAMPLER_ARG"].strip()
        try:
            value = float(text)
        except ValueError:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"must be a number between 0 and 1, not {text!r}") from None
        ratio = _ratio(value, "OTEL_TRACES_SAMPLER_ARG")
    return ratio, parent_based


def _ratio(value: Any, key: str) -> float:
    expect(value, (int, float), key, "a number between 0 and 1")
    if not 0 <= value <= 1:
        raise ConfigError(key, f"must be between 0 and 1, not {value}")
    return float(value)


def _headers(raw: dict[str, Any], key: str, environ: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in expect(raw.get("headers", {}), dict, f"{key}.headers", "an object of strings").items():
        expect(value, str, f"{key}.headers.{name}", "a string")

        def resolve(m: re.Match[str], name: str = name) -> str:
            if m.group(1) not in environ:
                raise ConfigError(f"{key}.headers.{name}", f"refers to ${{{m.group(1)}}}, which is not set")
            return environ[m.group(1)]

        resolved = _ENV_REF.sub(resolve, value)
        headers[_header(name, resolved, f"{key}.headers.{name}")] = resolved
    for variable in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        for pair in environ.get(variable, "").split(","):
            if not pair.strip():
                continue
            name, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(variable, f"must be name=value pairs separated by commas, not {pair.strip()[:40]!r}")
            value = unquote(value.strip())
            headers[_header(name.strip(), value, variable)] = value
    return headers


def _header(name: str, value: str, key: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(key, f"{name[:40]!r} is not a usable header name")
    if "\r" in value or "\n" in value:
        raise ConfigError(key, "must not contain line breaks")
    return name


def parse_audit(raw: Any, key: str = "auditLog") -> AuditConfig | None:
    """Check the ``auditLog`` section; None when it is absent (no audit trail)."""
    if raw is None:
        return None
    check_object(raw, key, {"path", "format", "maxBytes", "keep", "maxQueue"})
    if "path" not in raw:
        raise ConfigError(f"{key}.path", "is required")
    path = expect(raw["path"], str, f"{key}.path", "a file path")
    if not path.strip() or path.endswith(("/", os.sep)):
        raise ConfigError(f"{key}.path", f"must name a file, not {path!r}")
    if os.path.isdir(path):
        raise ConfigError(f"{key}.path", f"{path} is a directory: name a file in it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"{key}.path", f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}.path", f"{directory} is not writable")
    log_format = expect(raw.get("format", "json"), str, f"{key}.format", "a string")
    if log_format != "json":
        raise ConfigError(f"{key}.format", f'must be "json", not {log_format!r}')
    return AuditConfig(
        path=path,
        format=log_format,
        maxBytes=_at_least(raw.get("maxBytes", DEFAULT_AUDIT_MAX_BYTES), f"{key}.maxBytes", 4096),
        keep=_at_least(raw.get("keep", 10), f"{key}.keep", 1),
        maxQueue=_at_least(raw.get("maxQueue", 10_000), f"{key}.maxQueue", 1),
    )


def _at_least(value: Any, key: str, least: int) -> int:
    expect(value, int, key, "an integer")
    if value < least:
        raise ConfigError(key, f"must be at least {least}, not {value}")
    return int(value)
