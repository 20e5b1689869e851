"""The nine privacy holes of the DP-SGD review, each on a user-written module (never plpriv's), each against an
independent fact: the bytes of the checkpoint file, google dp-accounting's PLD for the mechanism actually run, the
indices a user's sampler can yield, the noise scale sigma C / B."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from _dp_toy import ToyClassifier, ToyData, ZeroGradModel, toy_tensors
from dp_accounting import pld
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from plpriv.callbacks import DPSGD
from plpriv.utils.seeding import derive_seed, fresh_seed


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                    log_every_n_steps=1000)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _pld(*parts: tuple[float, float, int], delta: float = 1e-5) -> float:
    """Epsilon of consecutive runs of (q, sigma, steps) Poisson-subsampled Gaussian steps, by dp-accounting."""
    accountant = pld.PLDAccountant()
    for q, sigma, steps in parts:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


# --------------------------------------------------------------------------- 1. the checkpoint holds no secret
def _record_fresh_seeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the OS-entropy draw of DPSGD's secret seed (the test's only way to know it)."""
    import plpriv.utils.seeding as seeding

    drawn: list[int] = []

    def spy() -> int:
        drawn.append(fresh_seed())
        return drawn[-1]

    monkeypatch.setattr(seeding, "fresh_seed", spy)
    return drawn


def _assert_no_file_holds(folder: Path, seed: int) -> None:
    """No file under ``folder`` (checkpoints, logs, plots, anything) holds the seed or a seed derived from it."""
    derived = [seed, derive_seed(seed, "sample")] + [derive_seed(seed, "noise", t) for t in range(10)]
    encodings = [enc for v in derived for enc in (str(v).encode(), v.to_bytes(16, "little"),
                                                  (v % 2**64).to_bytes(8, "little"))]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if "secret" in p.name]
    for path in files:
        data = path.read_bytes()
        assert not any(enc in data for enc in encodings), path


