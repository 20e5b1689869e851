"""The ``plpriv`` console script's entry point: ``plpriv --help`` (and no arguments) print static text without
importing torch or Lightning (seconds of imports a first-time user would wait for); every other command runs
:func:`plpriv.cli.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from plpriv.cli_help import print_top_level_help

__all__ = ["main"]


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``plpriv`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print_top_level_help()
        raise SystemExit(0 if argv else 2)
    from plpriv.cli import main as cli_main

    cli_main(args)
