"""plpriv.privacy.canaries against closed forms: softmax-regression losses, margins and gradients, and a crafting
problem whose answer is known by construction (IN models lowered the loss along a secret input direction)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from torch import nn

from plpriv.privacy.canaries import (
    SCORE_HIGHER_IS_IN,
    Canary,
    blank_canary,
    craft_canary,
    flat_parameters,
    gradient_direction,
    in_distribution_canary,
    least_likely_label,
    logit_margin_scores,
    loss_gradient,
    loss_scores,
    mislabeled_canary,
    white_box_scores,
)

C, H, W, K = 1, 2, 3, 4  # images [1, 2, 3] -> 6 features, 4 classes


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """Softmax regression on flattened images with the given parameters."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(torch.as_tensor(weight))
        model[1].bias.copy_(torch.as_tensor(bias))
    return model


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------------ canaries


def test_blank_canary_is_a_constant_image_with_the_label() -> None:
    c = blank_canary([C, H, W], label=3)
    assert c.kind == "blank" and c.label == 3 and c.image.shape == (C, H, W)
    assert torch.all(c.image == -1.0)
    assert torch.all(blank_canary([3, 4, 4], 0, value=0.5).image == 0.5)
    with pytest.raises(ValueError, match="shape"):
        blank_canary([4, 4], 0)


def test_mislabeled_canary_changes_only_the_label() -> None:
    img = torch.rand(C, H, W)
    c = mislabeled_canary(img, label=2, num_classes=K)
    assert c.label == 3 and c.info["true_label"] == 2 and torch.equal(c.image, img)
    assert mislabeled_canary(img, 3, K).label == 0  # wraps around
    assert mislabeled_canary(img, 2, K, new_label=0).label == 0
    with pytest.raises(ValueError, match="differ"):
        mislabeled_canary(img, 2, K, new_label=2)
    with pytest.raises(ValueError, match="new_label"):
        mislabeled_canary(img, 2, K, new_label=K)
    with pytest.raises(ValueError, match="num_classes"):
        mislabeled_canary(img, 0, 1)


def test_in_distribution_canary_and_validation() -> None:
    img = torch.rand(C, H, W)
    c = in_distribution_canary(img, 1)
    assert c.kind == "in_distribution" and c.label == 1 and torch.equal(c.image, img)
    assert c.as_dict()["shape"] == [C, H, W]
    with pytest.raises(ValueError, match="kind"):
        Canary("x", "dirac", img, 0)
    with pytest.raises(ValueError, match="image"):
        Canary("x", "blank", torch.rand(H, W), 0)
    with pytest.raises(ValueError, match="label"):
        Canary("x", "blank", img, -1)


# -------------------------------------------------------------------------------------------------------- scores


def test_loss_and_margin_scores_match_the_softmax_closed_form() -> None:
    rng = _rng(1)
    w, b = rng.normal(size=(K, C * H * W)), rng.normal(size=K)
    x = rng.normal(size=(5, C, H, W)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    z = x.reshape(5, -1) @ w.T + b  # logits, independently in numpy
    model = _linear(w, b)
    loss = loss_scores(model, torch.as_tensor(x), y.tolist())
    np.testing.assert_allclose(loss.numpy(), logsumexp(z, axis=1) - z[np.arange(5), y], rtol=1e-5)
    other = np.where(np.eye(K, dtype=bool)[y], -np.inf, z).max(axis=1)
    np.testing.assert_allclose(logit_margin_scores(model, torch.as_tensor(x), y).numpy(), z[np.arange(5), y] - other, rtol=1e-5)
    assert SCORE_HIGHER_IS_IN == {"loss": False, "margin": True, "white_box": False}


def test_scores_leave_the_training_mode_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(C * H * W, K))
    model.train()
    x = torch.rand(3, C, H, W)
    a = loss_scores(model, x, [0, 1, 2])
    assert model.training  # restored
    torch.testing.assert_close(a, loss_scores(model, x, [0, 1, 2]))  # eval mode inside: dropout off, deterministic


