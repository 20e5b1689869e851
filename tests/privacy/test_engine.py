"""The Lightning-free DP engine and its mechanisms: a plain torch loop drives it, mechanisms' accountants are opacus
IAccountants, and DPSGD(mechanism=SparsifiedMechanism) is the sparsified callback step for step."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from _dp_toy import ToyClassifier, ToyData, toy_tensors
from dp_accounting import pld
from lightning.pytorch import Trainer
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD, SparsifiedGaussian
from plpriv.privacy import DPEngine, EpsilonLedger, GaussianMechanism, SparsifiedMechanism, World

pytestmark = pytest.mark.filterwarnings("ignore:DPSGD\\(seed=:UserWarning")


def test_engine_drives_a_plain_torch_loop() -> None:
    """No Lightning: the engine's loader, hooks and optimizer train a model; epsilon is the Poisson-subsampled
    Gaussian's (google dp-accounting's PLD as the independent reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    loader = DataLoader(TensorDataset(*toy_tensors(48)), batch_size=8, shuffle=True)
    engine = DPEngine(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, seed=0)
    world = World()
    poisson = engine.poisson_loader(loader, world)
    engine.resolve_seed(world, resuming=False, secret_dir=None)
    engine.attach([("", model)])
    engine.set_rate(None, world_size=1, accumulate=1)
    optimizer = engine.start(torch.optim.SGD(model.parameters(), lr=0.5), DPOptimizer, planned_steps=len(poisson),
                             world=world, on_step=engine.record_step)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in poisson:
        engine.hooks.batch_size = len(y)
        F.cross_entropy(model(x), y).backward()
        engine.hooks.fill_missing_grad_samples(optimizer.params)
        optimizer.step()
        optimizer.zero_grad()
    engine.close()
    assert engine.steps == len(poisson) == 6 and engine.sample_rate == pytest.approx(8 / 48)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(8 / 48, dp_accounting.GaussianDpEvent(1.0)), 6))
    assert engine.get_epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=0.03)
    record = engine.record()
    assert record["adjacency"] == "add_remove" and record["steps"] == 6 and "num_samples" not in record


@pytest.mark.parametrize("mechanism", [GaussianMechanism(), SparsifiedMechanism(0.2), SparsifiedMechanism(0.2,
                                                                                                          "k_subset")])
def test_mechanism_accountants_are_opacus_iaccountants(mechanism) -> None:
    accountant = mechanism.accountant("rdp")
    assert isinstance(accountant, IAccountant)
    for _ in range(5):
        accountant.step(noise_multiplier=1.2, sample_rate=0.1)
    ledger = EpsilonLedger("rdp", mechanism=mechanism)
    ledger.record(1.2, 0.1, 5)
    assert accountant.history == ledger.history
    assert accountant.get_epsilon(delta=1e-5) == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
    assert ledger.title == mechanism.title and mechanism.name in str(mechanism.record())


def test_dpsgd_with_the_sparsified_mechanism_is_the_sparsified_callback(tmp_path: Path) -> None:
    """One engine, two spellings: same masks, same noise, same weights, same epsilon."""
    runs = {}
    for name, make in (
        ("mechanism", lambda: DPSGD(max_grad_norm=0.5, noise_multiplier=1.0, seed=7, target_delta=1e-5,
                                    dataset_size=48, mechanism=SparsifiedMechanism(0.3))),
        ("callback", lambda: SparsifiedGaussian(0.3, max_grad_norm=0.5, noise_multiplier=1.0, seed=7,
                                                target_delta=1e-5, dataset_size=48)),
    ):
        model, cb = ToyClassifier(), make()
        Trainer(accelerator="cpu", max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(
            model, ToyData(n=48, batch_size=8))
        runs[name] = (model, cb)
    (a, dp_a), (b, dp_b) = runs["mechanism"], runs["callback"]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert dp_a.get_epsilon() == dp_b.get_epsilon() and dp_a.history == dp_b.history
    dense = pld.PLDAccountant()  # DP-SGD's epsilon for the same steps (dp-accounting): the masks amplify
    dense.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(8 / 48, dp_accounting.GaussianDpEvent(1.0)), 4))
    assert dp_a.get_epsilon() < dense.get_epsilon(1e-5)


def test_mechanism_must_be_a_mechanism_that_fits_the_gradient_mode() -> None:
    with pytest.raises(TypeError, match="Mechanism"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, mechanism="gaussian")
    with pytest.raises(ValueError, match="SparsifiedMechanism needs per-sample gradients"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, dataset_size=48, grad_sample_mode="ghost",
              mechanism=SparsifiedMechanism(0.5))
