"""Which sub-modules DP-SGD trains, and whether opacus can train them (no Lightning imports).

Errors name the sub-module path, why, and the fix for that layer type. :func:`fix_modules` changes the model in
place (opacus' ``ModuleValidator.fix`` returns a copy, which a callback cannot hand back to the trainer):

* ``BatchNorm*`` -> ``GroupNorm(gcd(32, C), C)`` (opacus' rule; fresh affine weights, no running statistics);
* ``nn.MultiheadAttention`` -> :class:`plpriv.nets.dp_attention.DPMultiheadAttention` (same function and masks,
  weights copied exactly; ``nn.Transformer`` and ``nn.TransformerEncoder/Decoder`` use it through their layers);
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` -> opacus' ``DPLSTM`` / ``DPGRU`` / ``DPRNN`` (weights copied exactly);
* ``InstanceNorm*(track_running_stats=True)`` -> the same without running statistics;
* every ``inplace=True`` layer (``ReLU``, ``Dropout``, timm's activations, ...) -> ``inplace=False`` (same function;
  in-place writes on a hooked layer's output or a recorded activation are what per-sample hooks cannot follow).
"""

from __future__ import annotations

from collections.abc import Callable

from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.loss import _Loss

__all__ = ["check_loss_modules", "fix_modules", "join_path", "layer_fix", "private_roots", "validate_modules"]

_RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)


def join_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _attention_fixer(sub: nn.Module) -> nn.Module:
    from plpriv.nets.dp_attention import DPMultiheadAttention  # plpriv.nets imports heavy optional packages

    return DPMultiheadAttention.from_torch(sub)  # type: ignore[arg-type]


def _fixer(sub: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The replacement rule for ``sub``, or ``None`` when it needs none or has none."""
    if isinstance(sub, nn.MultiheadAttention):
        return None if sub.bias_k is not None or sub.add_zero_attn else _attention_fixer
    if isinstance(sub, _RNN_TYPES) and getattr(sub, "proj_size", 0):
        return None  # opacus' DPLSTM has no projection
    fixer = ModuleValidator.FIXERS.get(type(sub))
    validator = ModuleValidator.VALIDATORS.get(type(sub))
    if fixer is None or not (isinstance(sub, _BatchNorm) or (validator and validator(sub))):
        return None
    return fixer


def layer_fix(sub: nn.Module) -> str:
    """What to do about a layer opacus cannot train, for this layer type (used in refusals)."""
    name = type(sub).__name__
    if isinstance(sub, nn.MultiheadAttention):
        if sub.bias_k is not None or sub.add_zero_attn:
            return ("no DP version of add_bias_kv/add_zero_attn: build it with add_bias_kv=False,"
                    " add_zero_attn=False, then DPSGD(fix_modules=True) swaps it for plpriv's DPMultiheadAttention")
        return ("set DPSGD(fix_modules=True): it swaps it for plpriv.nets.dp_attention.DPMultiheadAttention (same"
                " function and masks, causal included; weights carried over)")
    if isinstance(sub, _RNN_TYPES):
        if getattr(sub, "proj_size", 0):
            return f"opacus' DP{name} has no proj_size: use proj_size=0 and an nn.Linear after it"
        return f"set DPSGD(fix_modules=True): it swaps it for opacus' DP{name} (weights carried over)"
    if isinstance(sub, _BatchNorm):
        return ("set DPSGD(fix_modules=True): it replaces it by GroupNorm(gcd(32, C), C), or pass a GroupNorm /"
                " LayerNorm norm layer to the model's constructor")
    if isinstance(sub, _InstanceNorm):
        return f"set DPSGD(fix_modules=True) or build it with {name}(track_running_stats=False)"
    if type(sub) in ModuleValidator.FIXERS:
        return "set DPSGD(fix_modules=True) to replace it"
    return ("no per-sample gradient rule: freeze it, or rebuild it from supported layers (Linear, Conv, GroupNorm,"
            " LayerNorm, Embedding)")


def fix_modules(module: nn.Module, log: Callable[[str], None] = print) -> list[str]:
    """Make ``module`` trainable by opacus in place (the rules in the module docstring), keeping device, dtype,
    training mode and trainability. Returns the replaced paths; ``log`` receives one line per replacement."""
    replaced = []
    inplace = []
    for path, sub in list(module.named_modules()):
        if getattr(sub, "inplace", None) is True:
            sub.inplace = False  # public attribute of torch's and timm's in-place layers; same function
            inplace.append(path)
        fixer = _fixer(sub)
        if fixer is None or not path:
            continue
        new = fixer(sub)
        ref = next(iter(sub.parameters()), None)
        ref = next(iter(sub.buffers()), None) if ref is None else ref
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        trainable = any(p.requires_grad for p in sub.parameters())
        for p in new.parameters():
            p.requires_grad_(trainable)
        new.train(sub.training)
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path), name, new)
        replaced.append(path)
        log(f"DPSGD(fix_modules=True): replaced `{path}` ({type(sub).__name__}) by {type(new).__name__}.")
    if inplace:
        log(f"DPSGD(fix_modules=True): set inplace=False on {len(inplace)} layers ({', '.join(inplace[:3])}"
            f"{', ...' if len(inplace) > 3 else ''}).")
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
            if isinstance(sub, _BatchNorm):
                reason = "BatchNorm mixes the examples of a batch (batch statistics, running buffers)"
            elif not any(p.requires_grad for p in sub.parameters()):
                continue  # frozen: opacus puts no hooks on it
            elif isinstance(sub, nn.MultiheadAttention):
                reason = "its packed in_proj_weight is used inside F.multi_head_attention_forward, out of opacus' hooks"
            elif isinstance(sub, _RNN_TYPES):
                reason = "its fused recurrent kernel hides the per-time-step products opacus' hooks need"
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
            problems.append(f"`{path}` ({type(sub).__name__}): {reason}; {layer_fix(sub)}.")
    if problems:
        raise ValueError("DPSGD cannot train these modules privately:\n  " + "\n  ".join(problems))
