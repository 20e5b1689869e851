"""DPSGD callback against independent facts.

Facts used:
* DP-SGD's update (Abadi et al. 2016, opacus' definition): theta' = theta - lr * (sum_i clip_C(g_i) + N(0, s^2 C^2))
  / (q N), with clip_C(g) = g * min(1, C / (||g|| + 1e-6)) and g_i the gradient of example i's loss alone
  (computed here by a micro-batch loop, one example at a time, without opacus).
* sigma = 0, C = inf and fixed batches of size B = q N reduce DP-SGD to plain SGD on the mean loss.
* Epsilon of the Poisson-subsampled Gaussian mechanism: google's dp-accounting PLD accountant.
* A resumed run must be the uninterrupted run (same batches, noise, steps, epsilon, weights).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting import pld
from _dp_toy import PROBE_CALLS, ToyClassifier, ToyData, ToyGAN, ZeroGradModel, toy_tensors
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.privacy import read_secret


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1000,
    )
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append([t.clone() for t in batch])


def pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def micro_batch_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, expected: float) -> list:
    """sum_i clip_C(grad of example i's loss) / expected batch, one example at a time (no opacus)."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / expected for t in total]


# --------------------------------------------------------------------------- per-sample gradients, clipping, noise
@pytest.mark.parametrize(
    ("mode", "norm", "clip"),
    [("hooks", "none", 0.05), ("hooks", "group", 0.05), ("hooks", "none", 1e6), ("functorch", "group", 0.05),
     ("ghost", "group", 0.05)],
)
def test_update_equals_clipped_micro_batch_loop(tmp_path: Path, mode: str, norm: str, clip: float) -> None:
    model = ToyClassifier(norm=norm, lr=1.0, per_sample=mode == "ghost").double()
    before = copy.deepcopy(model)
    recorder = BatchRecorder()
    dp = DPSGD(dataset_size=48, max_grad_norm=clip, noise_multiplier=0.0, grad_sample_mode=mode, seed=1, accountant="rdp",
               target_delta=1e-5)
    make_trainer(tmp_path, [dp, recorder], max_steps=1, precision="64-true").fit(model, ToyData(n=48, batch_size=8))
    x, y = recorder.batches[0]
    assert len(y) > 1
    expected = 48 / 6  # q N with q = 1 / len(loader) = 1/6
    update = micro_batch_update(before, x, y, clip, expected)
    for p0, p1, u in zip(before.parameters(), model.parameters(), update):
        torch.testing.assert_close(p0 - p1, u, atol=1e-6, rtol=0)
    if clip < 1:  # clipping was active: the update differs from plain SGD
        plain = micro_batch_update(before, x, y, 1e9, expected)
        assert max((a - b).abs().max() for a, b in zip(update, plain)) > 1e-3


def test_sigma_zero_huge_clip_equals_plain_sgd(tmp_path: Path) -> None:
    """Fixed batches (poisson_sampling=False, B = q N): DP-SGD with sigma=0, C=inf is Lightning's plain SGD."""
    data = TensorDataset(*toy_tensors(48))

    class FixedData(ToyData):
        def setup(self, stage: str) -> None:
            self.dataset = data

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset, batch_size=8, shuffle=False)

    plain, private = ToyClassifier(lr=0.3), ToyClassifier(lr=0.3)
    make_trainer(tmp_path, [], max_steps=9).fit(plain, FixedData())
    dp = DPSGD(dataset_size=48, max_grad_norm=1e9, noise_multiplier=0.0, poisson_sampling=False, accountant="rdp", target_delta=1e-5)
    with pytest.warns(UserWarning, match="Poisson"):
        make_trainer(tmp_path, [dp], max_steps=9).fit(private, FixedData())
    for a, b in zip(plain.parameters(), private.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert dp.steps == 9


def test_noise_has_std_sigma_c_over_expected_batch_and_survives_the_closure(tmp_path: Path) -> None:
    sigma, clip, n, batch = 2.0, 0.5, 48, 8
    model = ZeroGradModel()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(dataset_size=48, max_grad_norm=clip, noise_multiplier=sigma, seed=3, accountant="rdp", target_delta=1e-5)
    make_trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData(n=n, batch_size=batch))
    assert model.calls == 2  # the closure ran once per step (the probe puts the model's counters back)
    delta = torch.cat([(p0 - p1).detach().flatten() for p0, p1 in zip(before, model.parameters())])
    # two steps of pure noise: the sum of two independent N(0, (sigma C / (q N))^2) draws per coordinate
    z = (delta / (math.sqrt(2) * sigma * clip / (n / 6))).double().numpy()
    assert z.size > 4000
    assert abs(z.std() - 1) < 0.06  # sd of the sample sd ~ 1/sqrt(2 n) = 0.011
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3


