# syntax=docker/dockerfile:1
# mcpgw: the gateway image.
#
#   docker build -t mcpgw .                              # Python stdio MCP servers only
#   docker build -t mcpgw --build-arg INSTALL_NODE=true . # plus Node.js/npm for `npx` servers
#
# The config is /etc/mcpgw/gateway.json: the repo's conf/gateway.json is baked in, and
# docker-compose.yml mounts ./conf over /etc/mcpgw so edits need no rebuild.
# Environment overrides (MCPGW_PORT, LOG_LEVEL, SESSION_SECRET, REDIS_URL, REDIS_PASSWORD):
# see docs/configuration.md.

ARG PYTHON_VERSION=3.11

# -- build: wheels for the gateway and everything it needs -------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY setup.py ./
COPY mcpgw ./mcpgw
COPY twisted ./twisted
# With the otel extra: tracing (docker compose --profile tracing) is a setting, not a rebuild.
RUN pip wheel --wheel-dir /wheels ".[otel]"

# -- runtime -----------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim
ARG INSTALL_NODE=false
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Node.js and npm for MCP servers started with `npx` (a build option: +~200 MB).
RUN if [ "$INSTALL_NODE" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends nodejs npm \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Install from the build stage's wheels (mounted, not copied: no wheels left in a layer),
# then write twisted/plugins/dropin.cache as root: the runtime user cannot.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "mcpgw[otel]" \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

COPY conf/gateway.json /etc/mcpgw/gateway.json

# Non-root: the gateway and every MCP server it spawns run as `mcpgw`, uid and gid 10001 (outside
# the range distributions give their own system users). USER is numeric so that Kubernetes'
# runAsNonRoot can check it (deploy/kubernetes/deployment.yaml names the same uid).
RUN groupadd --system --gid 10001 mcpgw \
    && useradd --system --uid 10001 --gid mcpgw --create-home --home-dir /home/mcpgw --shell /usr/sbin/nologin mcpgw
USER 10001:10001
WORKDIR /home/mcpgw

ENV MCPGW_HOST=0.0.0.0
EXPOSE 3000

# GET /health on the port the gateway listens on (MCPGW_PORT, default 3000).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MCPGW_PORT', '3000'), timeout=4)"]

# twistd in the foreground (-n) with SIGTERM handled (sessions closed, children stopped).
# --pidfile= : no twistd.pid. A container restarted after a crash keeps its filesystem, and
# twistd refuses to start when the stale pid file names a live process -- in a fresh
# container that is likely its own pid.
# Run with an init (`init: true` in compose, `docker run --init`) to reap orphaned grandchildren.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "mcpgw", "--config", "/etc/mcpgw/gateway.json"]
