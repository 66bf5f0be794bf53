"""Build a shared cache directory (a venv, an npm install) once, whatever runs at the same time.

Several test processes (``pytest -n 3``, two checkouts) may want the same cache under
``~/.cache`` at once. ``cached`` takes an exclusive ``flock`` on ``<cache>.lock`` beside it,
checks again whether the cache is usable, and if not builds it in a fresh temporary directory
beside it and renames that into place: the cache is either missing or whole, never half built,
and only one process builds it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``cache`` (``<cache>.lock``; released when the descriptor closes,
    even if this process dies)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def cached(cache: Path, ready: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """``cache``, built by ``build(directory)`` unless ``ready(cache)`` already holds.

    ``build`` gets an empty directory on the same file system and raises when it cannot build (the
    caller's test fails with that error); what it left is removed. What it built is checked with
    ``ready`` (at its final path) before the call returns."""
    with locked(cache):
        if ready(cache):
            return cache
        work = Path(tempfile.mkdtemp(prefix=f".{cache.name}.build-", dir=cache.parent))
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # a directory like mkdir's (mkdtemp's is private to this user)
        old = cache.with_name(f".{cache.name}.old-{os.getpid()}")
        try:
            build(work)
            if cache.exists():  # stale (another version, a half build from before this lock): set aside
                os.rename(cache, old)
            os.rename(work, cache)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        if not ready(cache):
            raise RuntimeError(f"{cache} was built but is not usable")
        return cache
