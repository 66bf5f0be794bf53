"""Issue 7: the deployment files (docker-compose.yml, Dockerfile, .env.example, .dockerignore).

No Docker engine is needed: the compose file is parsed with PyYAML and checked
against the original stack (services, ports, environment, healthchecks, mounts);
the Dockerfile is parsed and its ENTRYPOINT and HEALTHCHECK commands are run
outside Docker, with the config file the image carries (the repo's
conf/gateway.json, which compose mounts at /etc/mcpgw), to get a healthy gateway.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # the test extra (setup.py): missing, the module fails rather than skips

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = "/etc/mcpgw/gateway.json"
REPO_CONFIG = ROOT / "conf" / "gateway.json"

#: The original stack: service -> container ports it serves.
ORIGINAL_SERVICES = {
    "mcp-gateway": {3000},
    "redis": {6379},
    "nginx": {80, 443},
    "gateway-exporter": {9091},
    "wscat": set(),
    "curl": set(),
}
ORIGINAL_ENV = {"REDIS_PASSWORD", "LOG_LEVEL", "SESSION_SECRET"}
HEALTHCHECKED = {"mcp-gateway", "redis", "nginx", "gateway-exporter"}


# -- parsing helpers -------------------------------------------------------------


def compose() -> dict[str, Any]:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation (``$$`` is a literal ``$``)."""

    def sub(m: re.Match[str]) -> str:
        name = m["name"]
        if name in env and (env[name] != "" or m["op"] not in (":-",)):
            return env[name]
        if m["op"] in (":-", "-"):
            return m["default"]
        raise KeyError(f"${{{name}}} is not set and has no default")

    return _VAR.sub(sub, value.replace("$$", "\x00")).replace("\x00", "$")


def container_ports(spec: list[Any]) -> set[int]:
    """Container-side ports of a ``ports:`` list (short syntax ``[ip:][host:]container[/proto]``)."""
    found = set()
    for item in spec:
        if isinstance(item, dict):
            found.add(int(item["target"]))
            continue
        container = str(item).rsplit(":", 1)[-1].split("/")[0]
        assert "-" not in container, f"a container port range: {item!r}"
        found.add(int(container))
    return found


def host_side(item: str) -> tuple[str, str]:
    """``127.0.0.1:3000-3009:3000`` -> ("127.0.0.1", "3000-3009"); ``80:80`` -> ("", "80")."""
    parts = str(item).split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    if len(parts) == 2:
        return "", parts[0]
    return "", ""