def test_loss_gradient_direction_and_white_box_match_the_closed_form() -> None:
    rng = _rng(2)
    x = rng.normal(size=(C, H, W))
    label = 2
    grads = []
    models = []
    for _ in range(3):
        w, b = rng.normal(size=(K, C * H * W)), rng.normal(size=K)
        models.append(_linear(w, b))
        p = softmax(w @ x.reshape(-1) + b)
        r = p - np.eye(K)[label]  # d CE / d logits
        grads.append(np.concatenate([np.outer(r, x.reshape(-1)).ravel(), r]))  # [dW, db] in parameters() order
    xt = torch.as_tensor(x, dtype=torch.float32)
    np.testing.assert_allclose(loss_gradient(models[0], xt, label).numpy(), grads[0], rtol=1e-4, atol=1e-6)
    mean = np.mean(grads, axis=0)
    u = gradient_direction(models, xt, label)
    np.testing.assert_allclose(u.numpy(), mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)
    theta = np.concatenate([p.detach().numpy().ravel() for p in models[1].parameters()])
    np.testing.assert_allclose(flat_parameters(models[1]).numpy(), theta, rtol=1e-6)
    dirs = torch.stack([u, -u])
    np.testing.assert_allclose(white_box_scores(models[1], dirs).numpy(), [u.numpy() @ theta, -u.numpy() @ theta], rtol=1e-4)
    with pytest.raises(ValueError, match="directions"):
        white_box_scores(models[1], torch.zeros(2, theta.size + 1))


