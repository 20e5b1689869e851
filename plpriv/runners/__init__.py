"""Orchestration that trains many models (like the CLI, may import modules / callbacks / data).

The names below are imported on first use (PEP 562 module ``__getattr__``): importing one runner, e.g.
``plpriv.runners.unlearn`` for ``plpriv unlearn``, does not import the audit runner and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plpriv.runners.audit import AuditConfig, AuditFailed, CraftingConfig, build_parser, main, run_audit

__all__ = ["AuditConfig", "AuditFailed", "CraftingConfig", "build_parser", "main", "run_audit"]

_SOURCES = {name: "plpriv.runners.audit" for name in __all__}  # public name -> the module that defines it


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
