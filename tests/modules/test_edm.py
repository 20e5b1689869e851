"""plpriv.modules.EDM: EMA and lr schedule against EDM's formulas, exact resume, denoiser protocol, predict, DDP."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from plpriv.data import DigitsDataModule
from plpriv.metrics import ClassifierFeatures
from plpriv.modules import EDM
from plpriv.nets import NonLeakingAugment
from plpriv.nets import SmallCNN, SongUNet

from _helpers import ROOT, run_plpriv


def tiny_net(seed: int = 0, **kwargs) -> SongUNet:
    torch.manual_seed(seed)
    args = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16, channel_mult=(1,),
                num_blocks=1, attn_resolutions=(8,), dropout=0.1, use_lora=True, lora_rank=2, lora_bases=3,
                lora_mlp=(16, 8))
    return SongUNet(**{**args, **kwargs})


def digits(batch_size: int = 16) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, image_size=8, channels=1, seed=0, drop_last=True)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**args, **kwargs})


class Recorder(Callback):
    """Network weights after each optimizer step, and the lr each step used."""

    def __init__(self) -> None:
        self.lrs, self.weights, self.start = [], [], None

    def on_train_start(self, trainer, module) -> None:
        self.start = [p.detach().clone() for p in module.net.parameters()]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in module.net.parameters()])


def test_ema_and_lr_ramp_follow_edm(tmp_path) -> None:
    B, halflife, ratio, rampup, lr = 16, 40.0, 0.5, 32.0, 1e-3
    model = EDM(tiny_net(), ema_halflife_img=halflife, ema_rampup_ratio=ratio, lr_rampup_img=rampup,
                num_val_samples=0)
    rec = Recorder()
    forwards = {"net": 0, "ema": 0}
    model.net.model.register_forward_hook(lambda *a: forwards.__setitem__("net", forwards["net"] + 1))
    model.ema.model.register_forward_hook(lambda *a: forwards.__setitem__("ema", forwards["ema"] + 1))
    steps = 6
    trainer(tmp_path, max_steps=steps, callbacks=[rec]).fit(model, digits(B))
    # lr ramp: lr_k = lr * min(k B / rampup, 1) (EDM: cur_nimg / lr_rampup)
    assert rec.lrs == pytest.approx([lr * min(k * B / rampup, 1.0) for k in range(steps)])
    # EMA: half-life min(H, ratio * images seen before step k), beta = 0.5 ** (B / half-life)
    ema = rec.start
    for k, w in enumerate(rec.weights):
        beta = 0.5 ** (B / max(min(halflife, ratio * k * B), 1e-8))
        ema = [beta * e + (1 - beta) * p for e, p in zip(ema, w)]
    for e, p in zip(ema, model.ema.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-7)
    assert int(model.images_seen) == steps * B
    assert not torch.equal(rec.weights[-1][0], rec.start[0])
    # The EMA update is no forward pass: one training forward per step, none through the EMA copy.
    assert forwards == {"net": steps, "ema": 0}
    assert not any(p.requires_grad for p in model.ema.parameters())
    assert "ema.model.map_layer0.weight" in model.state_dict()


def _fit(tmp_path, max_epochs: int, ckpt_path=None, init_seed: int = 0) -> EDM:
    model = EDM(tiny_net(init_seed, augment_dim=9), augment_p=0.5, lr_rampup_img=64, ema_halflife_img=100,
                num_val_samples=0, seed=7)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_epochs=1)
    trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=3, enable_checkpointing=True,
            callbacks=[ckpt]).fit(model, digits(), ckpt_path=ckpt_path)
    return model


def test_resume_matches_uninterrupted_run(tmp_path) -> None:
    """Dropout, augmentation, sigma and noise are all seeded by (seed, step, rank): resuming is exact."""
    full = _fit(tmp_path / "full", max_epochs=3)
    _fit(tmp_path / "part", max_epochs=1)
    resumed = _fit(tmp_path / "part", max_epochs=3, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt", init_seed=1)
    assert resumed.global_step == full.global_step == 9
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["ema.model.map_layer0.weight"], a["net.model.map_layer0.weight"])


def test_denoiser_protocol_and_sampling(tmp_path) -> None:
    model = EDM(tiny_net(), num_val_samples=0, lr_rampup_img=0)
    trainer(tmp_path, max_steps=3).fit(model, digits())
    model.train()  # as during training: the protocol must still run in eval mode
    x = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([1, 2, 3, 4])
    out = model.denoise(x, 0.7, labels)
    model.ema.eval(), model.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model.ema_denoiser(x, 0.7, labels))
        torch.testing.assert_close(model.denoise(x, 0.7, labels, use_ema=False), model.denoiser(x, 0.7, labels))
        assert not torch.allclose(model.denoiser(x, 0.7, labels), out)
    assert model.training  # mode restored
    s1 = model.sample(5, generator=torch.Generator().manual_seed(0), num_steps=4)
    s2 = model.sample(5, generator=torch.Generator().manual_seed(0), num_steps=4)
    assert s1.shape == (5, 1, 8, 8) and s1.dtype == torch.float32 and torch.equal(s1, s2)
    assert model.num_classes == 10 and model.image_shape == (1, 8, 8)


def test_ema_runs_in_eval_mode_but_lightning_sees_no_eval_modules(tmp_path) -> None:
    import warnings

    model = EDM(tiny_net(dropout=0.5), num_val_samples=0, lr_rampup_img=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1).fit(model, digits())
    assert not [w for w in caught if "eval mode" in str(w.message)]
    model.train()
    assert model.ema.training  # flags follow the LightningModule
    reference = copy.deepcopy(model.ema).eval()  # a copy put in eval mode explicitly: dropout off
    x, labels = torch.randn(6, 1, 8, 8), torch.arange(6)
    with torch.no_grad():
        out = model.ema_denoiser(x, 0.7, labels)  # with dropout 0.5 any train-mode forward would differ
        torch.testing.assert_close(out, reference(x, 0.7, labels), atol=0, rtol=0)
        torch.testing.assert_close(model.ema_denoiser(x, 0.7, labels), out, atol=0, rtol=0)
    assert all(m.training for m in model.ema.modules())  # modes given back


def test_predict_writes_npz_and_is_batch_invariant(tmp_path) -> None:
    arrays = []
    for bs in (4, 3):
        model = EDM(tiny_net(), predict_num_samples=7, predict_batch_size=bs, predict_dir=str(tmp_path / f"bs{bs}"),
                    sampler_kwargs={"num_steps": 3})
        trainer(tmp_path).predict(model)
        arrays.append(np.load(tmp_path / f"bs{bs}" / "samples.npz"))
        assert len(list((tmp_path / f"bs{bs}").glob("grid_*.png"))) == -(-7 // bs)
    # With a datamodule that has no predict data (as under the CLI) the seeds still drive prediction.
    model = EDM(tiny_net(), predict_num_samples=7, predict_batch_size=7, predict_dir=str(tmp_path / "dm"),
                sampler_kwargs={"num_steps": 3})
    trainer(tmp_path).predict(model, datamodule=digits())
    np.testing.assert_array_equal(np.load(tmp_path / "dm" / "samples.npz")["images"], arrays[0]["images"])
    a, b = arrays
    assert a["images"].shape == (7, 8, 8, 1) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["seeds"], np.arange(7))
    np.testing.assert_array_equal(a["labels"], np.arange(7) % 10)
    np.testing.assert_array_equal(a["images"], b["images"])  # an image depends on its seed only


def test_validation_logs_sigma_bins_fid_sample_accuracy_and_grid(tmp_path) -> None:
    torch.manual_seed(0)
    feats = ClassifierFeatures(SmallCNN(in_chans=1, num_classes=10))
    model = EDM(tiny_net(), val_sigmas=(0.1, 1.0), num_val_samples=10, fid_feature=feats, fid_num_samples=12,
                sample_batch_size=8, sampler_kwargs={"num_steps": 3})
    t = trainer(tmp_path, limit_val_batches=2, logger=pl.loggers.CSVLogger(tmp_path, name="", version=0))
    metrics = t.validate(model, digits())[0]
    for key in ("val/loss", "val/loss@sigma=0.1", "val/loss@sigma=1", "val/fid", "val/sample_acc"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0 <= metrics["val/sample_acc"] <= 1
    # one grid per validation epoch in the log dir, 10 samples of 8 px upscaled to >= 512 px
    from PIL import Image

    assert Image.open(tmp_path / "version_0" / "val_samples" / "epoch0000.png").size[0] >= 512
    assert not any(k.startswith("fid.") for k in model.state_dict())


def test_fid_real_statistics_from_training_split(tmp_path) -> None:
    feats = ClassifierFeatures(SmallCNN(in_chans=1, num_classes=10))
    model = EDM(tiny_net(), num_val_samples=0, fid_feature=feats, fid_num_samples=4, fid_real_split="train",
                sampler_kwargs={"num_steps": 2})
    dm = digits()
    trainer(tmp_path, limit_val_batches=1).validate(model, dm)
    assert int(model.fid.real_features_num_samples) == len(dm.train_dataset)


def test_init_checkpoint_loads_base_weights_into_lora_network(tmp_path) -> None:
    """LoRA starts as the identity (zero-initialised up-projections), so a LoRA network initialised from a base
    checkpoint denoises exactly like the base network."""
    base = EDM(tiny_net(0, use_lora=False))
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.ckpt")
    lora = EDM(tiny_net(5, use_lora=True), init_checkpoint=str(tmp_path / "base.ckpt"))
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(lora.denoise(x, 0.8, labels), base.denoise(x, 0.8, labels))
    bad = {k: v for k, v in base.state_dict().items() if "map_layer0" not in k}
    torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="map_layer0"):
        EDM(tiny_net(5, use_lora=True), init_checkpoint=str(tmp_path / "bad.ckpt"))


def test_non_leaking_augment() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y, labels = NonLeakingAugment(p=0.0)(x)
    assert labels.shape == (64, 9) and torch.all(labels[:, 1:] == 0)
    flipped = labels[:, 0] > 0
    assert 0 < flipped.sum() < 64
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])
    y, labels = NonLeakingAugment(p=1.0)(x)
    assert torch.all(labels[:, 2:].abs().sum(1) > 0) and not torch.allclose(y, x)
    with pytest.raises(ValueError, match="p"):
        NonLeakingAugment(p=2.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="augment_dim"):
        EDM(tiny_net(), augment_p=0.1)
    with pytest.raises(ValueError, match="sampler_kwargs"):
        EDM(tiny_net(), sampler_kwargs={"steps": 3})
    with pytest.raises(TypeError, match="nn.Module"):
        EDM("net")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="predict_class"):
        EDM(tiny_net(), predict_class=12)


@pytest.mark.distributed
def test_ddp_smoke_fit(tmp_path) -> None:
    proc = run_plpriv(
        ["fit", "-c", str(ROOT / "recipes" / "edm" / "digits_lora.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
         "--model.num_val_samples", "4", "--model.sampler_kwargs", "{num_steps: 2}"],
        cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    path = tmp_path / "edm_digits_lora" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 2
    # The CLI stores the network config in the hyperparameters: the checkpoint alone rebuilds the model.
    restored = EDM.load_from_checkpoint(path, map_location="cpu")
    assert restored.net.model.lora_type == "compositional" and restored.image_shape == (1, 8, 8)
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert int(ckpt["state_dict"]["images_seen"]) == 2 * 2 * 64  # two ranks of batch 64 per step
    assert (tmp_path / "edm_digits_lora" / "val_samples" / "epoch0000.png").exists()


def test_update_ema_with_explicit_batch_follows_edm_formula() -> None:
    model = EDM(tiny_net(), ema_halflife_img=100.0, ema_rampup_ratio=None, num_val_samples=0)
    old = [p.detach().clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    beta = model.update_ema(batch_images=50)
    assert beta == pytest.approx(0.5 ** (50 / 100.0))  # EDM: beta = 0.5 ** (batch / half-life)
    for e, o, n in zip(model.ema.parameters(), old, model.net.parameters()):
        torch.testing.assert_close(e, beta * o + (1 - beta) * n)
    assert int(model.images_seen) == 50
    with pytest.raises(ValueError, match="batch_images"):
        model.update_ema(batch_images=-1)
