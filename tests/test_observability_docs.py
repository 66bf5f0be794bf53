"""Issue 19, point 4: what the docs and the compose stack say about tracing and the audit trail.

Every key of the ``tracing`` and ``auditLog`` sections and every ``OTEL_*`` variable the gateway reads
is documented; the README's Monitoring part has its section; the compose stack's Jaeger (profile
``tracing``) is where the gateways' spans go once tracing is on.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import attrs
import yaml

from mcpgw.config import observability
from mcpgw.config.observability import AuditConfig, TracingConfig, parse_tracing

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = (ROOT / "docs" / "observability.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_every_key_is_documented():
    keys = [f"tracing.{f.name}" for f in attrs.fields(TracingConfig)] + [f"auditLog.{f.name}" for f in attrs.fields(AuditConfig)]
    for key in keys:
        assert f"`{key}`" in OBSERVABILITY, key
        assert f"`{key}`" in CONFIGURATION, key


def test_every_otel_variable_read_is_documented():
    read = set(re.findall(r'"(OTEL_[A-Z_]+)"', inspect.getsource(observability)))
    assert {"OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"} <= read
    for variable in read:
        assert variable in OBSERVABILITY, variable


def test_the_readme_monitoring_part_has_the_section():
    readme = (ROOT / "README.md").read_text()
    monitoring = readme[readme.index("\n## Monitoring\n"):readme.index("\n## Benchmark\n")]
    assert "\n### Tracing and audit\n" in monitoring and "docs/observability.md" in monitoring
    for heading in ("## What is never recorded, and why", "### Spans", "## The audit trail", "## Jaeger in the compose stack"):
        assert heading in OBSERVABILITY, heading


def test_compose_jaeger_behind_the_tracing_profile():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    jaeger = services["jaeger"]
    assert jaeger["profiles"] == ["tracing"] and jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert jaeger["ports"] == ["127.0.0.1:16686:16686"] and jaeger["networks"] == ["mcpgw"]
    environment = {k: str(v) for k, v in services["mcp-gateway"]["environment"].items()}
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert not parse_tracing(None, environ=environment).enabled  # off until asked
    on = parse_tracing(None, environ={**environment, "OTEL_TRACES_EXPORTER": "otlp"})
    assert on.enabled and on.endpoint == "http://jaeger:4318/v1/traces"
