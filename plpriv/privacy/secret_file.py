"""The noise and sampling secret of a private run, kept out of every checkpoint (no Lightning imports).

Whoever knows the seed of a DP-SGD run can replay its Poisson batches and its noise on both neighbouring data sets
and tell membership with certainty, so checkpoints (which get shared and published) never hold it. Exact resume
instead reads a separate, owner-only file next to the checkpoints, ``dpsgd-secret-<run id>.json``; the run id is
public (random, in the checkpoint) and only names the file. Never publish or copy that file with the checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_secret", "secret_path", "write_secret"]


def secret_path(directory: str | os.PathLike, run_id: str) -> Path:
    if not run_id or not run_id.isalnum():
        raise ValueError(f"`run_id` must be a non-empty alphanumeric string, got {run_id!r}.")
    return Path(directory) / f"dpsgd-secret-{run_id}.json"


def write_secret(directory: str | os.PathLike, run_id: str, seed: int) -> Path:
    """Write ``seed`` for ``run_id`` atomically, readable and writable by the owner only (mode 0600)."""
    path = secret_path(directory, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"run_id": run_id, "seed": str(int(seed))}, f)
    os.chmod(tmp, 0o600)  # also when the file existed with wider permissions
    os.replace(tmp, path)
    return path


def read_secret(directory: str | os.PathLike, run_id: str) -> int | None:
    """The seed of ``run_id`` from its secret file in ``directory``; ``None`` if there is none."""
    path = secret_path(directory, run_id)
    if not path.is_file():
        return None
    with open(path) as f:
        data = json.load(f)
    if data.get("run_id") != run_id:
        raise ValueError(f"{path} holds the secret of run {data.get('run_id')!r}, not of {run_id!r}.")
    return int(data["seed"])
