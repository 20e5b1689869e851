"""plpriv's own modules under DP-SGD follow the public-batch contract (plpriv.privacy.contract).

Facts: under DP the Poisson batch sizes are private, so two runs that differ only in DPSGD's secret seed (other
batches) must publish the same images_seen, lr schedule, EMA rates and logged metric names, all computed by hand from
the public expected batch B; no statistic of the training batch (train/*) is logged; the chunks of one logical batch
(virtual steps) draw fresh noise levels; a NaN in one example's per-sample gradient does not reach the weights.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from _dp_toy import ToyData
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.metrics import ClassifierFeatures
from plpriv.modules import EDM, ImageClassifier, LoyalDiffusion
from plpriv.nets import SmallCNN, SongUNet
from plpriv.privacy.contract import PrivateTrainingAware, PublicBatch
from plpriv.utils.seeding import derive_seed

B, N, STEPS = 8, 40, 4  # expected batch, examples (5 Poisson batches per epoch), optimizer steps per run
LR, RAMPUP, HALFLIFE, RATIO = 1e-3, 64.0, 40.0, 0.5
NET = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0)


class _Images(ToyData):
    def __init__(self, size: int) -> None:
        super().__init__(n=N, batch_size=B)
        self.size = size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(self.n, 1, self.size, self.size, generator=g) * 2 - 1
        self.dataset = TensorDataset(images, torch.randint(0, 10, (self.n,), generator=g))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=B)


class _Record(Callback):
    """The private batch sizes (test-side only) and the public lr of every step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.sizes.append(len(batch[0]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _dp(secret: int, physical: int | None) -> DPSGD:
    """DP-SGD with a fixed secret seed (tests only) and the public rate q = B / N."""
    return DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, seed=secret, accountant="rdp", target_delta=1e-5,
                 sample_rate=B / N, max_physical_batch_size=physical, plot=False)


def _edm(cls: type[EDM] = EDM, **kwargs: Any) -> EDM:
    torch.manual_seed(0)
    args = dict(optimizer=partial(torch.optim.Adam, lr=LR), lr_rampup_img=RAMPUP, ema_halflife_img=HALFLIFE,
                ema_rampup_ratio=RATIO, num_val_samples=0, val_sigmas=(1.0,))
    if cls is LoyalDiffusion:
        args["sigma_threshold"] = 1.0
    return cls(SongUNet(**NET), **{**args, **kwargs})


def _classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, backbone_kwargs=dict(width=4, act="tanh"),
                           optimizer=partial(torch.optim.SGD, lr=0.1))


def _fit(tmp_path: Path, model: LightningModule, secret: int, physical: int | None, size: int,
         **trainer_kwargs: Any) -> dict[str, Any]:
    """STEPS DP steps (validation after the last) with a CSV logger; what the run published and drew."""
    betas: list[float] = []
    if isinstance(model, EDM):
        update = model.update_ema
        model.update_ema = lambda *a, **k: betas.append(update(*a, **k)) or betas[-1]  # type: ignore[method-assign]
    record = _Record()
    dp = _dp(secret, physical)
    logger = CSVLogger(tmp_path, name="", version=f"{secret}-{physical}")
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1, val_check_interval=STEPS, max_steps=STEPS, default_root_dir=tmp_path,
                      callbacks=[dp, record], **trainer_kwargs)
    trainer.fit(model, _Images(size))
    assert dp.steps == trainer.global_step == STEPS
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        columns = next(csv.reader(f))
    dp_values = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("dp/")}
    return dict(sizes=record.sizes, lrs=record.lrs, betas=betas, columns=set(columns),
                keys=set(trainer.logged_metrics), dp=dp_values,
                images_seen=int(model.images_seen) if isinstance(model, EDM) else None)


def _two_secrets(tmp_path: Path, make: Any, physical: int | None, size: int) -> tuple[dict, dict]:
    a = _fit(tmp_path, make(), secret=1, physical=physical, size=size)
    b = _fit(tmp_path, make(), secret=2, physical=physical, size=size)
    assert a["sizes"] != b["sizes"]  # the secret seeds drew other Poisson batches: the test can see a leak
    for run in (a, b):
        assert not any(n.startswith("train/") for n in run["columns"] | run["keys"])
        assert {"dp/epsilon", "dp/sample_rate"} <= run["keys"] and any(k.startswith("val/") for k in run["keys"])
    assert a["columns"] == b["columns"] and a["keys"] == b["keys"]
    assert a["dp"] == b["dp"]
    return a, b