def healthcheck_argv(test: Any) -> list[str]:
    """A compose/Docker healthcheck ``test`` as an argv (CMD-SHELL runs under /bin/sh -c)."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD":
        return rest
    assert kind == "CMD-SHELL", test
    return ["/bin/sh", "-c", rest[0]]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if not stripped and not current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def dockerfile(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not the exec (JSON) form: {args!r}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value)
    return value


def entrypoint() -> list[str]:
    (args,) = dockerfile("ENTRYPOINT")
    return exec_form(args)


def image_healthcheck() -> list[str]:
    (args,) = dockerfile("HEALTHCHECK")
    cmd = args[args.index("CMD"):]
    return exec_form(cmd[len("CMD"):].strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- docker-compose.yml ----------------------------------------------------------


def test_every_service_of_the_original_stack():
    assert set(ORIGINAL_SERVICES) <= set(services()), set(ORIGINAL_SERVICES) - set(services())


@pytest.mark.parametrize("name", sorted(n for n, p in ORIGINAL_SERVICES.items() if p))
def test_ports(name: str):
    """Each service publishes its original port(s); gateway, Redis and exporter on loopback only."""
    spec = services()[name].get("ports", [])
    assert container_ports(spec) == ORIGINAL_SERVICES[name]
    for item in spec:
        ip, host = host_side(item)
        if name == "nginx":
            assert ip == "" and host in ("80", "443"), item  # the public entry
        else:
            assert ip == "127.0.0.1", f"{name}: {item!r} must not be published beyond loopback"
        if name == "mcp-gateway":
            # One host port per replica: a range that starts at the original 3000.
            lo, _, hi = host.partition("-")
            assert int(lo) == 3000 and int(hi or lo) >= 3000 + 2, item


def test_env_file_and_original_variables():
    """``env_file: .env`` on the gateway, Redis and exporter; .env.example defines the original variables."""
    example = env_example()
    assert ORIGINAL_ENV <= set(example), ORIGINAL_ENV - set(example)
    for name in ("mcp-gateway", "redis", "gateway-exporter"):
        env_file = services()[name].get("env_file")
        assert env_file in (".env", [".env"]), f"{name}: env_file is {env_file!r}"
    # .env holds secrets: never in git, never in the image.
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_every_interpolated_variable_is_defined():
    """Every ``${VAR}`` in docker-compose.yml has a default or is in .env.example."""
    text = COMPOSE.read_text().replace("$$", "")
    for m in _VAR.finditer(text):
        assert m["op"] in (":-", "-") or m["name"] in env_example(), f"{m[0]} is neither defaulted nor in .env.example"


def test_gateway_reads_the_stack_environment():
    """The gateway's config, under the environment compose gives it, takes every value from .env."""
    from mcpgw.config import load

    gateway = services()["mcp-gateway"]
    example = env_example()
    environ = {"PATH": os.environ["PATH"], **example, **{k: str(v) for k, v in gateway["environment"].items()}}
    config = load(str(REPO_CONFIG), environ)
    assert config.logLevel == example["LOG_LEVEL"]
    assert config.session.secret == example["SESSION_SECRET"]
    assert config.redis is not None
    assert config.redis.password == example["REDIS_PASSWORD"]
    assert config.redis.url.startswith("redis://redis:6379")  # the compose service
    assert config.port == 3000 and config.host == "0.0.0.0"  # not loopback: no Host-header check in the stack


