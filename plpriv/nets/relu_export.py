"""Export of a ReLU-budget model for private inference: the masked model with its per-layer ReLU counts and MACs,
and the merged (shallow) model, in one ``torch.save`` file of tensors and plain types (``weights_only`` loads it).

``load_relu_budget(path, "masked" | "merged")`` rebuilds the architecture from the stored ``arch`` (an importable
class or function and its arguments), masks it as at export, folds the recorded blocks, and loads the stored tensors:
its outputs equal the exported model's.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from plpriv.nets.relu_budget import count_macs, dense_relu_counts, relu_counts, relu_counts_by_hooks, to_masked
from plpriv.nets.relu_fold import linear_blocks, make_shallow

FORMAT = "plpriv-relu-budget-v1"


def _check_arch(arch: dict[str, Any]) -> None:
    if not isinstance(arch, dict) or not isinstance(arch.get("class_path"), str) or "." not in arch["class_path"]:
        raise ValueError("`arch` must be {'class_path': 'package.module.Builder', 'init_args': {...}}, the importable "
                         f"class or function that builds the unmasked model, got {arch!r}")
    if not isinstance(arch.get("init_args", {}), dict):
        raise ValueError(f"`arch['init_args']` must be a dict, got {type(arch['init_args']).__name__}")


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """``class_path(**init_args)``: the unmasked model."""
    _check_arch(arch)
    module, _, name = arch["class_path"].rpartition(".")
    builder = getattr(importlib.import_module(module), name)
    return builder(**arch.get("init_args", {}))


def layer_report(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Per-layer ReLU counts (hooks and masks), dense sizes and MACs per sample, with totals."""
    hooks = relu_counts_by_hooks(model, example)
    macs = count_macs(model, example)
    return {"relu_counts": hooks, "relu_counts_masks": relu_counts(model), "relu_dense": dense_relu_counts(model),
            "relus": sum(hooks.values()), "macs": macs, "total_macs": sum(macs.values())}


def export_relu_budget(model: nn.Module, path: str | os.PathLike, arch: dict[str, Any], input_shape: Sequence[int],
                       fold: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``model`` (masked by :func:`plpriv.nets.relu_budget.to_masked`) and its merged form to ``path``.

    ``arch`` rebuilds the *unmasked* model; ``input_shape`` is one sample's shape (``[C, H, W]``), the one the masks
    were built for. ``fold``: blocks to fold (default: every block whose inner ReLU is linear; see
    :func:`plpriv.nets.relu_fold.linear_blocks`). Returns the report stored with the weights."""
    _check_arch(arch)
    shape = [int(s) for s in input_shape]
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"`input_shape` must be one sample's shape, e.g. [1, 8, 8], got {list(input_shape)!r}")
    example = torch.zeros(1, *shape, device=next(model.parameters()).device)
    masked = copy.deepcopy(model).eval()
    names = list(linear_blocks(masked) if fold is None else fold)
    merged = make_shallow(copy.deepcopy(masked), names)
    report = {"masked": layer_report(masked, example), "merged": layer_report(merged, example), "folded": names}

    def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    blob = {"format": FORMAT, "arch": arch, "input_shape": shape, "folded": names, "report": report,
            "masked": cpu(masked.state_dict()), "merged": cpu(merged.state_dict())}
    torch.save(blob, path)
    return report


def load_relu_budget(path: str | os.PathLike, which: Literal["masked", "merged"] = "masked") -> nn.Module:
    """The exported model (eval mode): ``masked`` (the partial-ReLU model) or ``merged`` (its blocks folded)."""
    if which not in ("masked", "merged"):
        raise ValueError(f"`which` must be 'masked' or 'merged', got {which!r}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (write it with export_relu_budget)")
    model = to_masked(build_from_arch(blob["arch"]), torch.zeros(1, *blob["input_shape"]))
    if which == "merged":
        model.eval()
        make_shallow(model, blob["folded"], force=True)  # shapes only: the stored tensors replace the values
    model.load_state_dict(blob[which])
    return model.eval()
