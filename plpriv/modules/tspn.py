"""TSPN: maximum-likelihood training of a tensor sum-product network (Ko et al., IEEE TNNLS 2020).

Logs ``train/nll``, ``val/nll``, ``val/ll``, ``val/bpd``, ``test/ll`` and ``test/bpd`` (nats per example; bits per
dimension = -log p(x) / (d ln 2)) through torchmetrics ``Metric`` objects, so they accumulate exactly over the split
and reduce across processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import Metric

from plpriv.nets.tspn import Parameterization, TensorSPN


class LogLikelihood(Metric):
    """Mean log-likelihood (nats per example) of the log-probabilities passed to ``update``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, log_prob: Tensor) -> None:
        if log_prob.ndim != 1:
            raise ValueError(f"`log_prob` must be a 1-d tensor of per-example values, got {tuple(log_prob.shape)}")
        self.total += log_prob.detach().double().sum()
        self.count += log_prob.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class BitsPerDim(LogLikelihood):
    """Bits per dimension: -mean log p(x) / (d ln 2)."""

    higher_is_better = False

    def __init__(self, num_vars: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_vars, int) or num_vars < 1:
            raise ValueError(f"`num_vars` must be a positive int, got {num_vars!r}")
        self.num_vars = num_vars

    def compute(self) -> Tensor:
        return -super().compute() / (self.num_vars * math.log(2))


def _states(batch: Any) -> Tensor:
    """The data tensor of a batch: a tensor, or the first element of a ``(x, ...)`` tuple/list."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"a TSPN batch must be a tensor or a tuple starting with one, got {type(x).__name__}")
    return x


class TSPN(LightningModule):
    """Tensor SPN density model trained by negative log-likelihood.

    Args:
        num_vars: number of variables (64 for binarised digits).
        num_states: states per variable.
        rank: TT rank (one int, or ``num_vars - 1`` ints).
        parameterization: ``exp`` or ``softplus`` nonnegative cores (see :class:`plpriv.nets.TensorSPN`).
        init: ``mixture`` or ``random`` initial cores (see :class:`plpriv.nets.TensorSPN`).
        init_scale: std of the random initial logits.
        init_seed: seed of the initial cores.
        em_init_steps: full-batch EM steps on the training split before gradient training starts (once per run: a
            resumed run keeps its restored cores); 0 = pure gradient NLL training.
        optimizer: callable ``params -> Optimizer``.
        lr_scheduler: optional callable ``optimizer -> LRScheduler`` (stepped every epoch).
    """

    def __init__(
        self,
        num_vars: int = 64,
        num_states: int = 2,
        rank: int | Sequence[int] = 8,
        parameterization: Parameterization = "exp",
        init: Literal["mixture", "random"] = "mixture",
        init_scale: float = 1.0,
        init_seed: int = 0,
        em_init_steps: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not isinstance(em_init_steps, int) or em_init_steps < 0:
            raise ValueError(f"`em_init_steps` must be an int >= 0, got {em_init_steps!r}")
        self.net = TensorSPN(num_vars, num_states, rank, parameterization, init, init_scale, seed=init_seed)
        self.em_init_steps = em_init_steps
        # persisted flag: the EM initialisation runs once, never again on resume
        self.register_buffer("em_done", torch.tensor(em_init_steps == 0))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_ll, self.test_ll = LogLikelihood(), LogLikelihood()
        self.val_bpd, self.test_bpd = BitsPerDim(num_vars), BitsPerDim(num_vars)

    def forward(self, x: Tensor) -> Tensor:
        """log p(x), ``[B]``."""
        return self.net.log_prob(x)

    def on_fit_start(self) -> None:
        if bool(self.em_done):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("`em_init_steps` > 0 needs a LightningDataModule (trainer.fit(model, datamodule=...)); "
                             "set em_init_steps=0 to train from the random cores")
        x = torch.cat([_states(batch) for batch in datamodule.train_dataloader()]).to(self.device)
        for _ in range(self.em_init_steps):
            ll = self.net.em_step(x)
        self.em_done.fill_(True)
        self.print(f"TSPN: {self.em_init_steps} EM steps, train log-likelihood {ll:.3f} before the last")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = _states(batch)
        loss = -self(x).mean()
        self.log("train/nll", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = _states(batch)
        log_prob = self(x)
        self.val_ll(log_prob)
        self.val_bpd(log_prob)
        self.log("val/nll", -log_prob.mean(), prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log("val/ll", self.val_ll, batch_size=len(x))
        self.log("val/bpd", self.val_bpd, prog_bar=True, batch_size=len(x))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x = _states(batch)
        log_prob = self(x)
        self.test_ll(log_prob)
        self.test_bpd(log_prob)
        self.log("test/ll", self.test_ll, batch_size=len(x))
        self.log("test/bpd", self.test_bpd, batch_size=len(x))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """log p(x) of each example of the batch."""
        return self(_states(batch))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
