"""The privacy boundary (issue 20), each hole as the attack that showed it, on user-written modules: the dataset size
N under add/remove adjacency, training-step logs, a second fit past the budget, batch-coupled layers and losses, a
sampler subclass. Independent facts: artefact bytes and CSV rows of neighbouring data sets, a numerically integrated
privacy profile, google dp-accounting's PLD, the sampler's support."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dp_toy import ToyClassifier, ToyData, toy_tensors
from dp_accounting import pld
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from scipy import integrate, stats
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.privacy.adjacency import public_rate, replace_one_epsilon
from plpriv.privacy.ledger import EpsilonLedger

pytestmark = pytest.mark.filterwarnings("ignore:DPSGD\\(seed=:UserWarning")


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                    log_every_n_steps=1)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _pld(q: float, sigma: float, steps: int, delta: float = 1e-5) -> float:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# --------------------------------------------------------------------------- 1. N is never published
def _published(tmp_path: Path, n: int) -> tuple[dict, list[dict], int]:
    """Everything a run over n examples publishes: the checkpoint's privacy record and DPSGD state, the metrics."""
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, accountant="rdp", seed=0)
    logger = CSVLogger(tmp_path, name=f"n{n}", version="")
    saver = ModelCheckpoint(dirpath=tmp_path / f"n{n}" / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [dp, saver], max_epochs=2, logger=logger, enable_checkpointing=True)
    trainer.fit(ToyClassifier(), ToyData(n=n, batch_size=8))
    ckpt = torch.load(tmp_path / f"n{n}" / "ckpt" / "last.ckpt", weights_only=False)
    with open(tmp_path / f"n{n}" / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if k.startswith("dp/") or k == "step"} for r in csv.DictReader(f)]
    public = {"record": ckpt["plpriv_privacy"], "state": {k: v for k, v in ckpt["callbacks"]["DPSGD"].items()
                                                          if k not in ("run_id", "loader")}}
    return public, rows, trainer.global_step


def test_add_remove_publishes_nothing_that_depends_on_n(tmp_path: Path) -> None:
    """The review's attack read q = B/N from the record (members vs non-members 6/6). Neighbours N = 48 and 49 now
    publish identical records, states, step counts and dp/* rows."""
    a, rows_a, steps_a = _published(tmp_path, 48)
    b, rows_b, steps_b = _published(tmp_path, 49)
    assert a == b and rows_a == rows_b and steps_a == steps_b == 2 * 6  # ceil(1/q) = 6 steps an epoch, N or N+1
    assert a["record"]["adjacency"] == "add_remove" and a["record"]["sample_rate"] == pytest.approx(8 / 48)


def test_add_remove_needs_a_public_rate_and_delta() -> None:
    with pytest.raises(ValueError, match="data set size N is private"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="default delta 1/N\\^1.1 would publish"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1)
    assert DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, target_delta=1e-5).adjacency == "add_remove"
    assert public_rate(8, 49, "add_remove", sample_rate=0.125) == public_rate(8, 48, "add_remove", sample_rate=0.125)
    assert public_rate(8, 49, "replace_one").sample_rate == pytest.approx(8 / 49)  # N declared public


def _replace_one_profile(q: float, sigma: float, eps: float) -> float:
    """delta(eps) of one Poisson-subsampled Gaussian step under replace-one, by numerical integration of the
    hockey-stick divergence of its worst pair (x = C, x' = -C on a line; C = 1): P = (1-q) N(0,s) + q N(1,s) vs
    Q = (1-q) N(0,s) + q N(-1,s), both directions (symmetric)."""
    def p(t: float) -> float:
        return (1 - q) * stats.norm.pdf(t, 0, sigma) + q * stats.norm.pdf(t, 1, sigma)

    def qq(t: float) -> float:
        return (1 - q) * stats.norm.pdf(t, 0, sigma) + q * stats.norm.pdf(t, -1, sigma)

    value, _ = integrate.quad(lambda t: max(p(t) - math.exp(eps) * qq(t), 0.0), -12 * sigma, 12 * sigma + 1,
                              limit=400, points=[0.0, 1.0])
    return value


