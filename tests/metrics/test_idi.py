"""InfoNCE recovers a known I(Z; Y); IDI is 1 for the original and 0 for Retrain by construction, keeps its sign."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from plpriv.metrics import infonce_mutual_information, information_difference_index
from plpriv.metrics.idi import bootstrap_ratio_interval, default_layers, layer_mutual_information, mean_interval
from plpriv.nets.small_cnn import SmallCNN


def _gaussian_mi(mu: float) -> float:
    """I(Z;Y) for Y ~ Bernoulli(1/2), Z | Y ~ N(+-mu, 1): log 2 - E[H(Y|Z)], by quadrature (independent of plpriv)."""
    z = np.linspace(-12, 12, 200001)
    p_pos = np.exp(-0.5 * (z - mu) ** 2) / math.sqrt(2 * math.pi)
    p_neg = np.exp(-0.5 * (z + mu) ** 2) / math.sqrt(2 * math.pi)
    pz = 0.5 * (p_pos + p_neg)
    post = np.clip(0.5 * p_pos / pz, 1e-300, 1.0)
    h = -(post * np.log(post) + (1 - post) * np.log(np.clip(1 - post, 1e-300, 1.0)))
    return math.log(2) - float(np.sum(h * pz) * (z[1] - z[0]))


def _samples(mu: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z = (2 * y - 1).float()[:, None] * mu + torch.randn(n, 1, generator=g)
    return z, y


@pytest.mark.parametrize("mu", [0.0, 1.0, 2.5])
def test_infonce_recovers_known_gaussian_mutual_information(mu: float):
    truth = _gaussian_mi(mu)
    assert -1e-9 <= truth <= math.log(2)
    z_fit, y_fit = _samples(mu, 4000, 0)
    z_ev, y_ev = _samples(mu, 4000, 1)
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 8))
    est = infonce_mutual_information(z_fit, y_fit, z_ev, y_ev, critic, dim=8, steps=400, lr=3e-3, batch_size=256)
    assert est == pytest.approx(truth, abs=0.04), (est, truth)


def _images(n: int, seed: int, shift: float) -> torch.Tensor:
    """Noise images whose left half is brighter by ``shift`` than the right (a spatial pattern GroupNorm keeps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[..., :4] += shift / 2
    x[..., 4:] -= shift / 2
    return x


ESTIMATOR = dict(steps=40, batch_size=64, dim=8, trials=2)


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = SmallCNN(in_chans=1, num_classes=3, width=4).eval()
    torch.manual_seed(1)
    retrained = SmallCNN(in_chans=1, num_classes=3, width=4).eval()
    return original, retrained


def test_idi_is_one_for_the_original_and_zero_for_retrain(tmp_path):
    original, retrained = _nets()
    forget, retain = _images(60, 0, 1.0), _images(60, 1, 0.0)
    cache: dict = {}
    res_o = information_difference_index(original, retrained, original, forget, retain, cache=cache,
                                         plot=tmp_path / "idi.png", **ESTIMATOR)
    res_r = information_difference_index(retrained, retrained, original, forget, retain, cache=cache, **ESTIMATOR)
    assert res_o.idi == 1.0 and res_r.idi == 0.0
    assert res_o.layers == ["features.3", "features.7", "features.11"]
    assert (tmp_path / "idi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an independent copy of the original is estimated afresh with the same seeds: the same numbers
    res_copy = information_difference_index(copy.deepcopy(original), retrained, original, forget, retain,
                                            cache=cache, **ESTIMATOR)
    assert res_copy.idi == pytest.approx(1.0, abs=1e-6)
    assert len(res_copy.idi_trials) == 2 and set(res_copy.to_dict()["mi"]) == {"original", "retrain", "unlearned"}


def test_mi_is_bounded_by_log2_and_large_for_separable_classes():
    original, _ = _nets()
    forget, retain = _images(80, 0, 2.0), _images(80, 1, -2.0)  # trivially separable from the pixels
    layers, mi = layer_mutual_information(original, forget, retain, steps=80, batch_size=64, dim=8, trials=1)
    assert mi.shape == (1, 3)
    assert np.all(mi <= math.log(2) + 0.05) and np.all(mi > 0.4)  # near log 2 = 0.69
    same = _images(160, 2, 0.0)
    _, mi0 = layer_mutual_information(original, same[:80], same[80:], steps=80, batch_size=64, dim=8, trials=1)
    assert np.all(mi0 < 0.15)  # one distribution for both labels: no information


def test_idi_keeps_its_sign():
    """An unlearned model that holds less forget information than Retrain gets a negative IDI."""
    original, _ = _nets()
    forget, retain = _images(80, 0, 2.0), _images(80, 1, -2.0)

    def zeroed(convs: list[int]) -> nn.Module:  # zeroed convs: constant features from there on, I(Z; Y) = 0
        net = copy.deepcopy(original)
        for i in convs:
            nn.init.zeros_(net.features[i].weight), nn.init.zeros_(net.features[i].bias)
        return net

    retrained, blind = zeroed([8]), zeroed([0, 4, 8])  # Retrain keeps stages 1-2; blind keeps nothing
    res = information_difference_index(blind, retrained, original, forget, retain, steps=80, batch_size=64, dim=8,
                                       critic_init="random", trials=1)  # "model" would copy the zeroed convs into f
    assert res.idi < 0


def test_bad_arguments_are_refused():
    original, retrained = _nets()
    with pytest.raises(ValueError, match="critic_init"):
        layer_mutual_information(original, _images(8, 0, 0), _images(8, 1, 0), critic_init="x")
    with pytest.raises(ValueError, match="not stages"):
        layer_mutual_information(original, _images(8, 0, 0), _images(8, 1, 0), layers=["features.1", "nope"])
    assert default_layers(original) == ["features.3", "features.7", "features.11"]


def test_the_critic_is_the_same_for_a_frozen_and_a_trainable_net():
    """Layers l+1..L are trained in the critic whatever the caller's flags; the caller's net is left as it was.
    Before: a frozen net got a projection-only critic (here [0.098 0.088 0.119] against [-0.070 -0.073 0.119])."""
    original, _ = _nets()
    frozen = copy.deepcopy(original).requires_grad_(False)
    forget, retain = _images(80, 0, 0.6), _images(80, 1, 0.0)
    kwargs = dict(steps=40, batch_size=64, dim=8, trials=2)
    _, mi_trainable = layer_mutual_information(original, forget, retain, **kwargs)
    _, mi_frozen = layer_mutual_information(frozen, forget, retain, **kwargs)
    np.testing.assert_array_equal(mi_frozen, mi_trainable)
    assert not any(p.requires_grad for p in frozen.parameters()) and all(p.requires_grad for p in original.parameters())


def test_intervals_match_hand_computed_values():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975, 3} (tables) * s / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    _, low1, high1 = mean_interval([0.3])
    assert math.isnan(low1) and math.isnan(high1)  # one trial: no interval, never a zero spread
    den = np.array([0.5, 1.0, 2.0, 0.7])
    assert bootstrap_ratio_interval(2 * den, den) == pytest.approx((2.0, 2.0))  # every resample's ratio is 2
    low2, high2 = bootstrap_ratio_interval(np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    assert (low2, high2) == (1.0, 3.0)  # resampled means of {1, 3} range over [1, 3]; 10k draws reach both ends
    assert all(math.isnan(v) for v in bootstrap_ratio_interval(np.array([1.0]), np.array([1.0])))
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_ratio_interval(np.ones(3), np.ones(2))


def test_idi_reports_intervals_sample_counts_and_no_zero_spread_for_one_trial():
    original, retrained = _nets()
    forget, retain = _images(50, 0, 1.0), _images(70, 1, 0.0)
    unlearned = copy.deepcopy(original)
    for p in unlearned.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    res = information_difference_index(unlearned, retrained, original, forget, retain, steps=30, batch_size=64,
                                       dim=8, trials=3)
    low, high = res.idi_interval
    assert low <= high and len(res.idi_trials) == 3 and res.trials == 3
    report = res.to_dict()
    assert report["IDI_ci95"] == [low, high] and report["trials"] == 3
    for model, intervals in report["mi_ci95"].items():  # per layer: the mean MI lies inside its t-interval
        assert all(lo <= m <= hi for (lo, hi), m in zip(intervals, report["mi"][model])), model
    assert report["samples"] == {"forget_available": 50, "retain_available": 70, "per_label": 50, "fit": 70,
                                 "eval": 30}  # balanced: 50 of each label; holdout 0.3 of 100
    one = information_difference_index(unlearned, retrained, original, forget, retain, steps=30, batch_size=64,
                                       dim=8, trials=1).to_dict()
    assert one["IDI_ci95"] is None and one["IDI_std"] is None and one["mi_ci95"]["unlearned"] is None
    assert inspect.signature(layer_mutual_information).parameters["trials"].default == 10