def test_redis_requires_the_password():
    redis = services()["redis"]
    command = redis["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert "--requirepass" in command and "$$REDIS_PASSWORD" in command
    # sh -c as the image's entrypoint would leave redis-server running as root: go through it again.
    assert "exec docker-entrypoint.sh redis-server" in command
    test = " ".join(healthcheck_argv(redis["healthcheck"]["test"]))
    assert "redis-cli" in test and "REDIS_PASSWORD" in test and "ping" in test
    assert any(str(v).split(":")[1].startswith("/data") for v in redis["volumes"])


@pytest.mark.parametrize("name", sorted(HEALTHCHECKED))
def test_healthchecks(name: str):
    """Every long-running service has a healthcheck, probing what it serves."""
    check = services()[name].get("healthcheck")
    assert check and check.get("test"), f"{name} has no healthcheck"
    argv = " ".join(healthcheck_argv(check["test"]))
    expected = {
        "mcp-gateway": ["/health", "MCPGW_PORT", "3000"],
        "redis": ["ping"],
        "nginx": ["/health"],
        "gateway-exporter": ["9091", "/metrics"],
    }[name]
    for word in expected:
        assert word in argv, f"{name}: {word!r} not in healthcheck {argv!r}"
    for key in ("interval", "timeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", str(check[key])), f"{name}: healthcheck {key} {check.get(key)!r}"


def test_gateway_healthcheck_is_the_images():
    """Compose's gateway healthcheck runs the same command as the Dockerfile's HEALTHCHECK."""
    assert healthcheck_argv(services()["mcp-gateway"]["healthcheck"]["test"]) == image_healthcheck()


def test_replicas_and_dependencies():
    gateway = services()["mcp-gateway"]
    replicas = gateway["deploy"]["replicas"]
    replicas = int(interpolate(str(replicas), {}))  # the default, with no .env
    assert replicas >= 1
    assert int(interpolate(str(gateway["deploy"]["replicas"]), {"GATEWAY_REPLICAS": "3"})) == 3
    assert gateway.get("init") is True  # reaps orphaned grandchildren of MCP servers
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services()["nginx"]["depends_on"]["mcp-gateway"]["condition"] == "service_healthy"
    # The exporter runs with the stack; the test clients run on demand.
    assert services()["gateway-exporter"]["entrypoint"][:4] == ["twistd", "-n", "--pidfile=", "mcpgw-exporter"]
    assert "profiles" not in services()["gateway-exporter"]
    for client in ("curl", "wscat"):
        assert services()[client].get("profiles") == ["tools"]


def test_network():
    networks = compose()["networks"]
    for name, service in services().items():
        assert service.get("networks"), f"{name} is on no network"
        for net in service["networks"]:
            assert net in networks, f"{name}: network {net!r} is not declared"


def test_every_mounted_file_exists():
    """Bind mounts name files and directories of the repo; named volumes are declared."""
    declared = set(compose().get("volumes") or {})
    seen = 0
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith((".", "/")):
                path = (ROOT / source).resolve()
                assert path.exists(), f"{name}: {source} is not in the repo"
                assert ROOT in path.parents or path == ROOT, f"{name}: {source} is outside the repo"
                seen += 1
            else:
                assert source in declared, f"{name}: named volume {source!r} is not declared"
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()
    assert seen >= 6


def test_nginx_mounts_cover_every_path_its_config_names():
    """Every relative path in the nginx files (include, certificates, htpasswd) lies in a mounted directory."""
    mounts = {}
    for volume in services()["nginx"]["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = ROOT / source
    assert mounts["/etc/nginx/nginx.conf"] == ROOT / "nginx" / "nginx.conf"
    files = [ROOT / "nginx" / "nginx.conf", *sorted((ROOT / "nginx").glob("*/*.conf"))]
    names = []
    for f in files:
        text = re.sub(r"#.*", "", f.read_text())
        names += re.findall(r"\b(?:include|ssl_certificate|ssl_certificate_key|auth_basic_user_file)\s+([^;\s]+);", text)
    # The commented-out basic auth include counts too: it must work when uncommented.
    names.append("snippets/basic-auth.conf")
    assert "conf.d/*.conf" in names and "certs/server.crt" in names
    for name in names:
        assert not name.startswith("/"), f"{name}: absolute paths break the test's temporary prefix"
        top = "/etc/nginx/" + name.split("/")[0]
        assert top in mounts, f"{name}: /etc/nginx/{name} is not mounted"
        source = mounts[top]
        if "*" in name:
            assert list(source.glob(name.split("/", 1)[1])), name
        elif name.startswith(("snippets/", "conf.d/")):
            assert (ROOT / "nginx" / name).is_file(), name
        else:
            assert source.is_dir(), f"{top}: {source} is not a directory"  # certs/, auth/: made at deploy time


def test_upstream_is_the_gateway_service():
    """nginx's upstream is least_conn over the compose service and its port."""
    text = re.sub(r"#.*", "", (ROOT / "nginx" / "conf.d" / "default.conf").read_text())
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    assert upstream, "no upstream block"
    assert re.search(r"^\s*least_conn;", upstream[2], re.M)
    assert re.search(r"^\s*server\s+mcp-gateway:3000\b", upstream[2], re.M)
    assert f"http://{upstream[1]}" in (ROOT / "nginx" / "snippets" / "mcp-proxy.conf").read_text()


def test_conf_not_config():
    """The config directory is conf/ (mounted at /etc/mcpgw); there is no config/."""
    assert not (ROOT / "config").exists()
    assert "./conf:/etc/mcpgw:ro" in services()["mcp-gateway"]["volumes"]
    for f in (COMPOSE, DOCKERFILE, ROOT / ".dockerignore"):
        assert not re.search(r"(?<![\w/.-])\.?/?config/", f.read_text()), f"{f.name} names config/"
    assert "**`conf/`, not `config/`.**" in (ROOT / "docs" / "deploy.md").read_text()  # the decision, documented


# -- Dockerfile ------------------------------------------------------------------


def test_dockerfile_base_user_and_node_option():
    froms = dockerfile("FROM")
    assert froms and all("-slim" in f for f in froms), froms
    args = " ".join(dockerfile("ARG"))
    assert "INSTALL_NODE" in args and "PYTHON_VERSION" in args
    run = " ".join(dockerfile("RUN"))
    assert "INSTALL_NODE" in run and "nodejs" in run and "npm" in run
    users = dockerfile("USER")
    assert users and users[-1] not in ("root", "0"), users
    assert "3000" in " ".join(dockerfile("EXPOSE"))
    copies = dockerfile("COPY")
    assert f"conf/gateway.json {IMAGE_CONFIG}" in copies


def test_entrypoint_names_the_real_plugin_and_config():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    argv = entrypoint()
    assert argv[:2] == ["twistd", "-n"], argv
    plugin = next(a for a in argv[1:] if not a.startswith("-"))
    assert plugin == "mcpgw"
    assert plugin in {p.tapname for p in getPlugins(IServiceMaker)}
    assert argv[argv.index(plugin) + 1:] == ["--config", IMAGE_CONFIG]
    assert "--pidfile=" in argv[1:argv.index(plugin)]


def test_dockerignore_keeps_what_the_image_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for copy in dockerfile("COPY"):
        if copy.startswith("--"):
            continue
        *sources, _dest = shlex.split(copy)
        for source in sources:
            assert (ROOT / source).exists(), source
            for pattern in patterns:
                assert not fnmatch.fnmatch(source.rstrip("/"), pattern.rstrip("/")), f"{source} is ignored by {pattern}"
    for secret in (".env", ".git", "tests"):
        assert secret in patterns


# -- the entrypoint, outside Docker ------------------------------------------------


def outside_docker(argv: list[str]) -> list[str]:
    """An image command as it runs here: this interpreter for python3/twistd, the repo's config file."""
    argv = [str(REPO_CONFIG) if a == IMAGE_CONFIG else a for a in argv]
    if argv[0] == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *argv[1:]]
    if argv[0] in ("python3", "python"):
        return [sys.executable, *argv[1:]]
    return argv


@pytest.mark.integration
def test_entrypoint_runs_a_healthy_gateway(tmp_path: Path):
    """The Dockerfile's ENTRYPOINT with the image's config file: /health, /ready, the image's healthcheck.

    Outside Docker the port comes from MCPGW_PORT (a free one) and the interface from
    MCPGW_HOST=127.0.0.1: the environment overrides the image's config file, as compose's
    ``environment:`` would. The working directory holds a stale twistd.pid naming a live
    process (as a restarted container would): ``--pidfile=`` keeps it from stopping startup.
    """
    port = free_port()
    env = {**os.environ, "MCPGW_PORT": str(port), "MCPGW_HOST": "127.0.0.1", "LOG_LEVEL": "info"}
    (tmp_path / "twistd.pid").write_text(str(os.getpid()))
    argv = outside_docker(entrypoint())
    assert str(REPO_CONFIG) in argv
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the entrypoint exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health is not None, "the gateway did not answer /health within 30 s"
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert ready.status_code == 200, ready.text  # the image's MCP server (mcp-server-time) is installed
        servers = httpx.get(f"http://127.0.0.1:{port}/servers", timeout=5).json()["servers"]
        assert [s["name"] for s in servers] == list(json.loads(REPO_CONFIG.read_text())["mcpServers"])

        # Docker's healthcheck and compose's, run the same way.
        for check in (image_healthcheck(), healthcheck_argv(services()["mcp-gateway"]["healthcheck"]["test"])):
            ran = subprocess.run(outside_docker(check), env=env, capture_output=True, text=True, timeout=10)
            assert ran.returncode == 0, ran.stderr
        # ...and it fails when nothing listens there.
        bad = subprocess.run(outside_docker(image_healthcheck()), env={**env, "MCPGW_PORT": str(free_port())},
                             capture_output=True, text=True, timeout=10)
        assert bad.returncode != 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the gateway did not exit within 15 s of SIGTERM") from None
    # twistd ends by re-raising the signal that stopped it: killed by SIGTERM, after a clean shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text(errors="replace")
    assert "Main loop terminated." in log.read_text(errors="replace")
    assert (tmp_path / "twistd.pid").read_text() == str(os.getpid())  # untouched: no pid file written
