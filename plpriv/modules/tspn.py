"""TSPN: maximum-likelihood training of a tensor sum-product network (Ko et al., IEEE TNNLS 2020).

Logs ``train/nll``, ``val/nll``, ``val/ll``, ``val/bpd``, ``test/ll`` and ``test/bpd`` (nats per example; bits per
dimension = -log p(x) / (d ln 2)) through torchmetrics ``Metric`` objects, so they accumulate exactly over the split
and reduce across processes, and ``em/steps``, the EM steps the initialisation took.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import Metric

from plpriv.nets.tspn import Parameterization, TensorSPN
from plpriv.nets.variable_order import ORDER_NAMES, resolve_order


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


class VariableDataModule(Protocol):
    """What TSPN needs from its datamodule: the number of variables and the loaders."""

    num_vars: int

    def train_dataloader(self) -> Any: ...

    def val_dataloader(self) -> Any: ...


class TSPN(LightningModule):
    """Tensor SPN density model trained by negative log-likelihood.

    Args:
        num_vars: number of variables; ``None`` (default): the datamodule's ``num_vars`` (the net is then built in
            ``configure_model`` and the value saved in the checkpoint's hyperparameters).
        num_states: states per variable.
        rank: TT rank (one int, or ``num_vars - 1`` ints).
        parameterization: ``exp`` or ``softplus`` nonnegative cores (see :class:`plpriv.nets.TensorSPN`).
        init: ``mixture`` or ``random`` initial cores (see :class:`plpriv.nets.TensorSPN`).
        init_scale: std of the random initial logits.
        init_seed: seed of the initial cores.
        em_init_steps: full-batch EM steps on the training split before gradient training starts (once per run: a
            resumed run keeps its restored cores); 0 = pure gradient NLL training. With ``em_tol`` the most steps.
        em_tol: ``None``: exactly ``em_init_steps`` steps; a float: EM to convergence, stopping once the validation
            log-likelihood has not risen by ``em_tol`` nats for ``em_patience`` steps (best cores kept).
        em_patience: see ``em_tol``.
        order: chain order of the variables: ``raster``, ``hilbert`` (needs a square ``num_vars`` or ``grid``),
            ``chow_liu`` or ``mi_chain`` (learnt from the training split at the start of the first fit), or a
            permutation list. Stored in the net's ``order`` buffer, so checkpoints, sampling and marginals keep it.
        grid: ``(height, width)`` of the variables for ``hilbert``.
        optimizer: callable ``params -> Optimizer``.
        lr_scheduler: optional callable ``optimizer -> LRScheduler`` (stepped every epoch).
    """

    def __init__(
        self,
        num_vars: int | None = None,
        num_states: int = 2,
        rank: int | Sequence[int] = 8,
        parameterization: Parameterization = "exp",
        init: Literal["mixture", "random"] = "mixture",
        init_scale: float = 1.0,
        init_seed: int = 0,
        em_init_steps: int = 10,
        em_tol: float | None = None,
        em_patience: int = 5,
        order: str | Sequence[int] = "raster",
        grid: tuple[int, int] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not isinstance(em_init_steps, int) or em_init_steps < 0:
            raise ValueError(f"`em_init_steps` must be an int >= 0, got {em_init_steps!r}")
        if em_tol is not None and (em_tol < 0 or not isinstance(em_patience, int) or em_patience < 1):
            raise ValueError(f"need em_tol >= 0 and an int em_patience >= 1, got {em_tol!r}, {em_patience!r}")
        if isinstance(order, str) and order not in ORDER_NAMES:
            raise ValueError(f"`order` must be one of {ORDER_NAMES} or a permutation list, got {order!r}")
        self.em_init_steps, self.em_tol, self.em_patience = em_init_steps, em_tol, em_patience
        self.order_spec, self.grid = order, grid
        self.learnt_order = order in ("chow_liu", "mi_chain")
        # persisted flag: the data-dependent initialisation (learnt order, EM) runs once, never again on resume
        self.register_buffer("em_done", torch.tensor(em_init_steps == 0 and not self.learnt_order))
        self.register_buffer("em_steps_taken", torch.tensor(0))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_ll, self.test_ll = LogLikelihood(), LogLikelihood()
        self.net: TensorSPN | None = None
        if num_vars is not None:
            self._build(num_vars)

    def _build(self, num_vars: int) -> None:
        """The tensor SPN and the bits-per-dim metrics for ``num_vars`` variables."""
        hp = self.hparams
        if not isinstance(num_vars, int) or num_vars < 2:
            raise ValueError(f"`num_vars` must be an int >= 2, got {num_vars!r}")
        order = None if self.learnt_order else resolve_order(self.order_spec, num_vars, grid=self.grid)
        self.net = TensorSPN(num_vars, hp.num_states, hp.rank, hp.parameterization, hp.init, hp.init_scale,
                             seed=hp.init_seed, order=order)
        self.val_bpd, self.test_bpd = BitsPerDim(num_vars), BitsPerDim(num_vars)
        self.hparams["num_vars"] = num_vars  # saved with checkpoints, so load_from_checkpoint rebuilds the net

    def configure_model(self) -> None:
        """Build the net from the datamodule's ``num_vars`` when none was given (before a checkpoint is restored)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dm_vars = getattr(datamodule, "num_vars", None)
        if self.net is None:
            if dm_vars is None:
                raise ValueError("`num_vars` is None and the datamodule has no `num_vars`: pass num_vars=...")
            self._build(int(dm_vars))
        elif dm_vars is not None and int(dm_vars) != self.net.num_vars:
            raise ValueError(f"num_vars={self.net.num_vars} but the datamodule has {dm_vars} variables: "
                             "leave num_vars unset to take it from the datamodule")

    def forward(self, x: Tensor) -> Tensor:
        """log p(x), ``[B]``."""
        return self.net.log_prob(x)

    def on_fit_start(self) -> None:
        if bool(self.em_done):
            return
        datamodule: VariableDataModule | None = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("`em_init_steps` > 0 or a learnt order needs a LightningDataModule (trainer.fit(model, "
                             "datamodule=...)); set em_init_steps=0 and a fixed order to train from the random cores")
        x = torch.cat([_states(batch) for batch in datamodule.train_dataloader()]).to(self.device)
        if self.learnt_order:  # from the training split only
            self.net.set_order(resolve_order(self.order_spec, self.net.num_vars, x.cpu()))
        if self.em_tol is not None and self.em_init_steps > 0:
            val = torch.cat([_states(batch) for batch in datamodule.val_dataloader()]).to(self.device)
            steps, ll = self.net.fit_em(x, val, self.em_tol, self.em_patience, self.em_init_steps)
            self.print(f"TSPN: EM converged after {steps} steps, validation log-likelihood {ll:.3f}")
        else:
            steps = self.em_init_steps
            for _ in range(steps):
                self.net.em_step(x)
        self.em_steps_taken.fill_(steps)
        self.em_done.fill_(True)

    def on_train_epoch_end(self) -> None:
        self.log("em/steps", self.em_steps_taken.float())

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