# --------------------------------------------------------------------------- accounting
def test_reported_epsilon_equals_dp_accounting_pld(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    make_trainer(tmp_path, [dp], max_steps=7).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    assert dp.steps == 7 and dp.sample_rate == pytest.approx(1 / 6)
    reference = pld_epsilon(1 / 6, 1.0, 7, 1e-5)
    assert dp.get_epsilon() == pytest.approx(reference, rel=0.02)
    assert dp.get_epsilon(1e-3) == pytest.approx(pld_epsilon(1 / 6, 1.0, 7, 1e-3), rel=0.02)


def test_epsilon_of_a_long_history_equals_pld_reference() -> None:
    """The MNIST setting of the facts file (q = 256/60000, sigma = 1.1, 14062 steps): PLD epsilon 2.38."""
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.1, target_delta=1e-5)
    dp.load_state_dict({"accountant": {"history": [(1.1, 256 / 60000, 14062)], "mechanism": "prv"}})
    reference = pld_epsilon(256 / 60000, 1.1, 14062, 1e-5)
    assert reference == pytest.approx(2.38, abs=0.02)
    assert dp.get_epsilon() == pytest.approx(reference, rel=0.02)


def test_noise_calibrated_from_target_epsilon(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, target_epsilon=2.0, target_delta=1e-5, seed=0)
    make_trainer(tmp_path, [dp], max_steps=10).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    sigma = dp.effective_noise_multiplier
    assert dp.steps == 10
    reference = pld_epsilon(1 / 6, sigma, 10, 1e-5)
    assert 2.0 * 0.97 <= reference <= 2.0 * 1.02  # calibrated to the budget (opacus tolerance 0.01)
    assert dp.get_epsilon() <= 2.0


def test_default_delta_is_one_over_n_to_the_1_1(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp")
    make_trainer(tmp_path, [dp], max_steps=1).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    assert dp.delta == pytest.approx(48**-1.1)


# --------------------------------------------------------------------------- resume and budget
@pytest.mark.parametrize(("source", "seed"), [("datamodule", 11), ("loader", None)])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, source: str, seed: int | None) -> None:
    """Stopped at step 4 (mid-epoch: 6 batches per epoch) and resumed; with seed=None the drawn seed is restored from
    the private secret_dir outside the run folder, and deleted when training ends."""
    secrets = tmp_path.parent / f"{tmp_path.name}-secrets"  # outside every artefact folder of the run

    class Kill(Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == self.step:
                raise RuntimeError("killed")

    def run(max_steps: int, ckpt: str | None, checkpoint_every: int | None, crash_at: int | None = None,
            fixed_seed: int | None = None) -> tuple[ToyClassifier, DPSGD, Trainer]:
        model = ToyClassifier()
        dp = DPSGD(dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0, seed=fixed_seed or seed, target_delta=1e-5,
                   accountant="rdp", secret_dir=None if seed is not None else str(secrets))
        callbacks: list[Callback] = [dp] + ([Kill(crash_at)] if crash_at else [])
        if checkpoint_every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1,
                                             every_n_train_steps=checkpoint_every))
        trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(checkpoint_every))
        if source == "datamodule":
            trainer.fit(model, ToyData(n=48, batch_size=8), ckpt_path=ckpt)
        else:
            loader = DataLoader(TensorDataset(*toy_tensors(48)), batch_size=8, shuffle=True)
            trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
        return model, dp, trainer

    if seed is None:
        done, dp_done, _ = run(10, None, checkpoint_every=None)
        assert list(secrets.iterdir()) == []  # a fit that ended deletes its secret ...
        assert not any("secret" in p.name for p in tmp_path.rglob("*"))  # ... and never wrote it into the run
        with pytest.raises(RuntimeError, match="killed"):  # an interrupted run (exception) keeps it for resume
            _, dp_killed, _ = run(10, None, checkpoint_every=4, crash_at=4)
        (kept,) = secrets.iterdir()
        drawn = read_secret(secrets, kept.name.removeprefix("dpsgd-secret-").removesuffix(".json"))
        full, dp_full, _ = run(10, None, checkpoint_every=None, fixed_seed=drawn)  # the uninterrupted twin
    else:
        full, dp_full, _ = run(10, None, checkpoint_every=4)
    resumed, dp_res, trainer = run(10, str(tmp_path / "ckpt" / "step=4.ckpt"), checkpoint_every=None)
    assert trainer.global_step == 10 and dp_res.steps == dp_full.steps == 10
    assert dp_res.history == dp_full.history
    assert dp_res.get_epsilon() == dp_full.get_epsilon()
    # the same Poisson batches (the uninterrupted run also probed its first batch; the resumed one had been probed)
    assert resumed.seen_batch_sizes == full.seen_batch_sizes[PROBE_CALLS + 4:]
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # same noise: bit-identical weights