def test_no_artefact_holds_the_secret_and_resume_draws_fresh_noise(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's attack: copy the run folder, replay with the seed. The default keeps the seed nowhere; a resumed
    run draws fresh entropy and ends with the uninterrupted run's history and epsilon (not its weights)."""
    drawn = _record_fresh_seeds(monkeypatch)

    def run(max_steps: int, ckpt: str | None, **kwargs: Any) -> tuple[ToyClassifier, DPSGD]:
        model, dp = ToyClassifier(), DPSGD(dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0,
                                           target_epsilon=50.0, target_delta=1e-5, accountant="rdp", **kwargs)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=4)
        logger = CSVLogger(tmp_path, name="logs")
        trainer = _trainer(tmp_path, [dp, saver], max_steps=max_steps, enable_checkpointing=True, logger=logger,
                           log_every_n_steps=1)
        trainer.fit(model, ToyData(n=48, batch_size=8), ckpt_path=ckpt)
        return model, dp

    full, dp_full = run(8, None)
    _assert_no_file_holds(tmp_path, drawn[0])
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    assert [v for v in state["callbacks"]["DPSGD"].values() if isinstance(v, torch.Tensor)] == []  # no generator
    assert state["plpriv_privacy"]["trained_privately"] and state["plpriv_privacy"]["steps"] == 4
    assert state["plpriv_privacy"]["adjacency"] == "add_remove"

    fresh, dp_fresh = run(8, str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert len(drawn) == 2 and drawn[0] != drawn[1]  # fresh entropy on resume
    assert dp_fresh.history == dp_full.history and dp_fresh.get_epsilon() == dp_full.get_epsilon()
    assert not all(torch.equal(a, b) for a, b in zip(full.parameters(), fresh.parameters()))  # fresh noise
    for inside in (tmp_path / "ckpt", tmp_path / "logs", tmp_path):
        with pytest.raises(ValueError, match="inside the run's artefact folder"):
            run(8, None, secret_dir=str(inside / "secrets"))


# --------------------------------------------------------------------------- 2. the rate follows reloads
class _GrowingBatches(LightningDataModule):
    """Batch size 8 in epoch 0, 16 afterwards (``reload_dataloaders_every_n_epochs=1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.dataset = TensorDataset(*toy_tensors(48))

    def train_dataloader(self) -> DataLoader:
        self.calls += 1
        return DataLoader(self.dataset, batch_size=8 if self.calls == 1 else 16, shuffle=True)


def test_reloaded_loader_with_another_batch_size_is_accounted_per_step(tmp_path: Path) -> None:
    divisors: list[float] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            divisors.append(trainer.optimizers[0].expected_batch_size)

    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    _trainer(tmp_path, [dp, Spy()], max_epochs=2, reload_dataloaders_every_n_epochs=1).fit(
        ToyClassifier(), _GrowingBatches())
    assert dp.history == [(1.0, 8 / 48, 6), (1.0, 16 / 48, 3)]
    assert divisors == [8.0] * 6 + [16.0] * 3
    assert dp.get_epsilon() == pytest.approx(_pld((8 / 48, 1.0, 6), (16 / 48, 1.0, 3)), rel=0.02)


# --------------------------------------------------------------------------- 3. one private step per batch
class _TwoSteps(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        for _ in range(2):  # two Gaussian releases of the same Poisson sample
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()


def test_second_private_step_on_one_batch_is_refused(tmp_path: Path) -> None:
    model = _TwoSteps()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    with pytest.raises(ValueError, match="stepped twice on one batch"):
        _trainer(tmp_path, [dp], max_steps=4).fit(model, ToyData())
    assert dp.steps == 1  # the first release was accounted, the second never happened
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------- 4. a second batch through private layers
class _PublicBatchToo(ToyClassifier):
    def __init__(self, no_grad: bool) -> None:
        super().__init__()
        self.public = torch.randn(5, 5)
        self.no_grad = no_grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        if self.no_grad:
            with torch.no_grad():
                penalty = self(self.public).square().mean()  # a public metric, outside the private step
            return loss + 0.0 * penalty
        return loss + 0.1 * self(self.public).square().mean()  # mixes rows in opacus' per-sample gradients


def test_forward_pass_on_another_batch_size_is_refused(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    with pytest.raises(ValueError, match=r"`net\.0` ran a forward pass on a batch of \[5\] rows"):
        _trainer(tmp_path, [dp], max_steps=3).fit(_PublicBatchToo(no_grad=False), ToyData(n=48, batch_size=12))
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, [dp], max_steps=3).fit(_PublicBatchToo(no_grad=True), ToyData(n=48, batch_size=12))
    assert dp.steps == 3


# --------------------------------------------------------------------------- 5. the divisor is public
@pytest.mark.parametrize("n", [48, 49])
def test_noise_scale_is_sigma_c_over_the_batch_size_whatever_n(tmp_path: Path, n: int) -> None:
    """opacus' q = 1/len(loader) gives divisors 48/6 = 8 and 49/7 = 7: a neighbour changes the update scale."""
    sigma, clip, batch = 2.0, 0.5, 8
    model = ZeroGradModel()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(dataset_size=n, max_grad_norm=clip, noise_multiplier=sigma, seed=3, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData(n=n, batch_size=batch))
    delta = torch.cat([(p0 - p1).detach().flatten() for p0, p1 in zip(before, model.parameters())]).double()
    z = delta / (math.sqrt(2) * sigma * clip / batch)  # two noise-only steps, lr 1
    assert abs(float(z.std()) - 1) < 0.06  # 8 vs 7 would be a ratio of 1.14
    assert dp.sample_rate == pytest.approx(batch / n) and dp.expected_batch_size == batch


# --------------------------------------------------------------------------- 6. the budget holds when the rate changes
def test_budget_stop_holds_when_an_accumulation_scheduler_changes_the_rate(tmp_path: Path) -> None:
    sigma, q = 1.0, 1 / 6
    low, high = _pld((q, sigma, 6), (3 * q, sigma, 1)), _pld((q, sigma, 6), (3 * q, sigma, 2))
    target = (low + high) / 2  # one step at the accumulated rate fits, two do not
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=sigma, target_epsilon=target, target_delta=1e-5,
               poisson_sampling=False, seed=0)
    trainer = _trainer(tmp_path, [dp, GradientAccumulationScheduler({0: 1, 1: 3})], max_epochs=6)
    with pytest.warns(UserWarning, match="stopping after step 7"):
        trainer.fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    assert dp.history == [(sigma, q, 6), (sigma, 3 * q, 1)]
    assert dp.get_epsilon() <= target
    # with Poisson sampling, accumulation is no Poisson sample: refused before training
    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        _trainer(tmp_path, [DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0),
                            GradientAccumulationScheduler({0: 1, 1: 3})], max_epochs=2).fit(ToyClassifier(), ToyData())


