"""plpriv.modules.EDM with guidance terms: sampling, predict and checkpoints (the formulas: tests/sampling)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from plpriv.modules import EDM
from plpriv.nets import SongUNet
from plpriv.sampling import ForwardGuidance, LogSigmoidEnsemble, ScoreGuidance


def tiny_net() -> SongUNet:
    torch.manual_seed(0)
    return SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16,
                    channel_mult=(1,), num_blocks=1, attn_resolutions=(8,))


class Brightness(nn.Module):
    """A time-dependent 'reward' logit: brighter images are 'benign' (its slope decays with sigma^2, like the exact
    noisy likelihood of a tilt; a constant slope would be multiplied by sigma^2 = 6400 at sigma_max)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.scale * x.flatten(1).mean(1) / (1 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)


def test_guidance_moves_samples_and_the_per_call_argument_overrides_the_models() -> None:
    model = EDM(tiny_net(), sampler_kwargs={"num_steps": 18})
    latents = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = model.sample(latents=latents)
    up = model.sample(latents=latents, guidance=ForwardGuidance(lambda x0: 20 * x0.flatten(1).mean(1)))
    down = model.sample(latents=latents, guidance=ScoreGuidance(lambda x, s: -20 * x.flatten(1).mean(1) / (1 + s**2)))
    assert float(up.mean()) > float(plain.mean()) + 0.05 > float(down.mean()) + 0.1, (up.mean(), plain.mean(), down.mean())
    guided = EDM(tiny_net(), sampler_kwargs={"num_steps": 18},
                 guidance=ScoreGuidance(LogSigmoidEnsemble([Brightness()]), weight=5.0))
    torch.testing.assert_close(guided.sample(latents=latents, guidance=[]), plain)  # [] = no guidance this call
    assert float(guided.sample(latents=latents).mean()) > float(plain.mean()) + 0.1


def test_predict_with_guidance_and_recurrence_is_reproducible_and_keeps_rewards_out_of_checkpoints(tmp_path) -> None:
    def run(name: str) -> np.ndarray:
        model = EDM(tiny_net(), predict_num_samples=6, predict_batch_size=6, predict_dir=str(tmp_path / name),
                    sampler_kwargs={"num_steps": 3, "recurrence": 2},
                    guidance=ScoreGuidance(LogSigmoidEnsemble([Brightness()]), weight=2.0))
        assert not any("scale" in k for k in model.state_dict())  # the reward is not part of the model
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path).predict(model)
        return np.load(tmp_path / name / "samples.npz")["images"]

    np.testing.assert_array_equal(run("a"), run("b"))
