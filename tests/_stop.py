"""A callback that interrupts ``fit`` after a number of epochs, as a killed job would (tests only)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class StopAfterEpochs(Callback):
    """Set ``trainer.should_stop`` at the end of epoch ``epochs`` (1-based); the run's config is otherwise unchanged,
    so a private run keeps the noise calibrated for its full planned length."""

    def __init__(self, epochs: int) -> None:
        if epochs < 1:
            raise ValueError(f"`epochs` must be >= 1, got {epochs}")
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
