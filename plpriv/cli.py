"""The ``plpriv`` command: a LightningCLI over recipes (``recipes/*.yaml``) and callback fragments (``callbacks/*.yaml``).

``plpriv fit -c recipes/A.yaml -c callbacks/B.yaml`` merges the files left to right. Fragments write their callbacks
under ``trainer.callbacks+`` (jsonargparse's list-append syntax), so they are added to the recipe's own callbacks
instead of replacing them; the same works on the command line: ``--trainer.callbacks+=LearningRateMonitor``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI


class PlprivCLI(LightningCLI):
    """LightningCLI with plpriv's defaults: any LightningModule / DataModule by ``class_path`` (subclass mode), the
    resolved config saved next to the logs (overwritten when a run is resumed into the same directory)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(*args, **kwargs)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``plpriv`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "audit":  # `plpriv audit -c recipes/audit/...`: the DP-SGD audit runner, not a LightningCLI
        from plpriv.runners.audit import main as audit_main

        audit_main(argv[1:])
        return
    # args=None lets LightningCLI read sys.argv itself (passing both makes it warn on every run).
    PlprivCLI(args=None if args is None else argv)


if __name__ == "__main__":  # pragma: no cover
    main()
