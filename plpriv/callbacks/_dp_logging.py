"""DPSGD's reporting: when Lightning keeps step metrics, the ``dp/*`` values, the lines at the start and the end of
training and the epsilon-vs-step figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch import Trainer

if TYPE_CHECKING:
    from plpriv.privacy.engine import DPEngine

__all__ = ["dp_metrics", "dropped_metrics_warning", "save_epsilon_plot", "should_update_logs", "start_line", "summary",
           "unverified_independence_warning"]


def should_update_logs(trainer: Trainer) -> bool:
    """Whether Lightning hands this step's metrics to the loggers (every ``log_every_n_steps`` steps; it drops the
    others). No public API for the condition; without it: every step."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def dp_metrics(dp: DPEngine) -> dict[str, float]:
    """``dp/delta``, ``dp/noise_multiplier``, ``dp/sample_rate`` (the same on every rank; epsilon is logged apart)."""
    return {"dp/delta": float(dp.delta),  # type: ignore[arg-type]
            "dp/noise_multiplier": float(dp.effective_noise_multiplier),  # type: ignore[arg-type]
            "dp/sample_rate": float(dp.sample_rate)}  # type: ignore[arg-type]


def start_line(dp: DPEngine) -> str:
    """The line at the start of training: the mechanism's constants."""
    return (
        f"DPSGD: {dp.mechanism.name}, sigma={dp.effective_noise_multiplier:.4g}, C={dp.max_grad_norm:g},"
        f" q={dp.sample_rate:.4g}, divisor B="
        f"{dp.expected_batch_size:g}, delta={dp.delta:.3g}, {dp.adjacency} adjacency, accountant={dp.accountant},"
        f" {'Poisson' if dp.poisson_sampling else 'fixed-size'} batches, grad_sample_mode={dp.grad_sample_mode}."
    )


def summary(dp: DPEngine) -> str:
    """The end-of-training line: (epsilon, delta) named by the mechanism whose accountant computed it (its title and
    class) and the accountant underneath, then the mechanism's constants."""
    ledger = dp.ledger
    return (
        f"DPSGD: {dp.steps} steps, (epsilon, delta) = ({dp.get_epsilon():.4f}, {dp.delta:.3g}) under {dp.adjacency}"
        f" adjacency: {ledger.title} by {type(ledger.mechanism).__name__} (accountant={ledger.accountant};"
        f" sigma={dp.effective_noise_multiplier:.4g}, q={dp.sample_rate:.4g}, C={dp.max_grad_norm:g})."
    )


def save_epsilon_plot(dp: DPEngine, trainer: Trainer) -> None:
    """``dp_epsilon.png`` in the log directory (and to the loggers); nothing without a logger."""
    if not trainer.loggers:
        return
    from plpriv.utils.figures import save_and_log_figure

    directory = trainer.log_dir  # a collective under DDP: every rank resolves it
    if trainer.is_global_zero:
        save_and_log_figure(trainer, dp.ledger.figure(float(dp.delta), dp.target_epsilon),  # type: ignore[arg-type]
                            "dp_epsilon", directory=directory)


def dropped_metrics_warning(names: list[str]) -> str:
    return (f"DPSGD: dropped {names} logged from the training hooks: statistics of the private batches are not"
            " covered by epsilon. Publish them knowingly with DPSGD(log_training_metrics=[...]) (the run then says they are not"
            " covered), or log them from validation.")


def unverified_independence_warning(module: str) -> str:
    return (f"DPSGD: cannot verify that `{module}.training_step` treats the examples of a batch independently: two"
            " identical passes differ (it draws randomness from somewhere the probe cannot replay: a generator"
            " outside the model, wall-clock or data-order state). DP-SGD's sensitivity bound assumes no layer or loss"
            " mixes examples. Draw from torch's global RNG or a generator held by the model, or set"
            " DPSGD(assume_independent_examples=True) to assert it.")