@pytest.mark.parametrize("physical", [None, 3], ids=["poisson", "poisson+virtual"])
def test_edm_publishes_only_public_schedules(tmp_path: Path, physical: int | None) -> None:
    a, b = _two_secrets(tmp_path, _edm, physical, size=8)
    assert isinstance(_edm(), PrivateTrainingAware)
    # EDM's formulas with the public B in place of the sampled sizes
    assert a["images_seen"] == b["images_seen"] == STEPS * B
    expected_lrs = [LR * min(k * B / RAMPUP, 1.0) for k in range(STEPS)]
    assert a["lrs"] == b["lrs"] == pytest.approx(expected_lrs)
    expected_betas = [0.5 ** (B / max(min(HALFLIFE, RATIO * k * B), 1e-8)) for k in range(STEPS)]
    assert a["betas"] == b["betas"] == pytest.approx(expected_betas)


def test_loyal_diffusion_inherits_the_contract(tmp_path: Path) -> None:
    a, b = _two_secrets(tmp_path, partial(_edm, LoyalDiffusion), physical=3, size=8)
    assert a["images_seen"] == b["images_seen"] == STEPS * B
    assert a["lrs"] == b["lrs"] == pytest.approx([LR * min(k * B / RAMPUP, 1.0) for k in range(STEPS)])


@pytest.mark.parametrize("physical", [None, 3], ids=["poisson", "poisson+virtual"])
def test_classifier_logs_no_training_statistics(tmp_path: Path, physical: int | None) -> None:
    a, _ = _two_secrets(tmp_path, _classifier, physical, size=16)
    assert {"val/acc", "val/loss"} <= a["keys"]
    assert a["lrs"] == [0.1] * STEPS


@pytest.mark.parametrize("make", [_edm, partial(_edm, LoyalDiffusion), _classifier], ids=["EDM", "Loyal", "classifier"])
def test_configured_module_itself_logs_no_training_statistics(tmp_path: Path, make: Any) -> None:
    """The module's own side, without DPSGD (which may also drop what a module logs from training_step): once told a
    PublicBatch, training_step logs nothing; validation metrics stay."""
    model = make()
    model.configure_private_training(PublicBatch(expected_batch_size=float(B), sample_rate=B / N))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1, val_check_interval=2, max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, _Images(16 if isinstance(model, ImageClassifier) else 8))
    keys = set(trainer.callback_metrics)
    assert any(k.startswith("val/") for k in keys) and not any(k.startswith("train/") for k in keys), keys


def test_without_dp_nothing_changes(tmp_path: Path) -> None:
    """Outside DP the modules log train/loss and EDM counts the images it trained on."""
    for model in (_edm(), _classifier()):
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=2,
                          default_root_dir=tmp_path)
        trainer.fit(model, _Images(8 if isinstance(model, EDM) else 16))
        assert "train/loss" in trainer.callback_metrics
        if isinstance(model, EDM):
            assert int(model.images_seen) == 2 * B  # two full batches of B


# ------------------------------------------------------------------------------------------- virtual steps ---
@pytest.mark.parametrize("cls", [EDM, LoyalDiffusion])
def test_chunks_of_one_logical_batch_draw_fresh_sigmas(tmp_path: Path, cls: type[EDM]) -> None:
    model = _edm(cls)
    drawn: list[tuple[int, torch.Tensor]] = []  # (optimizer step, sigmas of one training_step call)
    name = "draw_sigma" if cls is LoyalDiffusion else "sample_sigma"
    owner = model if cls is LoyalDiffusion else model.loss_fn
    original = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        sigma = original(*args, **kwargs)
        drawn.append((model.global_step, sigma.flatten().clone()))
        return sigma

    setattr(owner, name, spy)
    dp = _dp(3, 3)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, max_steps=STEPS, default_root_dir=tmp_path,
            callbacks=[dp]).fit(model, _Images(8))
    per_step: dict[int, list[torch.Tensor]] = {}
    calls = 2 if cls is LoyalDiffusion else 1  # LoyalDiffusion draws two sigma vectors per call (below, above)
    for i, (step, sigma) in enumerate(drawn):
        if i % calls == 0:
            per_step.setdefault(step, []).append(sigma)
    # step 0 also holds DPSGD's independence probe, which replays the first chunk's draws on purpose (three passes)
    multi = [chunks for step, chunks in per_step.items() if step > 0 and len(chunks) > 1]
    assert multi  # some logical batch was split
    for chunks in multi:
        for i in range(len(chunks)):
            for j in range(i + 1, len(chunks)):
                m = min(len(chunks[i]), len(chunks[j]))
                assert not torch.equal(chunks[i][:m], chunks[j][:m])  # a repeated seed would repeat the draws


