"""The CLI's help formatter: jsonargparse's, with its "known subclasses" lists cut to plpriv's own classes.

For an ``nn.Module`` argument jsonargparse lists every importable subclass (over a thousand lines for
``plpriv fit --model.help plpriv.modules.EDM``); jsonargparse has no option to limit the list, so the help string
of such an argument is shortened here, through argparse's documented ``formatter_class`` hook. ``--model.help``
builds its parser as ``type(parser)(description=...)``, so the formatter is the default of plpriv's parser class
(LightningCLI's ``parser_class`` argument), not only a keyword of the top-level parser.
"""

from __future__ import annotations

import re
from argparse import Action

from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["ConciseHelpFormatter", "PlprivArgumentParser"]

_KNOWN = re.compile(r", known subclasses: ([^)]*)")
_SHOWN_PREFIXES = ("plpriv.",)


def _shorten(match: re.Match[str]) -> str:
    paths = [p.strip() for p in match.group(1).split(",") if p.strip()]
    ours = [p for p in paths if p.startswith(_SHOWN_PREFIXES)]
    more = len(paths) - len(ours)
    if not ours:
        return f", any subclass by class path ({more} importable)"
    tail = f"; or any of {more} other importable subclasses by class path" if more else ""
    return ", plpriv subclasses: " + ", ".join(ours) + tail


class ConciseHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with "known subclasses" reduced to ``plpriv.*`` classes and a count of the rest."""

    def _get_help_string(self, action: Action) -> str:
        return _KNOWN.sub(_shorten, super()._get_help_string(action))


class PlprivArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :class:`ConciseHelpFormatter` as the default formatter (nested help parsers too)."""

    def __init__(self, *args: Any, formatter_class: type = ConciseHelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
