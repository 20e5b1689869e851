"""InfoNCE recovers a known I(Z; Y); IDI is 1 for the original and 0 for Retrain by construction, keeps its sign."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from plpriv.metrics import infonce_mutual_information, information_difference_index
from plpriv.metrics.idi import default_layers, layer_mutual_information
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
    layers, mi = layer_mutual_information(original, forget, retain, steps=80, batch_size=64, dim=8)
    assert mi.shape == (1, 3)
    assert np.all(mi <= math.log(2) + 0.05) and np.all(mi > 0.4)  # near log 2 = 0.69
    same = _images(160, 2, 0.0)
    _, mi0 = layer_mutual_information(original, same[:80], same[80:], steps=80, batch_size=64, dim=8)
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
                                       critic_init="random")  # "model" would copy the zeroed convs into f
    assert res.idi < 0


def test_bad_arguments_are_refused():
    original, retrained = _nets()
    with pytest.raises(ValueError, match="critic_init"):
        layer_mutual_information(original, _images(8, 0, 0), _images(8, 1, 0), critic_init="x")
    with pytest.raises(ValueError, match="not stages"):
        layer_mutual_information(original, _images(8, 0, 0), _images(8, 1, 0), layers=["features.1", "nope"])
    assert default_layers(original) == ["features.3", "features.7", "features.11"]
