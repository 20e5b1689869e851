"""Textual inversion for EDM (plpriv.modules.textual_inversion): recovery of a known class vector on a trained frozen
net, per-image independence, frozen weights bit-for-bit, and DP-SGD TI's update against a micro-batch loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.data import DigitsDataModule
from plpriv.modules.textual_inversion import (
    TextualInversion,
    denoising_loss,
    initial_vector,
    invert_images,
    load_frozen_edm,
)
from plpriv.nets import EDMPrecond, SongUNet
from plpriv.nets.edm_precond import EDMLoss

CLASSES = (0, 1, 2)


@pytest.fixture(scope="module")
def trained() -> tuple[EDMPrecond, torch.Tensor, torch.Tensor]:
    """A tiny class-conditional EDM trained (briefly) on digits 0, 1, 2 at 8x8; returns it frozen and the images."""
    torch.manual_seed(0)
    net = EDMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0))
    dm = DigitsDataModule(image_size=8, classes=CLASSES, seed=0)
    dm.setup()
    x, y = dm.train_base.tensors
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn, gen = EDMLoss(), torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = loss_fn(net, x[idx], y[idx], generator=gen).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.requires_grad_(False).eval(), x, y


def test_initial_vector_and_errors() -> None:
    assert torch.equal(initial_vector(4, "mean", [1, 3]), torch.tensor([0, 0.5, 0, 0.5]))
    assert torch.equal(initial_vector(3, "zeros"), torch.zeros(3))
    with pytest.raises(ValueError, match="3 entries"):
        initial_vector(4, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="classes"):
        initial_vector(4, "mean", [7])
    with pytest.raises(FileNotFoundError, match="not found.*plpriv fit"):
        load_frozen_edm("/nonexistent/last.ckpt")


def _mean_loss(net: EDMPrecond, images: torch.Tensor, vector: torch.Tensor, seed: int = 123) -> float:
    """The denoising loss of ``vector`` on ``images`` over fixed (sigma, noise) draws (8 per image)."""
    x = images.repeat_interleave(8, dim=0)
    with torch.no_grad():
        loss = denoising_loss(EDMLoss(), net, x, vector.expand(len(x), -1), torch.Generator().manual_seed(seed))
    return float(loss.mean())


def test_ti_recovers_the_class_vector_of_the_images(trained) -> None:
    net, x, y = trained
    images = x[y == 1][:12]
    before = [p.detach().clone() for p in net.state_dict().values()]
    u = invert_images(net, images, steps=60, lr=0.1, noise_draws=4, seed=0)  # from the mean of the one-hots
    assert all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))  # frozen: bit-for-bit
    assert u.shape == (12, 3)
    # TI on images of class 1 points to class 1: its mean vector is nearest (cosine) to the one-hot of 1 ...
    cos = torch.nn.functional.cosine_similarity(u.mean(0, keepdim=True), torch.eye(3))
    assert int(cos.argmax()) == 1, cos
    # ... and its loss on those images is no worse than the true label's (held-out draws; margin: 2% of it)
    true_loss = _mean_loss(net, images, torch.eye(3)[1])
    ti_loss = sum(_mean_loss(net, images[i: i + 1], u[i]) for i in range(12)) / 12
    other = min(_mean_loss(net, images, torch.eye(3)[c]) for c in (0, 2))
    assert ti_loss <= true_loss * 1.02 < other, (ti_loss, true_loss, other)


def test_per_image_vectors_are_independent_of_the_other_images(trained) -> None:
    net, x, _ = trained
    a = invert_images(net, x[:3], steps=5, noise_draws=2, seed=4, chunk_size=3)
    b = invert_images(net, x[:3], steps=5, noise_draws=2, seed=4, chunk_size=1)  # three separate optimisations
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    replaced = invert_images(net, torch.cat([x[10:11], x[1:3]]), steps=5, noise_draws=2, seed=4)
    torch.testing.assert_close(replaced[1:], a[1:], rtol=1e-5, atol=1e-6)  # replace-one: only row 0 changes
    assert not torch.allclose(replaced[0], a[0])


class _Recording(TextualInversion):
    """Keeps the images of its last training_step call (the real step; DPSGD's probe calls come first)."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.last = (batch[0].clone(), self.global_step, batch_idx)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.token.parameters(), lr=self.lr)


def test_dpsgd_ti_update_equals_clipped_micro_batch_loop(trained, tmp_path: Path) -> None:
    net, x, y = trained
    images = x[y == 2][:10]
    model = _Recording(denoiser=net, lr=1.0, seed=3)
    start = model.vector
    before = [p.detach().clone() for p in net.state_dict().values()]
    clip = 0.05
    dp = DPSGD(max_grad_norm=clip, noise_multiplier=0.0, sample_rate=1.0, dataset_size=10, seed=0, accountant="rdp",
               target_delta=1e-5, adjacency="replace_one")
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[dp], default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(images, torch.zeros(10)), batch_size=10))
    assert dp.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
    batch, step, batch_idx = model.last
    # the micro-batch loop: each example's gradient alone, clipped to C, averaged over the public B = 10
    from plpriv.utils.seeding import derive_seed

    u = start.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(derive_seed(3, step, batch_idx))
    losses = denoising_loss(model.loss_fn, net, batch, u.expand(len(batch), -1), gen)
    clipped = []
    for i in range(len(batch)):
        (g,) = torch.autograd.grad(losses[i], u, retain_graph=True)
        clipped.append(g * min(1.0, clip / float(g.norm())))
    assert max(float(c.norm()) for c in clipped) == pytest.approx(clip)  # clipping is active
    expected = start - torch.stack(clipped).sum(0) / 10
    torch.testing.assert_close(model.vector, expected, rtol=1e-4, atol=1e-6)
