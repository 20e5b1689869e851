"""``--callback.NAME.KEY VALUE``: set one callback's argument by its class name, whatever the callbacks' order.

LightningCLI's ``--trainer.callbacks.init_args.KEY`` reaches only the *last* callback of the list, so stacking one more
fragment after ``callbacks/dp_sgd.yaml`` silently retargets ``--trainer.callbacks.init_args.target_epsilon``. These
flags are taken out of the command line before parsing and applied to the parsed config (before any class is built):
the value is read as YAML (``2``, ``null``, ``[1, 2]``), the callback's constructor checks it like any other argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["CallbackOverride", "apply_overrides", "split_overrides"]

PREFIX = "--callback."


@dataclass(frozen=True)
class CallbackOverride:
    name: str  # the callback's class name (e.g. DPSGD) or its full class path
    key: str
    value: Any


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[CallbackOverride]]:
    """``argv`` without the ``--callback.NAME.KEY [=] VALUE`` flags, and those flags."""
    rest: list[str] = []
    found: list[CallbackOverride] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith(PREFIX):
            rest.append(arg)
            i += 1
            continue
        flag, eq, value = arg.partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ValueError(f"{flag} needs a value (e.g. {flag} 2).")
            value, i = items[i + 1], i + 1
        name, _, key = flag[len(PREFIX):].rpartition(".")
        if not name or not key:
            raise ValueError(f"{flag}: write --callback.NAME.KEY VALUE, NAME a callback's class name (e.g."
                             " --callback.DPSGD.target_epsilon 2).")
        found.append(CallbackOverride(name, key, yaml.safe_load(value)))
        i += 1
    return rest, found


def apply_overrides(callbacks: Any, overrides: Sequence[CallbackOverride]) -> None:
    """Set each override on the one configured callback whose class name (or class path) is its NAME."""
    entries = callbacks if isinstance(callbacks, list) else ([] if callbacks is None else [callbacks])
    for override in overrides:
        matches = [e for e in entries if getattr(e, "class_path", None) is not None and (
            e.class_path == override.name or e.class_path.rpartition(".")[2] == override.name)]
        names = sorted({e.class_path.rpartition(".")[2] for e in entries if getattr(e, "class_path", None)})
        if not matches:
            raise ValueError(f"--callback.{override.name}.{override.key}: no callback {override.name!r} in this run"
                             f" (its callbacks: {', '.join(names) or 'none'}).")
        if len(matches) > 1:
            raise ValueError(f"--callback.{override.name}.{override.key}: {len(matches)} callbacks are"
                             f" {override.name}; set this one in the recipe, or use its full class path if they"
                             " differ.")
        entry = matches[0]
        if entry.get("init_args") is None:
            from jsonargparse import Namespace

            entry.init_args = Namespace()
        entry.init_args[override.key] = override.value
