"""Issue 20, item 11: contrib/systemd/mcpgw.service and mcpgw-exporter.service.

Each unit passes ``systemd-analyze verify`` (Debian's ``systemd`` package; no running systemd
needed) with the install paths replaced by this machine's (the unit names /opt/mcpgw, which
verify requires to exist), without a single warning; it has the settings a hardened long-running
gateway needs; and its ExecStart, run as systemd would (its default PATH, without the venv's bin/,
and a SIGTERM to the main process only), starts a gateway that serves the shipped config's
server and stops cleanly within TimeoutStopSec.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
GATEWAY_UNIT = UNITS / "mcpgw.service"
EXPORTER_UNIT = UNITS / "mcpgw-exporter.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: The PATH systemd gives a service (systemd.exec(5), "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
#: Where this interpreter's console scripts (twistd, mcp-server-time) are: the unit's /opt/mcpgw/bin.
SCRIPTS = sysconfig.get_path("scripts")

pytestmark = pytest.mark.integration


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines by section-qualified key (``Service.ExecStart``), every value kept."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def installed_here(unit: Path, directory: Path, config: Path) -> Path:
    """The unit with /opt/mcpgw/bin and /etc/mcpgw/gateway.json pointing at this machine's."""
    text = unit.read_text().replace("/opt/mcpgw/bin", SCRIPTS).replace("/etc/mcpgw/gateway.json", str(config))
    out = directory / unit.name
    out.write_text(text)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (apt-get install systemd)")
@pytest.mark.parametrize("unit", [GATEWAY_UNIT, EXPORTER_UNIT], ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path):
    """systemd.unit(5) / systemd.service(5): no error and no warning (an unknown or misspelled
    key is only a warning, so stderr must be empty too)."""
    installed = installed_here(unit, tmp_path, ROOT / "conf" / "gateway.json")
    ran = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(installed)],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stderr.strip() == "", ran.stdout + ran.stderr


@pytest.mark.parametrize("unit, plugin", [(GATEWAY_UNIT, "mcpgw"), (EXPORTER_UNIT, "mcpgw-exporter")],
                         ids=["mcpgw", "mcpgw-exporter"])
def test_unit_settings(unit: Path, plugin: str):
    """Type=simple, twistd in the foreground with no pid file, a user of its own, the hardening the
    issue asks for, and a stop that matches the gateway's graceful shutdown (compose's 15 s)."""
    s = unit_settings(unit)
    argv = shlex.split(s["Service.ExecStart"][0])
    assert argv[:4] == ["/opt/mcpgw/bin/twistd", "-n", "--pidfile=", plugin], argv
    assert argv[4:] == ["--config", "/etc/mcpgw/gateway.json"]
    assert s["Service.Type"] == ["simple"]
    assert s["Service.DynamicUser"] == ["yes"]
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.NoNewPrivileges"] == ["yes"]
    assert set(s["Service.RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(s["Service.LimitNOFILE"][0]) >= 4096
    assert s["Service.KillMode"] == ["mixed"]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"stop_grace_period: {s['Service.TimeoutStopSec'][0]}s" in compose
    assert s["Service.RestartPreventExitStatus"] == ["2"]  # a config error: restarting would not fix it
    assert s["Install.WantedBy"] == ["multi-user.target"]


def test_gateway_unit_command_starts_the_gateway(tmp_path: Path):
    """The unit's ExecStart as systemd runs it: PATH without this venv's bin/ (items 3 and 11: the
    shipped config's bare ``mcp-server-time`` is found beside the interpreter), the shipped config
    (metrics on a free port: tests run side by side), /ready, a tool call, then SIGTERM to twistd
    alone (KillMode=mixed) and a clean exit within TimeoutStopSec."""
    # Twisted's console script comes with the package's own install: missing, the venv is broken.
    assert os.path.exists(os.path.join(SCRIPTS, "twistd")), f"no twistd script in {SCRIPTS}"
    config = json.loads((ROOT / "conf" / "gateway.json").read_text())
    config["metrics"] = {"port": free_port()}
    config_path = tmp_path / "gateway.json"
    config_path.write_text(json.dumps(config))
    unit = installed_here(GATEWAY_UNIT, tmp_path, config_path)
    s = unit_settings(unit)
    argv = shlex.split(s["Service.ExecStart"][0])
    port = free_port()
    env = {"PATH": SYSTEMD_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8", "MCPGW_PORT": str(port)}
    if "PYTHONPATH" in os.environ:  # the mcpgw under test, when it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if shutil.which("mcp-server-time", path=SYSTEMD_PATH) is None:
        # The point of item 3: nothing on PATH; the gateway finds it in SCRIPTS itself.
        assert os.path.exists(os.path.join(SCRIPTS, "mcp-server-time"))
    log = tmp_path / "journal.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_until(ready, 30, 0.1) and proc.poll() is None, log.read_text(errors="replace")
        with httpx.Client(base_url=url, timeout=10) as client:
            headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
            init = client.post("/mcp", headers=headers, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "unit", "version": "1"}}})
            assert init.status_code == 200, init.text
            sid = init.headers["mcp-session-id"]
            session = {**headers, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
            client.post("/mcp", headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            call = client.post("/mcp", headers=session, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "get_current_time", "arguments": {"timezone": "UTC"}}})
            assert call.status_code == 200 and '"UTC' in call.text, call.text
    finally:
        stop_started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(int(s["Service.TimeoutStopSec"][0]))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the gateway outlived TimeoutStopSec after SIGTERM") from None
    stopped_in = time.monotonic() - stop_started
    text = log.read_text(errors="replace")
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Main loop terminated." in text
    assert stopped_in < int(s["Service.TimeoutStopSec"][0])