def test_training_rng_counts_calls_per_step_and_batch() -> None:
    """Call 0 of (step, batch_idx) keeps the seed of plpriv before virtual steps; call k > 0 adds k; a fresh module
    (a resumed run) starts every (step, batch_idx) at call 0 as the uninterrupted run did."""

    def draws(model: EDM, batch_indices: list[int]) -> list[torch.Tensor]:
        out = []
        for i in batch_indices:
            with model.training_rng(i):
                out.append(torch.rand(3))
        return out

    first, again = draws(_edm(seed=5), [0, 0, 0, 1]), draws(_edm(seed=5), [0, 0, 0, 1])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for k, parts in enumerate([(0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1)]):
        torch.manual_seed(derive_seed(5, *parts))
        assert torch.equal(first[k], torch.rand(3)), parts


def test_virtual_steps_resume_exactly(tmp_path: Path) -> None:
    def run(ckpt: Path | None) -> EDM:
        model = _edm()
        dp = _dp(4, 3)
        save = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=2)
        Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=ckpt is None,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=STEPS,
                default_root_dir=tmp_path, callbacks=[dp, *([save] if ckpt is None else [])]
                ).fit(model, _Images(8), ckpt_path=ckpt)
        return model

    full = run(None)
    resumed = run(tmp_path / "ckpt" / "step=2.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------- NaN per-sample grad ---
class _PoisonOneExample(Callback):
    """Puts NaN into example 0's per-sample gradient of every parameter, once, at ``hook`` (callbacks run before the
    module's hook of the same name)."""

    def __init__(self, hook: str) -> None:
        self.hook, self.done = hook, False

    def _poison(self, module: LightningModule) -> None:
        if not self.done:
            samples = [p.grad_sample for p in module.parameters() if getattr(p, "grad_sample", None) is not None]
            assert samples  # opacus' per-sample gradients are there at this hook
            for g in samples:
                g[0] = float("nan")
            self.done = True

    def on_after_backward(self, trainer: Trainer, module: LightningModule) -> None:
        if self.hook == "on_after_backward":
            self._poison(module)

    def on_before_optimizer_step(self, trainer: Trainer, module: LightningModule, optimizer: Any) -> None:
        if self.hook == "on_before_optimizer_step":
            self._poison(module)


@pytest.mark.parametrize(("hook", "physical"), [("on_before_optimizer_step", None), ("on_after_backward", 3)],
                         ids=["whole-batch", "first-chunk"])
@pytest.mark.filterwarnings("ignore:DPSGD.*on_before_optimizer_step")
def test_nan_per_sample_gradient_does_not_poison_the_update(tmp_path: Path, hook: str, physical: int | None) -> None:
    model = _edm(lr_rampup_img=0)  # no lr ramp: the first step moves the weights
    before = [p.detach().clone() for p in model.net.parameters()]
    poison = _PoisonOneExample(hook)
    dp = _dp(0, physical)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, max_steps=1, default_root_dir=tmp_path,
            callbacks=[poison, dp]).fit(model, _Images(8))
    assert poison.done
    assert all(bool(torch.isfinite(p).all()) for p in model.net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net.parameters()))  # the step happened


def test_configure_private_training_checks_its_argument() -> None:
    model = _edm()
    with pytest.raises(ValueError, match="PublicBatch"):
        model.configure_private_training({"expected_batch_size": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_batch_size"):
        model.configure_private_training(PublicBatch(expected_batch_size=0.0, sample_rate=0.1))
    with pytest.raises(ValueError, match="PublicBatch"):
        _classifier().configure_private_training(8)  # type: ignore[arg-type]
    model.configure_private_training(PublicBatch(expected_batch_size=8.0, sample_rate=0.2))
    model.configure_private_training(None)
    # FID against the training set is an unnoised statistic of the private data
    fid_train = _edm(fid_feature=ClassifierFeatures(SmallCNN(in_chans=1, num_classes=10)), fid_num_samples=4,
                     fid_real_split="train")
    with pytest.raises(ValueError, match="fid_real_split='train'"):
        fid_train.configure_private_training(PublicBatch(expected_batch_size=8.0, sample_rate=0.2))