def test_budget_stop_before_exceeding_and_spent_run_refuses(tmp_path: Path) -> None:
    sigma, q, delta = 1.2, 1 / 6, 1e-5
    target = (pld_epsilon(q, sigma, 5, delta) + pld_epsilon(q, sigma, 6, delta)) / 2  # between 5 and 6 steps
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=sigma, target_epsilon=target, target_delta=delta, seed=0)
    model = ToyClassifier()
    trainer = make_trainer(tmp_path, [dp], max_steps=30)
    with pytest.warns(UserWarning, match="stopping after step 5"):
        trainer.fit(model, ToyData(n=48, batch_size=8))
    assert dp.steps == 5 and trainer.global_step == 5
    assert dp.get_epsilon() <= target
    assert Path(dp.budget_checkpoint_path).is_file()
    # resuming the spent run refuses to take another step
    again = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=sigma, target_epsilon=target, target_delta=delta, seed=0)
    with pytest.raises(RuntimeError, match="spent"):
        make_trainer(tmp_path, [again], max_steps=30).fit(
            ToyClassifier(), ToyData(n=48, batch_size=8), ckpt_path=dp.budget_checkpoint_path
        )


# --------------------------------------------------------------------------- features
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_virtual_steps_equal_the_unsplit_step(tmp_path: Path, mode: str) -> None:
    runs = {}
    for max_physical in (None, 3):
        model = ToyClassifier(lr=0.5, per_sample=mode == "ghost").double()
        dp = DPSGD(dataset_size=48, max_grad_norm=0.3, noise_multiplier=0.7, seed=5, max_physical_batch_size=max_physical,
                   accountant="rdp", target_delta=1e-5, grad_sample_mode=mode)
        make_trainer(tmp_path, [dp], max_steps=6, precision="64-true").fit(model, ToyData(n=48, batch_size=8))
        runs[max_physical] = (model, dp)
    (whole, dp_whole), (split, dp_split) = runs[None], runs[3]
    probe = PROBE_CALLS if mode != "ghost" else 0  # ghost clipping forms no per-sample gradients to probe
    split_sizes, whole_sizes = split.seen_batch_sizes[probe:], whole.seen_batch_sizes[probe:]
    assert max(split_sizes) <= 3 < max(whole_sizes)
    assert sum(split_sizes) == sum(whole_sizes)
    assert dp_split.steps == dp_whole.steps == 6 and dp_split.history == dp_whole.history
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_empty_poisson_batches_are_steps(tmp_path: Path) -> None:
    model = ToyClassifier()
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=2, accountant="rdp", target_delta=1e-5)
    make_trainer(tmp_path, [dp], max_steps=24).fit(model, ToyData(n=48, batch_size=1))  # q N = 1
    assert 0 in model.seen_batch_sizes  # P(empty) = (47/48)^48 ~ 0.36 per step
    assert dp.steps == 24  # empty batches were steps, and accounted
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_manual_optimization_with_a_named_private_optimizer(tmp_path: Path) -> None:
    model = ToyGAN()
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, private_optimizers=1, accountant="rdp",
               target_delta=1e-5)
    trainer = make_trainer(tmp_path, [dp], max_steps=8)
    seen: list[list[str]] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            seen.append([type(o).__name__ for o in trainer.optimizers])

    trainer.callbacks.append(Spy())
    trainer.fit(model, ToyData(n=48, batch_size=8))
    assert seen[0] == ["SGD", "DPOptimizer"]
    assert dp.steps == 4 and trainer.global_step == 8  # Lightning counts both optimizers' steps
    with pytest.raises(ValueError, match="private_optimizers"):
        make_trainer(tmp_path, [DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0)], max_steps=1).fit(
            ToyGAN(), ToyData()
        )


