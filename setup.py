from setuptools import setup

setup(
    name="mcpgw",
    version="0.1.0",
    description="An event-driven MCP gateway on Twisted: stdio MCP servers over Streamable HTTP and HTTP+SSE.",
    python_requires=">=3.11",
    packages=["mcpgw", "mcpgw.config", "mcpgw._fast", "mcpgw.oauth", "mcpgw.tracing", "mcpgw.upstream", "mcpgw.store", "mcpgw.store.redis", "mcpgw.cluster", "mcpgw.pool", "mcpgw.transports", "twisted.plugins"],
    # A static .pth (not a finder hook) for `pip install -e .`, so twistd sees twisted/plugins/.
    package_dir={"": "."},
    # The web console's static files (mcpgw.admin serves them at /console/).
    package_data={"mcpgw": ["console/*.html", "console/*.js", "console/*.css"]},
    include_package_data=True,
    install_requires=[
        # mcpgw/_fast reads private parts of these two (probed at import, with a public fallback):
        # bounded to the major versions tested; constraints.txt pins the exact versions CI ran.
        "twisted>=24.3,<27",
        "autobahn<27",
        "txredisapi",
        "prometheus-client",
        "attrs",
        "treq",
        # 3.11.6 on: loads (CVE-2024-27454) and dumps (CVE-2025-67221) stop at 1024 levels of nesting,
        # the gateway's one nesting limit; older releases recurse without bound.
        "orjson>=3.11.6",
        # JWT bearer tokens (auth.jwt): HS256 and JWKS keys.
        "pyjwt[crypto]",
        # The real stdio MCP server that conf/gateway.json serves by default.
        "mcp-server-time",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-twisted",
            "pytest-timeout",
            # The README's command spreads the suite over workers (`pytest -n 3`).
            "pytest-xdist",
            "mcp>=2",
            "sseclient-py",
            # sseclient-py's own way to follow a stream, SSEClient(requests.get(url, stream=True)), needs it.
            "requests",
            "httpx",
            "hypothesis",
            "pyyaml",
            # tests/test_kubernetes.py: deploy/kubernetes/ against the Kubernetes API schemas (bundled: offline).
            "kubernetes-validate",
            "websockets",
            # tests/test_bench_smoke.py drives the bench, whose WebSocket client is aiohttp.
            "aiohttp",
            # Tracing's tests: the SDK and its OTLP/HTTP exporter (the otel extra), and the OTLP messages
            # tests/otlp_receiver.py decodes.
            "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-http",
            "opentelemetry-proto",
        ],
        # OpenTelemetry traces (``tracing``): off by default, so the default install goes without them.
        "otel": [
            "opentelemetry-api",
            "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-http",
        ],
        # .ci/run's code checks (pyproject.toml configures both).
        "lint": [
            "ruff==0.17.6",
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
        ],
        # python3 -m bench (docs/performance.md); --peers installs supergateway and mcp-proxy itself.
        "bench": [
            "aiohttp",
            "matplotlib",
            "py-spy",
        ],
    },
)