@pytest.mark.parametrize(("q", "sigma"), [(0.2, 1.0), (0.05, 0.8)])
def test_replace_one_epsilon_covers_the_exact_one_step_profile(q: float, sigma: float) -> None:
    """The reported replace-one epsilon is an upper bound: the exact one-step delta at that epsilon (numerical
    integration, an independent computation) is within the target; and it is at least the add/remove one."""
    delta = 1e-5
    ledger = EpsilonLedger("prv", adjacency="replace_one")
    ledger.record(sigma, q)
    eps = ledger.epsilon(delta)
    assert _replace_one_profile(q, sigma, eps) <= delta
    assert eps >= _pld(q, sigma, 1, delta)  # and at least the add/remove one (dp-accounting's PLD)
    # and it is not vacuous: at half of it the exact profile already exceeds delta for these settings
    assert _replace_one_profile(q, sigma, eps / 4) > delta


def test_replace_one_is_at_least_twice_add_remove_on_a_recipe_like_run() -> None:
    """classifier/digits_dp's scale: the review's lower bound said replace-one >= 6.29 where add/remove is 3.0. Group
    privacy gives at least twice the add/remove epsilon (loose at large epsilon: delta shrinks by 1 + e^eps)."""
    q, sigma, steps, delta = 256 / 1437, 1.6, 30, 1e-5
    add_remove = _pld(q, sigma, steps, delta)
    ledger = EpsilonLedger("prv", adjacency="replace_one")
    ledger.record(sigma, q, steps)
    replace = ledger.epsilon(delta)
    assert replace >= 2 * add_remove * 0.98
    assert replace_one_epsilon(lambda d: _pld(q, sigma, steps, d), delta) == pytest.approx(replace, rel=0.05)


def test_replace_one_run_says_so_and_reports_it(tmp_path: Path) -> None:
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, adjacency="replace_one", seed=0)
    _trainer(tmp_path, [dp], max_steps=6).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    assert dp.sample_rate == pytest.approx(8 / 48)
    # group privacy spends delta / (1 + e^eps) <= delta / 2 per half: at least twice the add/remove eps at delta / 2
    assert dp.get_epsilon() >= 2 * _pld(8 / 48, 1.0, 6, 1e-5 / 2) * 0.98


# --------------------------------------------------------------------------- 2. training-step logs
class _LoggingClassifier(ToyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/batch": float(len(batch[1]))})
        return loss


@pytest.mark.parametrize("opt_in", [(), ("train/loss",)])
def test_training_step_metrics_are_not_published_unless_named(tmp_path: Path, opt_in: tuple[str, ...]) -> None:
    """The review's attack read membership 20/20 from train/loss in metrics.csv. Dropped with one warning; a name
    in log_training_metrics is published and the run says it is not covered by epsilon."""
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0,
               log_training_metrics=opt_in)
    logger = CSVLogger(tmp_path, name="run", version="")
    with pytest.warns(UserWarning) as record:
        _trainer(tmp_path, [dp], max_steps=4, logger=logger).fit(_LoggingClassifier(), ToyData())
    messages = [str(w.message) for w in record]
    with open(tmp_path / "run" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/batch" not in header and "dp/epsilon" in header
    assert ("train/loss" in header) == bool(opt_in)
    assert sum("dropped" in m and "train/batch" in m for m in messages) == 1  # said once
    assert any("NOT covered by epsilon" in m for m in messages) == bool(opt_in)


# --------------------------------------------------------------------------- 8. a second fit is guarded too
def test_second_fit_with_the_same_callback_stops_at_the_budget(tmp_path: Path) -> None:
    """The review: target 2.0, a second fit whose plan had no more steps than already taken ended at 2.78."""
    sigma, q = 1.0, 8 / 48
    target = (_pld(q, sigma, 6) + _pld(q, sigma, 7)) / 2  # the budget fits 6 steps, not 7
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=sigma, target_epsilon=target, target_delta=1e-5, dataset_size=48,
               seed=0)
    _trainer(tmp_path, [dp], max_steps=4).fit(ToyClassifier(), ToyData())
    assert dp.steps == 4
    with pytest.warns(UserWarning, match="stopping after step 6"):
        _trainer(tmp_path, [dp], max_steps=4).fit(ToyClassifier(), ToyData())
    assert dp.steps == 6 and dp.get_epsilon() <= target
    with pytest.raises(RuntimeError, match="budget .* is spent"):
        _trainer(tmp_path, [dp], max_steps=4).fit(ToyClassifier(), ToyData())