def test_white_box_score_is_lower_after_a_gradient_step_on_the_canary() -> None:
    """The module doc's claim, checked by hand: one SGD step on the canary lowers <theta, g_hat>."""
    rng = _rng(3)
    model = _linear(rng.normal(size=(K, C * H * W)), rng.normal(size=K))
    x, label = torch.rand(C, H, W), 1
    u = gradient_direction([model], x, label)
    before = float(white_box_scores(model, u))
    g = loss_gradient(model, x, label)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p -= 0.1 * g[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    assert float(white_box_scores(model, u)) == pytest.approx(before - 0.1 * float(g.norm()), rel=1e-4)


def test_least_likely_label_uses_the_mean_probability() -> None:
    # bias-only models: the probabilities are the softmax of the biases, whatever the input
    b1, b2 = np.array([3.0, 0.0, -1.0, 0.5]), np.array([-4.0, 0.0, 2.0, 0.5])
    models = [_linear(np.zeros((K, C * H * W)), b) for b in (b1, b2)]
    expected = int(np.argmin((softmax(b1) + softmax(b2)) / 2))
    assert expected not in (int(np.argmin(b1)), int(np.argmin(b2)))  # the mean matters, not one model
    assert least_likely_label(models, torch.rand(C, H, W)) == expected


# ------------------------------------------------------------------------------------------------------ crafting


def _shifted_models(n: int, base_w: np.ndarray, base_b: np.ndarray, v: np.ndarray, label: int, shift: float, rng) -> list:
    """Models around (base_w, base_b); IN models (shift > 0) additionally took a step that lowers the loss of
    inputs along v for ``label``: W += shift * (e_label - 1/K) v^T, the SGD step of a canary along v."""
    out = []
    step = np.outer(np.eye(K)[label] - 1.0 / K, v)
    for _ in range(n):
        w = base_w + 0.05 * rng.normal(size=base_w.shape) + shift * step
        out.append(_linear(w, base_b + 0.05 * rng.normal(size=K)))
    return out


def _standardised_gap(models_out, models_in, x: torch.Tensor, label: int) -> float:
    lo = np.array([float(loss_scores(m, x, [label])) for m in models_out])
    li = np.array([float(loss_scores(m, x, [label])) for m in models_in])
    return (lo.mean() - li.mean()) / math.sqrt((lo.var() + li.var()) / 2)


def test_craft_canary_finds_the_direction_in_models_learned() -> None:
    """IN models differ from OUT models only along a secret input direction v: crafting must move the canary
    towards v, and the crafted input must separate *fresh* IN / OUT models better than the starting input."""
    rng = _rng(4)
    d, label = C * H * W, 1
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    base_w, base_b = 0.3 * rng.normal(size=(K, d)), np.zeros(K)
    craft_out = _shifted_models(8, base_w, base_b, v, label, 0.0, rng)
    craft_in = _shifted_models(8, base_w, base_b, v, label, 1.0, rng)
    x0 = torch.as_tensor(0.1 * rng.normal(size=(C, H, W)), dtype=torch.float32)
    res = craft_canary(x0, label, craft_out, craft_in, steps=200, lr=0.05, bounds=(-3.0, 3.0), variance_floor=1e-6)
    assert res.image.shape == x0.shape and res.label == label
    assert float(res.image.min()) >= -3.0 and float(res.image.max()) <= 3.0
    assert max(res.objective) > res.objective[0]
    cos = lambda a: float(np.dot(a.numpy().ravel(), v) / np.linalg.norm(a.numpy()))  # noqa: E731
    assert cos(res.image) > 0.6 > cos(x0)  # towards v (the finite-sample optimum is not exactly v)
    fresh_out = _shifted_models(40, base_w, base_b, v, label, 0.0, rng)
    fresh_in = _shifted_models(40, base_w, base_b, v, label, 1.0, rng)
    assert _standardised_gap(fresh_out, fresh_in, res.image, label) > 2 * max(
        _standardised_gap(fresh_out, fresh_in, x0, label), 0.5
    )


def test_craft_canary_respects_max_change_and_leaves_models_untouched() -> None:
    rng = _rng(5)
    models_out = [_linear(rng.normal(size=(K, C * H * W)), rng.normal(size=K)) for _ in range(3)]
    models_out[0].train()
    models_out[1].eval()
    before = [flat_parameters(m).clone() for m in models_out]
    x0 = torch.zeros(C, H, W)
    res = craft_canary(x0, 0, models_out, steps=30, lr=0.5, max_change=0.1)
    assert float((res.image - x0).abs().max()) <= 0.1 + 1e-6
    # without IN models the objective is the standardised OUT loss mean / sqrt(var + floor): recomputed by hand
    def standardised_out_loss(x: torch.Tensor) -> float:
        losses = np.array([float(loss_scores(m, x, [0])) for m in models_out])
        return losses.mean() / math.sqrt(losses.var() + 0.01)

    assert standardised_out_loss(res.image) == pytest.approx(max(res.objective), rel=1e-4)
    # every visited input is kept (the stopping step can be chosen on other models): iterate i has objective i
    assert len(res.iterates) == len(res.objective) == 31 and torch.equal(res.iterates[0], x0)
    assert torch.equal(res.iterates[int(np.argmax(res.objective))], res.image)
    assert standardised_out_loss(res.iterates[7]) == pytest.approx(res.objective[7], rel=1e-4)
    assert standardised_out_loss(res.image) > standardised_out_loss(x0) == pytest.approx(res.objective[0], rel=1e-4)
    for m, p in zip(models_out, before):
        torch.testing.assert_close(flat_parameters(m), p)
        assert all(q.requires_grad for q in m.parameters())
    assert models_out[0].training and not models_out[1].training


def test_craft_canary_checks_its_arguments() -> None:
    m = _linear(np.zeros((K, C * H * W)), np.zeros(K))
    x = torch.zeros(C, H, W)
    with pytest.raises(ValueError, match="models_out"):
        craft_canary(x, 0, [])
    with pytest.raises(ValueError, match="steps"):
        craft_canary(x, 0, [m], steps=-1)
    with pytest.raises(ValueError, match="bounds"):
        craft_canary(x, 0, [m], bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="image"):
        craft_canary(torch.zeros(H, W), 0, [m])
