"""LoyalDiffusion: exact routing by sigma (training examples and sampling steps), threshold errors, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from plpriv.cli import main
from plpriv.modules import LoyalDiffusion
from plpriv.nets import EDMPrecond, SongUNet

from _helpers import ROOT

CFG = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           num_blocks=1, attn_resolutions=[4], dropout=0.0)
THRESHOLD = 1.0


def _model(**kwargs) -> LoyalDiffusion:
    torch.manual_seed(0)
    return LoyalDiffusion(SongUNet(**CFG), sigma_threshold=THRESHOLD, num_val_samples=0, **kwargs)


def _make_rau_differ(model: LoyalDiffusion) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.rau_net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_pair_starts_from_the_same_base_weights() -> None:
    model = _model()
    plain, rau = model.plain_net.state_dict(), model.rau_net.state_dict()
    assert set(rau) - set(plain) == {k for k in rau if k.startswith("itb.")} != set()
    assert all(torch.equal(plain[k], rau[k]) for k in plain)
    x = torch.randn(6, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 0.99, 1.0, 5.0, 50.0])
    with torch.no_grad():  # at initialisation the pair is the plain network (ITBs are the identity)
        assert torch.equal(model.denoiser(x, sigma, torch.arange(6)), EDMPrecond(model.plain_net)(x, sigma, torch.arange(6)))


@pytest.mark.parametrize("grad", [False, True])
def test_routing_of_examples_is_exact(grad: bool) -> None:
    model = _model()
    _make_rau_differ(model)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.arange(6)
    sigma = torch.tensor([0.01, 0.5, 0.999, 1.0, 5.0, 50.0])  # sigma >= 1 -> RAU-Net
    below = sigma < THRESHOLD
    with torch.set_grad_enabled(grad):
        out = model.denoiser(x, sigma, labels)
        plain = EDMPrecond(model.plain_net)(x, sigma, labels)
        rau = EDMPrecond(model.rau_net)(x, sigma, labels)
    assert torch.equal(out[below], plain[below])
    assert torch.equal(out[~below], rau[~below])
    assert not torch.allclose(plain[~below], rau[~below])  # the test can tell the two apart


def test_each_network_gets_gradient_only_from_its_examples() -> None:
    model = _model(sigma_sampling="shared")
    x = torch.randn(4, 1, 8, 8)
    loss = model.loss_fn(model.denoiser, x, torch.arange(4), sigma=torch.full((4,), 3.0))  # all above
    loss.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.plain_net.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.rau_net.parameters())


def test_per_network_sigma_draws_stay_on_their_side() -> None:
    model = _model()
    torch.manual_seed(0)
    low, high = model.draw_sigma(2000, high=False), model.draw_sigma(2000, high=True)
    assert bool((low < THRESHOLD).all()) and bool((high >= THRESHOLD).all())
    # EDM's ln sigma ~ N(-1.2, 1.2^2): P(sigma < 1) = Phi(1) = 0.841; the low side's median is at Phi^-1(0.42)
    assert float(low.log().median()) == pytest.approx(-1.2 + 1.2 * -0.2019, abs=0.08)


def test_sampling_steps_are_routed_by_sigma() -> None:
    model = _model()
    seen: dict[str, list[float]] = {"plain": [], "rau": []}
    for name, net in (("plain", model.ema.model.plain), ("rau", model.ema.model.rau)):
        net.register_forward_pre_hook(lambda m, args, name=name: seen[name].extend(
            (4 * args[1].reshape(-1)).exp().tolist()))  # EDM c_noise = ln(sigma)/4
    model.sample(2, num_steps=6)
    assert len(seen["plain"]) + len(seen["rau"]) == 2 * (2 * 6 - 1)  # Heun: 2N - 1 evaluations per image
    assert seen["plain"] and seen["rau"]
    assert max(seen["plain"]) < THRESHOLD <= min(seen["rau"]) * (1 + 1e-6)
    assert max(seen["rau"]) == pytest.approx(80.0, rel=1e-5)  # EDM's sigma_max goes to the RAU-Net


def test_bad_settings_are_clear_errors_before_training() -> None:
    net = SongUNet(**CFG)
    with pytest.raises(ValueError, match=r"sigma_threshold=100 is outside the sampler's noise range \(0.002, 80\)"):
        LoyalDiffusion(net, sigma_threshold=100.0)
    with pytest.raises(ValueError, match="outside"):
        LoyalDiffusion(net, sigma_threshold=0.001)
    with pytest.raises(ValueError, match="outside"):
        LoyalDiffusion(net, sigma_threshold=2.0, sampler_kwargs={"sigma_max": 1.5})
    with pytest.raises(ValueError, match="fraction must be in"):
        LoyalDiffusion(net, timestep_threshold=1.2)
    with pytest.raises(ValueError, match="not both"):
        LoyalDiffusion(net, sigma_threshold=1.0, timestep_threshold=0.5)
    with pytest.raises(ValueError, match="unknown itb 'conv9'"):
        LoyalDiffusion(net, itb="conv9")
    assert LoyalDiffusion(net).sigma_threshold == pytest.approx(math.sqrt(math.exp(19.9 / 8 + 0.05) - 1), rel=0.02)


_TINY = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--data.init_args.batch_size", "8",
         "--data.init_args.image_size", "8", "--model.init_args.net.init_args.img_resolution", "8",
         "--model.init_args.net.init_args.model_channels", "8", "--model.init_args.net.init_args.attn_resolutions",
         "[4]", "--model.init_args.num_val_samples", "0", "--trainer.check_val_every_n_epoch", "10",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _fit(out: Path, *extra: str) -> dict:
    main(["fit", "-c", str(ROOT / "recipes" / "loyal" / "digits_duplicated.yaml"), "--trainer.logger.init_args.save_dir",
          str(out), "--trainer.default_root_dir", str(out), *_TINY, *extra])
    (path,) = out.glob("*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow  # three CLI fits: ~25 s idle, ~60 s on the shared 2-core machine
def test_recipe_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """The digits recipe, shrunk: 2 epochs + resume from last.ckpt = 3 uninterrupted epochs, weights and EMA."""
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    full = _fit(tmp_path / "full")
    stopped = _fit(tmp_path / "part", "--trainer.max_epochs", "2")
    assert stopped["global_step"] == 4
    resumed = _fit(tmp_path / "part", "--ckpt_path", "last")
    assert resumed["global_step"] == full["global_step"] == 6
    assert any(k.startswith("net.model.rau.itb.") for k in full["state_dict"])
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def test_sd_recipe_parses_and_names_the_missing_weights(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as info:  # the CLI re-raises as ValueError
        main(["fit", "-c", str(ROOT / "recipes" / "loyal" / "sd_finetune.yaml"),
              "--model.init_args.pretrained_path", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err + str(info.value)
    assert "no Stable Diffusion weights at pretrained_path=" in err and "nowhere" in err and "unet" in err
    assert not (tmp_path / "runs").exists()  # nothing trained or written
