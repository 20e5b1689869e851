"""RAW unprocessing (Brooks et al. 2019) and the simple ISP: round trip, noise statistics, sensor options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plpriv.data.raw import (add_noise, bin_planes, inverse_smoothstep, mosaic, process, random_ccm,
                             random_noise_levels, smoothstep, unprocess)


def _blocky(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Moderately saturated sRGB, constant on 2x2 blocks (what RGGB sampling + nearest demosaic keeps exactly)."""
    g = torch.Generator().manual_seed(seed)
    grey = 0.15 + 0.6 * torch.rand(n, 1, size // 2, size // 2, generator=g)
    x = (grey + 0.1 * (torch.rand(n, 3, size // 2, size // 2, generator=g) - 0.5)).clamp(0.05, 0.85)
    return F.interpolate(x, scale_factor=2, mode="nearest")


def test_tone_curve_values_and_inverse():
    # smoothstep(x) = 3x^2 - 2x^3: 0.25 -> 0.15625, 0.5 -> 0.5, 0.8 -> 0.896
    x = torch.tensor([0.25, 0.5, 0.8])
    torch.testing.assert_close(smoothstep(x), torch.tensor([0.15625, 0.5, 0.896]))
    torch.testing.assert_close(inverse_smoothstep(torch.tensor([0.15625, 0.5, 0.896])), x)


def test_mosaic_is_rggb():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0], image[0, 1], image[0, 2] = 1.0, 2.0, 3.0
    image[0, :, 1, 0] += 10  # the Gb site (row 1, col 0)
    assert mosaic(image)[0, :, 0, 0].tolist() == [1.0, 2.0, 12.0, 3.0]  # R at (0,0), Gr (0,1), Gb (1,0), B (1,1)
    with pytest.raises(ValueError, match="even"):
        mosaic(torch.zeros(1, 3, 3, 4))


def test_ccm_rows_sum_to_one():
    ccm = random_ccm(8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ccm.sum(-1), torch.ones(8, 3))


@pytest.mark.parametrize(("bit_depth", "mode", "atol"), [(None, "nearest", 1e-4), (10, "nearest", 2e-2)])
def test_unprocess_then_isp_reproduces_the_input_without_noise(bit_depth, mode, atol):
    x = _blocky()
    raw, meta = unprocess(x, torch.Generator().manual_seed(1), noise=False, bit_depth=bit_depth)
    assert raw.shape == (4, 4, 16, 16) and 0 <= raw.min() and raw.max() <= 1
    y = process(raw, meta, demosaic_mode=mode)
    torch.testing.assert_close(y, x, atol=atol, rtol=0)


def test_round_trip_with_bilinear_demosaic_on_a_smooth_image():
    t = torch.linspace(0, 1, 32)
    x = torch.stack([0.3 + 0.3 * t[None, :].expand(32, 32), 0.4 + 0.2 * t[:, None].expand(32, 32),
                     0.35 + 0.0 * t[None, :].expand(32, 32)])[None]
    raw, meta = unprocess(x, torch.Generator().manual_seed(2), noise=False, bit_depth=None)
    y = process(raw, meta)
    assert (y - x)[..., 2:-2, 2:-2].abs().max() < 0.03  # away from the border a linear ramp is interpolated well


def test_noise_variance_is_shot_times_signal_plus_read():
    raw = torch.full((1, 4, 200, 250), 0.3)
    shot, read = torch.tensor([0.01]), torch.tensor([0.001])
    noisy = add_noise(raw, shot, read, torch.Generator().manual_seed(0))
    assert noisy.mean().item() == pytest.approx(0.3, abs=1e-3)
    assert noisy.var().item() == pytest.approx(0.3 * 0.01 + 0.001, rel=0.02)


def test_noise_levels_follow_the_log_linear_model():
    shot, read = random_noise_levels(20000, torch.Generator().manual_seed(0))
    assert shot.min() >= 1e-4 and shot.max() <= 0.012
    ls, lr = shot.log(), read.log()
    slope = ((ls - ls.mean()) * (lr - lr.mean())).sum() / ((ls - ls.mean()) ** 2).sum()
    assert slope.item() == pytest.approx(2.18, abs=0.03)
    assert (lr - 2.18 * ls).mean().item() == pytest.approx(1.20, abs=0.02)
    assert (lr - 2.18 * ls).std().item() == pytest.approx(0.26, abs=0.01)


def test_adc_codes_black_level_and_binning():
    x = _blocky(2, 16)
    raw, _ = unprocess(x, torch.Generator().manual_seed(0), noise=False, bit_depth=8, black_level=16.0)
    codes = raw * (255 - 16)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)  # integer ADC codes above black
    binned, _ = unprocess(x, torch.Generator().manual_seed(0), noise=False, bit_depth=8, black_level=16.0, binning=2)
    assert binned.shape == (2, 4, 4, 4)
    torch.testing.assert_close(binned[0, 0, 0, 0], raw[0, 0, :2, :2].mean())  # same-colour 2x2 average
    torch.testing.assert_close(bin_planes(raw, 1), raw)


def test_seeded_and_checked():
    x = _blocky(2, 16)
    a, _ = unprocess(x, torch.Generator().manual_seed(5))
    b, _ = unprocess(x, torch.Generator().manual_seed(5))
    c, _ = unprocess(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert unprocess(x[0], torch.Generator().manual_seed(5))[0].shape == (4, 8, 8)
    with pytest.raises(ValueError, match="binning"):
        unprocess(x, binning=0)
    with pytest.raises(ValueError, match="RGB"):
        unprocess(torch.zeros(1, 4, 8, 8))
    assert not math.isnan(a.sum().item())