# --------------------------------------------------------------------------- 9. examples must be independent
class _Centred(ToyClassifier):
    """A batch-centring layer: each example's activation minus the batch mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0](x)
        return self.net[2](torch.tanh(h - h.mean(0, keepdim=True)))


class _InBatchNegatives(ToyClassifier):
    """A contrastive loss whose negatives are the other examples of the batch."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        z = F.normalize(self(batch[0]), dim=1)
        logits = z @ z.T / 0.5
        return F.cross_entropy(logits, torch.arange(len(z)))


class _Dropout(ToyClassifier):
    """Independent examples with dropout (randomness from the global RNG): must pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(self.net[0], nn.Dropout(0.3), nn.Tanh(), self.net[2])


@pytest.mark.parametrize("module", [_Centred, _InBatchNegatives])
def test_batch_coupled_layers_and_losses_are_refused_at_the_first_step(tmp_path: Path, module: type) -> None:
    model = module()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    with pytest.raises(ValueError, match=f"`{module.__name__}.training_step` couples the examples"):
        _trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData())
    assert dp.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_coupling_is_a_measured_fact(tmp_path: Path) -> None:
    """Independent check of what the probe refuses: with the centring layer, the clipped sum over a batch moves by
    more than C when one example is replaced (a micro-batch loop, no opacus); without it, by at most C."""
    x, y = toy_tensors(4)
    other = x.clone()
    other[-1] = x[0] * 10

    def clipped_sum(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(len(inputs)):  # per-example gradient of example i's loss, computed on the whole batch
            model.zero_grad()
            F.cross_entropy(model(inputs)[i:i + 1], y[i:i + 1]).backward()
            g = torch.cat([p.grad.flatten() for p in model.parameters()])
            rows.append(g * min(1.0, 1.0 / float(g.norm())))
        return torch.stack(rows)[:-1].sum(0)  # the examples both batches share

    for module, coupled in ((_Centred, True), (ToyClassifier, False)):
        model = module()
        moved = float((clipped_sum(model, x) - clipped_sum(model, other)).norm())
        assert (moved > 1.0) == coupled, (module.__name__, moved)


def test_independent_module_with_dropout_passes_the_probe(tmp_path: Path) -> None:
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    _trainer(tmp_path, [dp], max_steps=2).fit(_Dropout(), ToyData())
    assert dp.steps == 2


# --------------------------------------------------------------------------- 10. sampler subclasses
class _EvenOnly(RandomSampler):
    """Restricts training to even indices (a user's held-out split): a RandomSampler only by inheritance."""

    def __iter__(self):  # type: ignore[override]
        yield from (i for i in super().__iter__() if i % 2 == 0)


class _DeclaredAll(RandomSampler):
    poisson_support = "all"


@pytest.mark.parametrize(("sampler", "refused"), [(_EvenOnly, True), (_DeclaredAll, False)])
def test_sampler_subclasses_are_refused_unless_they_declare_the_whole_set(tmp_path: Path, sampler: type,
                                                                          refused: bool) -> None:
    """The review: 27 of 32 held-out records were trained on through a RandomSampler subclass."""
    dataset = TensorDataset(*toy_tensors(48))
    loader = DataLoader(dataset, batch_size=8, sampler=sampler(dataset))
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    trainer = _trainer(tmp_path, [dp], max_steps=2)
    if refused:
        with pytest.raises(ValueError, match="_EvenOnly subclasses RandomSampler"):
            trainer.fit(ToyClassifier(), train_dataloaders=loader)
        assert dp.steps == 0
    else:
        trainer.fit(ToyClassifier(), train_dataloaders=loader)
        assert dp.steps == 2
    inherited = type("Inherits", (_DeclaredAll,), {"__iter__": _EvenOnly.__iter__})
    with pytest.raises(ValueError, match="Inherits"):  # the declaration is not inherited
        _trainer(tmp_path, [DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48)],
                 max_steps=1).fit(ToyClassifier(), train_dataloaders=DataLoader(dataset, batch_size=8,
                                                                               sampler=inherited(dataset)))
    assert np.isfinite(dp.get_epsilon(1e-5))


