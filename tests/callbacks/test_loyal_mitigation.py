"""TimestepSelectiveMitigation: ITBs inserted before the optimizer, exact routing by sigma, checkpointed, composes with
DPSGD and MemorizationMonitor, clear errors before training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD, MemorizationMonitor, TimestepSelectiveMitigation
from plpriv.modules import EDM
from plpriv.nets import SongUNet

CFG = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0)


def _edm(**kwargs) -> EDM:
    torch.manual_seed(0)
    return EDM(SongUNet(**CFG), num_val_samples=0, lr_rampup_img=0, **kwargs)


def _loader(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (n,), generator=g)), batch_size=batch)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    return Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)


def test_routing_is_exact_and_itbs_are_registered_in_both_denoisers() -> None:
    model = _edm()
    plain = copy.deepcopy(model.net)  # the network before the callback touched it
    cb = TimestepSelectiveMitigation(sigma_threshold=1.0)
    cb.setup(None, model, "fit")  # type: ignore[arg-type]
    assert len(model.net.model.itb) and len(model.ema.model.itb) == len(model.net.model.itb)
    assert all(p.requires_grad for p in model.net.model.itb.parameters())
    assert not any(p.requires_grad for p in model.ema.model.itb.parameters())  # frozen like the EMA copy
    assert any(k.startswith("net.model.itb.") for k in model.state_dict())
    x = torch.randn(6, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 0.999, 1.0, 5.0, 50.0])
    labels = torch.arange(6)
    with torch.no_grad():
        assert torch.equal(model.denoiser(x, sigma, labels), plain(x, sigma, labels))  # identity at initialisation
        for p in model.net.model.itb.parameters():
            p.normal_()
        out, ref = model.denoiser(x, sigma, labels), plain(x, sigma, labels)
    below = sigma < 1.0
    assert torch.equal(out[below], ref[below])
    assert not torch.allclose(out[~below], ref[~below])
    with torch.no_grad():  # a sampling step: one sigma for the batch
        assert torch.equal(model.denoiser(x, 0.5, labels), plain(x, 0.5, labels))
        assert not torch.allclose(model.denoiser(x, 2.0, labels), plain(x, 2.0, labels))


def test_itbs_train_and_come_back_from_the_checkpoint(tmp_path: Path) -> None:
    model = _edm(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    cb = TimestepSelectiveMitigation(sigma_threshold=0.5)
    trainer = _trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(model, _loader())
    itb = dict(model.net.model.itb.named_parameters())
    assert all(p.abs().sum() > 0 for p in itb.values())  # zero-initialised, so the optimizer had them
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=False)
    fresh = _edm()
    TimestepSelectiveMitigation(sigma_threshold=0.5).setup(None, fresh, "fit")  # type: ignore[arg-type]
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    assert all(torch.equal(p, itb[n]) for n, p in fresh.net.model.itb.named_parameters())
    other = TimestepSelectiveMitigation(sigma_threshold=0.5, itb="stacked")
    with pytest.raises(ValueError, match="use the checkpoint's settings"):
        other.load_state_dict(cb.state_dict())


def test_composes_with_dpsgd_and_memorization_monitor(tmp_path: Path) -> None:
    model = _edm()
    mitigation = TimestepSelectiveMitigation(sigma_threshold=0.5)
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5, plot=False)
    monitor = MemorizationMonitor(every_n_epochs=1, num_samples=2, k=1, num_iters=2, num_steps=2, batch_size=2)
    trainer = _trainer(tmp_path, [dp, mitigation, monitor], max_epochs=1)  # DPSGD first: setup order is free
    with pytest.warns(UserWarning):
        trainer.fit(model, _loader(16))
    assert dp.steps == trainer.global_step > 0 and dp.get_epsilon(1e-5) > 0
    assert all(p.abs().sum() > 0 for p in model.net.model.itb.parameters())  # clipped, noised updates reached them
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert len(monitor.history) == 1  # the monitor scored samples drawn through the routed EMA denoiser
    assert mitigation.routed_calls > 0


def test_clear_errors_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown itb 'conv7'"):
        TimestepSelectiveMitigation(itb="conv7")
    with pytest.raises(ValueError, match="fraction must be in"):
        TimestepSelectiveMitigation(timestep_threshold=0.0)
    model = _edm()
    trainer = _trainer(tmp_path, [TimestepSelectiveMitigation(sigma_threshold=200.0)], max_steps=2)
    with pytest.raises(ValueError, match=r"sigma_threshold=200 is outside the sampler's noise range \(0.002, 80\)"):
        trainer.fit(model, _loader())
    assert trainer.global_step == 0

    class NoDenoiser(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="has none of the denoisers"):
        TimestepSelectiveMitigation().setup(None, NoDenoiser(), "fit")  # type: ignore[arg-type]


def test_routing_of_a_diffusers_unet_inside_a_users_denoiser() -> None:
    """The callback finds a diffusers UNet2DModel inside a user's denoiser and routes its ITBs by sigma exactly."""
    diffusers = pytest.importorskip("diffusers")

    class Denoiser(torch.nn.Module):  # D(x, sigma): the UNet's timestep input is EDM's c_noise = ln(sigma) / 4
        def __init__(self) -> None:
            super().__init__()
            self.unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                              layers_per_block=1, norm_num_groups=4,
                                              down_block_types=("DownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "UpBlock2D"))

        def forward(self, x, sigma, class_labels=None):
            sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
            return self.unet(x, sigma.log() / 4).sample

    class UserModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.denoiser = Denoiser()

    torch.manual_seed(0)
    module = UserModule()
    plain = copy.deepcopy(module.denoiser)
    callback = TimestepSelectiveMitigation(sigma_threshold=1.0, rau_levels=[1])
    callback.setup(None, module, "fit")  # type: ignore[arg-type]
    assert any(k.startswith("denoiser.unet.itb.") for k in module.state_dict())
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.999, 1.0, 20.0])
    with torch.no_grad():
        assert torch.equal(module.denoiser(x, sigma), plain(x, sigma))
        for p in module.denoiser.unet.itb.parameters():
            p.normal_()
        out, ref = module.denoiser(x, sigma), plain(x, sigma)
        below = sigma < 1.0
        assert torch.equal(out[below], ref[below])
        assert not torch.allclose(out[~below], ref[~below])
        assert torch.equal(module.denoiser(x, 0.5), plain(x, 0.5))  # one sigma for the batch (a sampling step)
