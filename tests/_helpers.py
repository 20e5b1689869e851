"""Test helpers importable from any test module (``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_plpriv(args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None):
    """Run ``python -m plpriv ARGS`` in ``cwd``; return the CompletedProcess (stdout+stderr in ``.stdout``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "plpriv", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def run_script(script: Path, args: list[str], cwd: Path, timeout: float = 600):
    """Run a test-written Python ``script`` with ``tests``, ``tests/callbacks`` and the repo on its path, one thread
    (DDP runs: the script starts its own gloo processes); assert exit 0, showing the output's tail otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT / "tests" / "callbacks"),
                                                      str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc
