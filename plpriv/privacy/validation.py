"""Which sub-modules DP-SGD trains, and whether opacus can train them (no Lightning imports).

Errors name the sub-module path and the fix; :func:`fix_modules` swaps BatchNorm & co. in place (opacus'
``ModuleValidator.fix`` returns a copy, which a callback cannot hand back to the trainer).
"""

from __future__ import annotations

from collections.abc import Callable

from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.loss import _Loss

__all__ = ["check_loss_modules", "fix_modules", "join_path", "private_roots", "validate_modules"]


def join_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def fix_modules(module: nn.Module, log: Callable[[str], None] = print) -> list[str]:
    """Replace sub-modules opacus cannot train (BatchNorm, ...) in place, keeping device, dtype and trainability.

    Returns the replaced paths; ``log`` receives one line per replacement.
    """
    replaced = []
    for path, sub in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(sub))
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if fixer is None or not path:
            continue
        if not isinstance(sub, _BatchNorm) and not (validator and validator(sub)):
            continue
        new = fixer(sub)
        ref = next(iter(sub.parameters()), None)
        ref = next(iter(sub.buffers()), None) if ref is None else ref
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        trainable = any(p.requires_grad for p in sub.parameters())
        for p in new.parameters():
            p.requires_grad_(trainable)
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path), name, new)
        replaced.append(path)
        log(f"DPSGD(fix_modules=True): replaced `{path}` ({type(sub).__name__}) by {new}.")
    return replaced


def check_loss_modules(module: nn.Module) -> None:
    """opacus rescales per-sample gradients by the batch size: every ``torch.nn`` loss must average."""
    for path, sub in module.named_modules():
        if isinstance(sub, _Loss) and getattr(sub, "reduction", "mean") != "mean":
            raise ValueError(
                f"`{path}` ({type(sub).__name__}) has reduction={sub.reduction!r}; DPSGD needs the mean over the"
                " batch (opacus rescales per-sample gradients by the batch size). Use reduction='mean'."
            )


def private_roots(module: nn.Module, private: set[int]) -> list[tuple[str, nn.Module]]:
    """Largest sub-modules whose trainable parameters are all private (``id``s in ``private``): hooks go on these."""
    roots: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(path: str, sub: nn.Module) -> None:
        if id(sub) in seen:
            return
        seen.add(id(sub))
        params = {id(p) for p in sub.parameters() if p.requires_grad}
        if not params & private:
            return
        if params <= private:
            roots.append((path, sub))
            return
        if any(id(p) in private for p in sub.parameters(recurse=False) if p.requires_grad):
            raise ValueError(
                f"`{path or 'the LightningModule'}` ({type(sub).__name__}) directly holds parameters of the"
                " private and of a non-private optimizer; put them in different sub-modules."
            )
        for name, child in sub.named_children():
            visit(join_path(path, name), child)

    visit("", module)
    covered = {id(p) for _, root in roots for p in root.parameters()}
    if not private <= covered:
        raise ValueError("Some parameters of the private optimizer are not parameters of the LightningModule.")
    return roots


def validate_modules(roots: list[tuple[str, nn.Module]]) -> None:
    """Raise one error listing every sub-module opacus cannot compute per-sample gradients for, with its fix."""
    problems = []
    for root_path, root in roots:
        for name, sub in root.named_modules():
            path = join_path(root_path, name) or "the LightningModule"
            fixable = type(sub) in ModuleValidator.FIXERS
            if isinstance(sub, _BatchNorm):
                reason = "BatchNorm mixes the examples of a batch (batch statistics, running buffers)"
            elif any(p.requires_grad for p in sub.parameters(recurse=False)):
                validator = ModuleValidator.VALIDATORS.get(type(sub))
                errors = validator(sub) if validator else []
                if errors:
                    reason = str(errors[0]).split(". ")[0]
                elif any(True for _ in sub.buffers()):
                    reason = "trainable layer with buffers, which opacus cannot compute per-sample gradients for"
                else:
                    continue
            else:
                continue
            fix = (
                "set DPSGD(fix_modules=True) to replace it, or replace it by hand (e.g. GroupNorm)"
                if fixable
                else "replace it by a supported layer (Linear, Conv, GroupNorm, LayerNorm, Embedding, ...)"
            )
            problems.append(f"`{path}` ({type(sub).__name__}): {reason}; {fix}.")
    if problems:
        raise ValueError("DPSGD cannot train these modules privately:\n  " + "\n  ".join(problems))
