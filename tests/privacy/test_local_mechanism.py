"""Local DP as a DPSGD mechanism (RRSC, PrivUnitG, SQKR randomizing each participant's clipped update): unbiased
(Monte Carlo against the clipped sum), epsilon = k epsilon_0 with k the epochs touched (closed form), the budget stop
at an epoch boundary, client-level federated rounds, and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.optimizers import DPOptimizer

from plpriv.callbacks import DPSGD
from plpriv.privacy.local_mechanism import LocalRandomizerMechanism, PerEpochLocalAccountant
from plpriv.privacy.participation import Participation
from plpriv.utils import seeding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "callbacks"))
from test_dp_ftrl import FixedData, make_trainer  # noqa: E402

sys.path.pop(0)


class FakeEngine:
    """What the randomizer reads of the engine: the public step count and derived seeds."""

    def __init__(self) -> None:
        self.steps, self.expected_batch_size = 0, 3.0

    def derive_seed(self, *parts: Any) -> int:
        return seeding.derive_seed(11, *parts)


@pytest.mark.parametrize("randomizer,bits", [("rrsc", 3), ("privunitg", 8), ("sqkr", 3)])
def test_randomized_sum_is_unbiased(randomizer: str, bits: int) -> None:
    """Three clipped rows (norms 1, 1, 0.5 at C = 2): the mean over 3000 steps of the randomized sum is the sum,
    within 5 standard errors of the Monte Carlo mean (the per-step spread measured from the same draws)."""
    p = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=2.0, expected_batch_size=3)
    engine, mech = FakeEngine(), LocalRandomizerMechanism(randomizer, epsilon=2.0, bits=bits)
    sparsifier = mech.bind_participants(opt, engine, "examples", 0, 1, False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor([[2.0], [2.0], [1.0]], dtype=torch.float64)
    draws = []
    for t in range(3000):
        engine.steps = t
        draws.append(sparsifier.local(x, [0, 1, 2]).sum(0))
    draws = torch.stack(draws)
    err = (draws.mean(0) - x.sum(0)).abs()
    se = draws.std(0) / len(draws) ** 0.5
    assert bool((err < 5 * se).all()), (err / se).max()
    assert float(draws.std(0).mean()) > 0.5  # it is randomized


def test_accountant_counts_epochs() -> None:
    acc = PerEpochLocalAccountant(1.5, steps_per_epoch=4)
    assert acc.get_epsilon() == 0.0
    for t, want in [(1, 1.5), (4, 1.5), (5, 3.0), (8, 3.0), (9, 4.5)]:
        while len(acc) < t:
            acc.step(noise_multiplier=0.0, sample_rate=0.25)
        assert acc.get_epsilon(1e-5) == want


def test_clients_rounds_and_budget_stop(tmp_path: Path) -> None:
    """FederatedDigits, 12 clients, 4 per round (3 rounds an epoch), RRSC at epsilon_0 = 2 per message: a budget of 4
    stops after 2 of the 3 planned epochs (6 steps), with epsilon exactly 2 x 2."""
    from plpriv.data import FederatedDigits
    from plpriv.modules import ImageClassifier

    mech = LocalRandomizerMechanism("rrsc", epsilon=2.0, bits=4)
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=0.0, target_epsilon=4.0, target_delta=1e-3,
               poisson_sampling=False, adjacency="zero_out", mechanism=mech, participants="clients", seed=0)
    data = FederatedDigits(num_clients=12, clients_per_round=4, image_size=8, shuffle=False)
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group",
                            backbone_kwargs={"act": "tanh", "width": 4})
    make_trainer(tmp_path, [dp], max_epochs=3, limit_val_batches=0, num_sanity_val_steps=0).fit(model, data)
    assert dp.steps == 6 and dp.get_epsilon() == 4.0
    record = dp.engine.record()
    assert record["trust_model"] == "local" and dp.state_dict()["participants"] == "clients"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=0.0, target_delta=1e-3, dataset_size=10,
              mechanism=LocalRandomizerMechanism())
    with pytest.raises(ValueError, match="zero_out"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=0.0, target_delta=1e-3, dataset_size=10, poisson_sampling=False,
              mechanism=LocalRandomizerMechanism())
    with pytest.raises(ValueError, match="randomizer"):
        LocalRandomizerMechanism("gaussian")
    mech = LocalRandomizerMechanism("privunitg", epsilon=1.0)
    mech.plan(12, 4, Participation("fixed-order", 4, 12))
    with pytest.raises(ValueError, match="noise_multiplier=0.0"):
        mech.calibrate(3.0, 1e-5, 0.25, 12)
    from _dp_toy import ToyClassifier

    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-3, poisson_sampling=False,
               adjacency="zero_out", mechanism=LocalRandomizerMechanism("privunitg"), seed=0)
    with pytest.raises(ValueError, match="no central noise"):
        make_trainer(tmp_path, [dp], max_epochs=1).fit(ToyClassifier(), FixedData(n=24, batch_size=6))


def test_recipe_trains_and_accounts(tmp_path: Path) -> None:
    from plpriv.cli import PlprivCLI

    root = Path(__file__).resolve().parents[2]
    cli = PlprivCLI(
        args=["-c", str(root / "recipes/streaming/digits_clients_rrsc.yaml"), "--trainer.max_epochs=1",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
              "--trainer.num_sanity_val_steps=0", "--data.init_args.num_clients=30",
              "--data.init_args.clients_per_round=10"],
        run=False,
    )
    (dp,) = [c for c in cli.trainer.callbacks if isinstance(c, DPSGD)]
    assert isinstance(dp.mechanism, LocalRandomizerMechanism) and dp.mechanism.randomizer == "rrsc"
    cli.trainer.fit(cli.model, cli.datamodule)
    assert dp.steps == 3 and dp.get_epsilon() == 2.0
