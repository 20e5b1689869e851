"""One-line messages for the parser's errors (a key that does not exist, an argument a class does not take), with
the closest valid name: jsonargparse otherwise prints ~50 lines of usage before the one line that matters."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TOP_LEVEL_KEYS", "did_you_mean", "parser_error_message"]

# the keys a subcommand's config may have at its top level (LightningCLI's, plus plpriv's --torch_threads)
TOP_LEVEL_KEYS = ("trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything",
                  "torch_threads", "weights_only", "config", "print_config")


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _init_parameters(obj: Any) -> list[str]:
    """The keyword arguments a class (and the classes it forwards ``**kwargs`` to) accepts."""
    names: list[str] = []
    for cls in getattr(obj, "__mro__", [obj]):
        if cls is object:
            break
        params = inspect.signature(cls.__init__).parameters.values() if "__init__" in vars(cls) else []
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params) and "__init__" in vars(cls):
            break
    return names


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _section_keys(section: str) -> list[str]:
    if section == "trainer":
        from lightning.pytorch import Trainer

        return [f"trainer.{p}" for p in _init_parameters(Trainer)]
    return []


def _config_top_keys(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(key, file) for every top-level key of the ``-c``/``--config`` files in ``argv``."""
    import yaml

    out = []
    for flag, path in zip(argv, argv[1:]):
        if flag in ("-c", "--config") and Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text()) or {}
            out += [(str(k), path) for k in data] if isinstance(data, dict) else []
    return out


def parser_error_message(text: str, argv: Sequence[str]) -> str | None:
    """One line for a parser error ``text`` (None: not one of the known shapes)."""
    found = re.search(r"does not accept option '([^']+)'", text)
    if found:
        key = found.group(1)
        section = key.split(".", 1)[0]
        candidates = _section_keys(section) if "." in key else list(TOP_LEVEL_KEYS)
        return f"unknown key '{key}'{did_you_mean(key, candidates)}: check the recipe and the command line."
    found = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", text)
    if found:
        path, option = found.groups()
        cls = _class(path)
        candidates = _init_parameters(cls) if cls is not None else []
        section = re.match(r'Parser key "([\w.]+)"', text)
        where = section.group(1).split(".")[0] if section else "model"
        return (f"{path} has no argument '{option}'{did_you_mean(option, candidates)}"
                f" (its arguments: plpriv fit --{where}.help {path}).")
    found = re.search(r"Problem with given class_path '([^']+)':\s*Parser key \"([^\"]+)\":\s*([^\n]+)", text)
    if found:  # a value of the wrong type (the class's own ValueErrors come through user_error_message)
        path, key, reason = found.groups()
        return f"{path}: argument '{key}': {reason.strip()}"
    flags = re.findall(r"--([\w.]+)", text) if text.startswith("unrecognized arguments") else []
    if flags:
        key = flags[0]
        section = key.split(".", 1)[0]
        candidates = _section_keys(section) if "." in key else list(TOP_LEVEL_KEYS)
        return f"unknown option '--{key}'{did_you_mean(key, candidates)}."
    if text.startswith("unrecognized arguments"):
        unknown = [(k, f) for k, f in _config_top_keys(argv) if k not in TOP_LEVEL_KEYS]
        if unknown:
            key, path = unknown[0]
            return f"unknown top-level key '{key}' in {path}{did_you_mean(key, TOP_LEVEL_KEYS)}."
    return None
