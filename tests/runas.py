"""A gateway started from a test as another account (``setpriv``), with an interpreter path that
account can read.

Run from a virtual environment under a world-readable directory, the test's own interpreter and
packages serve any account. Run from a system interpreter under ``/root`` (CI installs with
``python3 -m pip install -e .``), an unprivileged account cannot read the site-packages, and the
dynamic loader falls back to another libpython of the same minor version. Then the packages the
gateway needs (its requirements, recursively, by their installed file lists) and the repository's
``mcpgw`` and twistd plugin are copied to a world-readable directory, the only one on the path
(``python -S``: not the other interpreter's own site-packages, whose versions do not match ours).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
PROBE = "import twisted.scripts.twistd, twisted.plugins.mcpgw_plugin, mcpgw.tap, orjson, jwt"


def setpriv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _probe(uid: int, runtime: Runtime) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*setpriv(uid), *runtime.python, "-c", PROBE], env={**os.environ, **runtime.env},
                          cwd="/", capture_output=True, text=True, timeout=60)


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """The distributions ``dist`` always needs (requirements without an extra marker)."""
    names = []
    for line in dist.requires or []:
        requirement, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        names.append(re.split(r"[\s\[<>=!~(]", requirement.strip(), maxsplit=1)[0])
    return names


def _closure(names: list[str]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        todo.extend(_requirement_names(dist))
    return list(seen.values())


def _copy_runtime(into: Path) -> None:
    # mcp-server-time is the default config's server, not something the gateway imports.
    gateway = [n for n in _requirement_names(metadata.distribution("mcpgw")) if n != "mcp-server-time"]
    for dist in _closure(gateway):
        for file in dist.files or []:
            source = Path(dist.locate_file(file)).resolve()
            if ".." in file.parts or not source.is_file() or file.suffix == ".pyc":
                continue
            target = into / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copytree(REPO / "mcpgw", into / "mcpgw", ignore=shutil.ignore_patterns("__pycache__"))
    plugins = into / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for plugin in (REPO / "twisted" / "plugins").glob("*.py"):
        if plugin.name != "__init__.py":
            shutil.copy2(plugin, plugins / plugin.name)


class Runtime(NamedTuple):
    python: list[str]
    env: dict[str, str]


@cache
def runtime_for(uid: int) -> Runtime:
    """The interpreter command and environment under which ``setpriv(uid)`` runs the gateway."""
    here = Runtime([sys.executable], {"PYTHONPATH": str(REPO)})
    if _probe(uid, here).returncode == 0:
        return here
    into = Path(tempfile.mkdtemp(prefix="mcpgw-runas-"))
    atexit.register(shutil.rmtree, into, True)
    _copy_runtime(into / "site")
    for root, dirs, files in os.walk(into):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    os.chmod(into, 0o755)
    copy = Runtime([sys.executable, "-S"], {"PYTHONPATH": str(into / "site")})
    done = _probe(uid, copy)
    if done.returncode != 0:
        raise RuntimeError(f"the gateway cannot run as uid {uid} even from a copy:\n{done.stderr}")
    return copy


def readable_copy(path: Path) -> Path:
    """``path`` itself when every account can read it, else a world-readable copy."""
    if all(os.stat(parent).st_mode & 0o001 for parent in path.parents) and os.stat(path).st_mode & 0o004:
        return path
    into = Path(tempfile.mkdtemp(prefix="mcpgw-runas-"))
    atexit.register(shutil.rmtree, into, True)
    os.chmod(into, 0o755)
    copy = into / path.name
    shutil.copy2(path, copy)
    os.chmod(copy, 0o644)
    return copy