# --------------------------------------------------------------------------- 7. the user's sampler is respected
class _IndexData(LightningDataModule):
    def __init__(self, sampler: str) -> None:
        super().__init__()
        self.sampler = sampler
        self.x = torch.arange(60).float()[:, None].repeat(1, 5)  # feature 0 is the index
        self.y = torch.zeros(60, dtype=torch.long)

    def train_dataloader(self) -> DataLoader:
        if self.sampler == "subset":
            sampler = SubsetRandomSampler(list(range(0, 60, 2)))  # odd indices are a held-out split
        else:
            sampler = WeightedRandomSampler([1.0] * 60, 60)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=6, sampler=sampler)


def test_poisson_batches_only_draw_what_the_users_sampler_can_yield(tmp_path: Path) -> None:
    seen: set[int] = set()

    class Spy(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
            seen.update(int(v) for v in batch[0][:, 0])

    dp = DPSGD(dataset_size=30, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, [dp, Spy()], max_epochs=3).fit(ToyClassifier(lr=0.0), _IndexData("subset"))
    assert seen and all(i % 2 == 0 for i in seen) and dp.sample_rate == pytest.approx(6 / 30)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        _trainer(tmp_path, [dp], max_epochs=1).fit(ToyClassifier(), _IndexData("weighted"))


# --------------------------------------------------------------------------- 8. no silently frozen parameter
class _FunctionalLinear(ToyClassifier):
    def __init__(self, per_sample: bool = False) -> None:
        super().__init__(per_sample=per_sample)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.head.weight, self.head.bias)  # bypasses head's forward hook


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_parameter_with_gradient_but_no_per_sample_gradient_is_refused(tmp_path: Path, mode: str) -> None:
    model = _FunctionalLinear(per_sample=mode == "ghost")
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5,
               grad_sample_mode=mode)
    with pytest.raises(ValueError, match=r"`head\.weight`, `head\.bias` got a gradient but no per-sample gradient"):
        _trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData())


# --------------------------------------------------------------------------- 9. epsilon prefetch is bounded
def test_epsilon_prefetch_never_looks_past_the_planned_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import plpriv.privacy.mechanisms as mechanisms

    asked: list[int] = []
    real = mechanisms.epsilon

    def spy(history: Any, delta: float, mechanism: str = "prv") -> float:
        asked.append(sum(k for _, _, k in history))
        return real(history, delta, mechanism)

    monkeypatch.setattr(mechanisms, "epsilon", spy)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, target_delta=1e-5)
    _trainer(tmp_path, [dp], max_steps=1, log_every_n_steps=10**6).fit(ToyClassifier(), ToyData())
    dp.get_epsilon()
    assert asked and max(asked) <= 1


