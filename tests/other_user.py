"""Run a child python as another OS user (``nobody``, when the tests run as root) for the permission tests.

The other user must be able to read the kvmem it imports. From a checkout in a private folder (a mode-700
``mktemp -d``, a home folder) it cannot, so the package is copied once into a world-readable temporary folder
that goes first on the child's ``PYTHONPATH``; if the child still cannot import what it needs (say, the virtual
environment itself is private), the test is skipped with the reason instead of failing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

PY = sys.executable
NOBODY = 65534


def _prefix() -> list[str]:
    if os.geteuid() != 0:
        return []  # not root: the child runs as this user (the tests make the files read-only instead)
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no other user to test permissions with")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@lru_cache(maxsize=1)
def _readable_kvmem() -> str:
    """A world-readable copy of the kvmem package under test; returns the folder to put on PYTHONPATH."""
    import kvmem

    folder = Path(tempfile.mkdtemp(prefix="kvmem-other-user-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copytree(Path(kvmem.__file__).parent, folder / "kvmem",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(folder)


def _env() -> dict:
    return {**os.environ, "HOME": "/tmp", "TRITON_CACHE_DIR": "/tmp/.kvmem-adv-triton",
            "PYTHONPATH": os.pathsep.join(p for p in (_readable_kvmem(), os.environ.get("PYTHONPATH")) if p)}


@lru_cache(maxsize=1)
def _can_import() -> str | None:
    """None if the other user can run kvmem's stack, else why not."""
    try:
        done = subprocess.run([*_prefix(), PY, "-c", "import torch, transformers, safetensors, typer, kvmem.store"],
                              capture_output=True, text=True, timeout=300, cwd="/tmp", env=_env())
    except OSError as exc:
        return f"cannot start {PY} as uid {NOBODY}: {exc}"
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return None


def run_as_other_user(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh python as a user without write access to root's files (nobody, when we are root);
    skipped, with the reason, where that user cannot run python with kvmem's dependencies at all."""
    prefix = _prefix()
    why = _can_import() if prefix else None
    if why is not None:
        pytest.skip(f"uid {NOBODY} cannot import kvmem's dependencies from this checkout ({why}): make the "
                    "virtual environment readable to other users to run the permission tests")
    return subprocess.run([*prefix, PY, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd="/tmp", env=_env())