def test_module_and_checkpoint_unchanged_by_the_callback(tmp_path: Path) -> None:
    model = ToyClassifier()
    keys = list(model.state_dict())
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    trainer = make_trainer(tmp_path, [dp], max_steps=3)
    trainer.fit(model, ToyData())
    assert type(model) is ToyClassifier and list(model.state_dict()) == keys
    assert "training_step" not in vars(model) and not any(hasattr(p, "grad_sample") for p in model.parameters())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    fresh = ToyClassifier(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert not list(tmp_path.rglob("*.png"))  # no logger: no artefact anywhere


def test_epsilon_curve_lands_in_the_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    logger = CSVLogger(tmp_path / "logs", name="run")
    make_trainer(tmp_path, [dp], max_steps=3, logger=logger).fit(ToyClassifier(), ToyData())
    assert [p.parent for p in tmp_path.rglob("dp_epsilon.png")] == [Path(logger.log_dir)]
    quiet = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5, plot=False)
    make_trainer(tmp_path, [quiet], max_steps=3, logger=CSVLogger(tmp_path / "logs", name="quiet")).fit(
        ToyClassifier(), ToyData())
    assert len(list(tmp_path.rglob("dp_epsilon.png"))) == 1


# --------------------------------------------------------------------------- bad input fails before training
def test_batchnorm_error_names_the_path_and_fix_modules_swaps_it(tmp_path: Path) -> None:
    model = ToyClassifier(norm="batch")
    with pytest.raises(ValueError, match=r"`net\.1` \(BatchNorm1d\).*fix_modules=True"):
        make_trainer(tmp_path, [DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0)], max_steps=1).fit(model, ToyData())
    model = ToyClassifier(norm="batch")
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, fix_modules=True, accountant="rdp", target_delta=1e-5)
    make_trainer(tmp_path, [dp], max_steps=2).fit(model, ToyData())
    assert isinstance(model.net[1], nn.GroupNorm) and dp.steps == 2


class _SumLoss(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(reduction="sum")


class _VectorLoss(ToyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


@pytest.mark.parametrize(
    ("model", "trainer_kwargs", "dp_kwargs", "match"),
    [
        (ToyClassifier, {"gradient_clip_val": 1.0}, {}, "gradient_clip_val"),
        (ToyClassifier, {"accumulate_grad_batches": 2}, {}, "accumulate_grad_batches"),
        (ToyClassifier, {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}, {},
         "bf16-mixed"),
        (_SumLoss, {}, {}, r"`criterion` \(CrossEntropyLoss\) has reduction='sum'"),
        (_VectorLoss, {}, {}, "must be the mean over the batch"),
        (ToyClassifier, {}, {"grad_sample_mode": "ghost"}, "per-sample losses"),
        (ToyGAN, {}, {"max_physical_batch_size": 4, "private_optimizers": 1}, "automatic optimization"),
    ],
)
def test_bad_setups_fail_before_training(tmp_path: Path, model: type, trainer_kwargs: dict, dp_kwargs: dict,
                                         match: str) -> None:
    instance = model()
    before = [p.detach().clone() for p in instance.parameters()]
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp", target_delta=1e-5, **dp_kwargs)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [dp], max_steps=2, **trainer_kwargs).fit(instance, ToyData())
    assert all(torch.equal(a, b) for a, b in zip(before, instance.parameters()))
    assert dp.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_grad_norm": 0.0, "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf"), "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"max_grad_norm": 1.0}, "noise_multiplier. or .target_epsilon"),
        ({"max_grad_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"max_grad_norm": 1.0, "target_epsilon": 0.0}, "target_epsilon"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "target_delta": 1.0}, "target_delta"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "grad_sample_mode": "ew"}, "grad_sample_mode"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "seed": -1}, "seed"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "private_optimizers": [0, 1]}, "one private optimizer"),
    ],
)
def test_arguments_are_checked_eagerly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPSGD(**kwargs)


def test_secure_mode_needs_torchcsprng() -> None:
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchcsprng"):
            DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, secure_mode=True)
    else:  # pragma: no cover - not installed here
        assert DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, secure_mode=True).secure_mode


def test_optimizer_is_replaced_by_opacus_dp_optimizer(tmp_path: Path) -> None:
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            seen.append(trainer.optimizers[0])

    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp", target_delta=1e-5)
    make_trainer(tmp_path, [dp, Spy()], max_steps=1).fit(ToyClassifier(), ToyData())
    assert isinstance(seen[0], DPOptimizer) and seen[0].expected_batch_size == pytest.approx(8.0)