# --------------------------------------------------------------------------- resuming with another mechanism
def test_resume_with_another_noise_multiplier_is_refused_unless_allowed(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    trainer = _trainer(tmp_path, [dp], max_steps=3)
    trainer.fit(ToyClassifier(), ToyData())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    for kwargs, match in (({"noise_multiplier": 2.0}, "noise_multiplier 1.0 -> 2.0"),
                          ({"noise_multiplier": 1.0, "max_grad_norm": 0.5}, "max_grad_norm 1.0 -> 0.5"),
                          ({"noise_multiplier": 1.0, "accountant": "prv"}, "accountant 'rdp' -> 'prv'")):
        again = DPSGD(**{"max_grad_norm": 1.0, "seed": 0, "accountant": "rdp", "target_delta": 1e-5,
                         "dataset_size": 48, **kwargs})
        with pytest.raises(ValueError, match=match):
            _trainer(tmp_path, [again], max_steps=5).fit(ToyClassifier(), ToyData(), ckpt_path=tmp_path / "a.ckpt")
    knowing = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=2.0, seed=0, accountant="rdp", target_delta=1e-5,
                    allow_mechanism_change=True)
    _trainer(tmp_path, [knowing], max_steps=5).fit(ToyClassifier(), ToyData(), ckpt_path=tmp_path / "a.ckpt")
    assert knowing.history == [(1.0, 1 / 6, 3), (2.0, 1 / 6, 2)]
    assert knowing.get_epsilon() == pytest.approx(_pld((1 / 6, 1.0, 3), (1 / 6, 2.0, 2)), rel=0.25)  # RDP >= PLD
    assert knowing.get_epsilon() >= _pld((1 / 6, 1.0, 3), (1 / 6, 2.0, 2))


def test_budget_stop_checkpoint_holds_no_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _record_fresh_seeds(monkeypatch)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.2, target_epsilon=_pld((1 / 6, 1.2, 3)) * 1.05,
               target_delta=1e-5, secret_dir=str(tmp_path.parent / f"{tmp_path.name}-secrets"))
    with pytest.warns(UserWarning, match="stopping after step 3"):
        _trainer(tmp_path, [dp], max_steps=30).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    (seed,) = drawn
    _assert_no_file_holds(tmp_path, seed)
    assert Path(dp.budget_checkpoint_path).is_file()
    assert not list((tmp_path.parent / f"{tmp_path.name}-secrets").iterdir())  # deleted when training ended


def test_subclass_accessors_derive_seeds_but_never_expose_the_secret(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _record_fresh_seeds(monkeypatch)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, accountant="rdp")
    with pytest.raises(RuntimeError, match="no secret seed"):
        dp.derive_seed("mask", 0)
    seen: dict[str, Any] = {}

    class Subclass(Callback):  # what a subclass does in on_train_start
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            seen.update(optimizer=dp.dp_optimizer, n=len(dp.train_loader.dataset), derived=dp.derive_seed("mask", 3, 7))
            dp.add_teardown(lambda: seen.update(undone=dp.dp_optimizer is not None))

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    _trainer(tmp_path, [dp, Subclass(), saver], max_steps=2, enable_checkpointing=True).fit(
        ToyClassifier(), ToyData(n=48, batch_size=8))
    (seed,) = drawn  # the secret: drawn once, kept nowhere
    _assert_no_file_holds(tmp_path, seed)
    assert seen["derived"] == derive_seed(seed, "mask", 3, 7)
    assert isinstance(seen["optimizer"], DPOptimizer) and seen["n"] == 48
    assert seen["undone"] and dp.dp_optimizer is None  # called at teardown, before the optimizer is dropped
    public = {k: v for k, v in vars(dp).items() if not k.startswith("_")}
    assert str(seed) not in repr(public) and str(seed) not in repr(dp.state_dict())


def test_resuming_a_non_private_checkpoint_under_dpsgd_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [], max_steps=3)
    trainer.fit(ToyClassifier(), ToyData())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    with pytest.raises(ValueError, match="trained for 3 steps without DPSGD"):
        _trainer(tmp_path, [dp], max_steps=5).fit(ToyClassifier(), ToyData(), ckpt_path=tmp_path / "plain.ckpt")
