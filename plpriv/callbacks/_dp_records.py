"""DPSGD's checkpoint contents: the public callback state, the refusal to resume another mechanism, and the public
``checkpoint["plpriv_privacy"]`` record. Never a seed, a generator state or sampled indices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from plpriv.callbacks.dp_sgd import DPSGD
    from plpriv.privacy.poisson import PoissonDataLoader

__all__ = ["PRIVACY_RECORD_KEY", "check_resumed_privately", "check_same_mechanism", "privacy_record", "public_state"]

PRIVACY_RECORD_KEY = "plpriv_privacy"  # top-level checkpoint key: what mechanism trained it, epsilon so far


def public_state(dp: DPSGD, loader: PoissonDataLoader | None) -> dict[str, Any]:
    """``DPSGD.state_dict``: accountant history, mechanism constants, run id and the loader's position."""
    return {
        "accountant": dp.ledger.state_dict(),
        "noise_multiplier": dp.effective_noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": dp.sample_rate,
        "expected_batch_size": dp.expected_batch_size,
        "delta": dp.delta,
        "run_id": dp.run_id,
        "loader": loader.state_dict() if loader is not None else None,  # (epoch, batches consumed)
    }


def check_resumed_privately(dp: DPSGD, trainer: Trainer, has_state: bool) -> None:
    """Refuse to resume a checkpoint of steps taken without DPSGD (no DPSGD state in it): epsilon would not cover
    them; unless ``allow_mechanism_change``."""
    if trainer.ckpt_path and not has_state and trainer.global_step > 0 and not dp.allow_mechanism_change:
        raise ValueError(
            f"DPSGD: {trainer.ckpt_path} was trained for {trainer.global_step} steps without DPSGD; epsilon would"
            " not cover them. Start from its weights as a new run (no --ckpt_path; e.g. a public pretrained"
            " model), or set DPSGD(allow_mechanism_change=True) to continue knowingly."
        )


def check_same_mechanism(dp: DPSGD, state_dict: dict[str, Any]) -> None:
    """Refuse a checkpoint trained with another accountant, noise multiplier or clipping bound, unless
    ``allow_mechanism_change``."""
    mechanism = state_dict["accountant"].get("mechanism", dp.accountant)
    adjacency = state_dict["accountant"].get("adjacency", "add_remove")
    history = state_dict["accountant"]["history"]
    sigma = state_dict.get("noise_multiplier")
    changes = []
    if mechanism != dp.accountant:
        changes.append(f"accountant {mechanism!r} -> {dp.accountant!r}")
    if adjacency != dp.adjacency:
        changes.append(f"adjacency {adjacency!r} -> {dp.adjacency!r}")
    if dp.noise_multiplier is not None and history and sigma is not None and sigma != dp.noise_multiplier:
        changes.append(f"noise_multiplier {sigma} -> {dp.noise_multiplier}")
    clip = state_dict.get("max_grad_norm")
    if clip is not None and clip != dp.max_grad_norm:
        changes.append(f"max_grad_norm {clip} -> {dp.max_grad_norm}")
    if changes and not dp.allow_mechanism_change:
        raise ValueError(
            f"DPSGD: the checkpoint was trained with another mechanism ({'; '.join(changes)}). Resume with the"
            " checkpoint's settings, or set DPSGD(allow_mechanism_change=True) to continue knowingly (the"
            " accountant then composes both parts of the history)."
        )


def privacy_record(dp: DPSGD) -> dict[str, Any]:
    """The public record of how the weights were trained (``checkpoint[PRIVACY_RECORD_KEY]``)."""
    return {
        "mechanism": "dp-sgd",
        "trained_privately": True,
        "adjacency": dp.adjacency,
        "accountant": dp.accountant,
        "epsilon": dp.get_epsilon() if dp.delta is not None else None,
        "delta": dp.delta,
        "steps": dp.steps,
        "noise_multiplier": dp.effective_noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": dp.sample_rate,
        "expected_batch_size": dp.expected_batch_size,
        "poisson_sampling": dp.poisson_sampling,
        "target_epsilon": dp.target_epsilon,
    }