# --------------------------------------------------------------------------- the module's public batch
class _Aware(ToyClassifier):
    """Implements the public-batch contract: records what DPSGD tells it."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[Any] = []

    def configure_private_training(self, batch: Any) -> None:
        self.told.append(batch)


@pytest.mark.parametrize(("poisson", "accumulate"), [(True, 1), (False, 2)])
def test_module_is_told_the_public_batch_per_optimizer_step(tmp_path: Path, poisson: bool, accumulate: int) -> None:
    """B per optimizer step is what opacus divides by: the loader's batch_size x accumulated batches."""
    model = _Aware()
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0,
               poisson_sampling=poisson)
    kwargs = {} if poisson else {"accumulate_grad_batches": accumulate}
    with pytest.warns(UserWarning, match="approximation") if not poisson else contextlib.nullcontext():
        _trainer(tmp_path, [dp], max_steps=2, **kwargs).fit(model, ToyData(n=48, batch_size=8))
    first, last = model.told[0], model.told[-1]
    assert first.expected_batch_size == 8 * accumulate and first.sample_rate == pytest.approx(8 * accumulate / 48)
    assert first.adjacency == "add_remove" and last is None  # told None when the fit ends
    assert dp.dp_optimizer is None and dp.steps == 2


class _EpochMetrics(ToyClassifier):
    """torchmetrics' recommended pattern: update in training_step, log the epoch value in on_train_epoch_end (and a
    batch statistic in on_train_batch_end); validation logs as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.correct, self.seen = 0, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():  # a metric pass: no per-sample activations
            self.correct += int((self(x).argmax(1) == y).sum())
        self.seen += len(y)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/batch_size", float(len(batch[1])))

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.correct / max(self.seen, 1))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def val_dataloader(self) -> DataLoader:  # held-out data (validation logs are not training statistics)
        return DataLoader(TensorDataset(*toy_tensors(16, seed=9)), batch_size=8)


@pytest.mark.parametrize("private", [True, False])
def test_statistics_logged_from_any_training_hook_are_not_published(tmp_path: Path, private: bool) -> None:
    """Epoch-level training metrics (accumulated in training_step, logged in on_train_epoch_end) and batch hooks'
    statistics are dropped under DP; validation metrics and DPSGD's own are written; without DP all are."""
    callbacks = [DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)]
    logger = CSVLogger(tmp_path, name="run", version="")
    model = _EpochMetrics()
    with pytest.warns(UserWarning, match="dropped") if private else contextlib.nullcontext():
        _trainer(tmp_path, callbacks if private else [], max_epochs=2, logger=logger).fit(
            model, DataLoader(TensorDataset(*toy_tensors(48)), batch_size=8), model.val_dataloader())
    with open(tmp_path / "run" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"train/acc", "train/batch_size"} & set(header) == (set() if private else {"train/acc", "train/batch_size"})
    assert "val/acc" in header and ("dp/epsilon" in header) == private
    assert "on_train_epoch_end" not in vars(model) and "log" not in vars(model)  # wrappers removed


class _OwnGeneratorMixup(ToyClassifier):
    """Mixup with the module's own generator and a step counter: coupled examples, randomness the model holds."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(1)
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        perm = torch.randperm(len(x), generator=self.gen)
        lam = float(torch.rand((), generator=self.gen)) * 0.5
        logits = self(x * (1 - lam) + x[perm] * lam)
        return F.cross_entropy(logits, y)


_OUTSIDE = torch.Generator().manual_seed(3)


class _OutsideRandomness(ToyClassifier):
    """Draws from a generator the model does not hold: the probe cannot replay it."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x + 0.1 * torch.randn(x.shape, generator=_OUTSIDE)), y)


def test_coupling_is_caught_when_the_model_holds_its_randomness(tmp_path: Path) -> None:
    model = _OwnGeneratorMixup()
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    with pytest.raises(ValueError, match="couples the examples"):
        _trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData())
    assert model.calls == 0  # the probe put the counter back (it ran three passes)


def test_randomness_the_probe_cannot_replay_is_refused_unless_asserted(tmp_path: Path) -> None:
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    with pytest.raises(ValueError, match="cannot verify.*assume_independent_examples"):
        _trainer(tmp_path, [dp], max_steps=2).fit(_OutsideRandomness(), ToyData())
    assert dp.steps == 0
    asserted = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0,
                     assume_independent_examples=True)
    with pytest.warns(UserWarning, match="Asserted by the user"):
        _trainer(tmp_path, [asserted], max_steps=2).fit(_OutsideRandomness(), ToyData())
    assert asserted.steps == 2
