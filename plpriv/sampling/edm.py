"""EDM's stochastic/deterministic Heun sampler (Karras et al., NeurIPS 2022, Algorithm 2).

diffusers' ``EDMEulerScheduler`` only takes first-order Euler steps; k-diffusion has Heun but pulls in heavy
dependencies, so the few lines of Algorithm 2 are written out here, with a per-step hook for monitors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepCallback", "edm_sampler", "edm_sigma_steps"]

#: ``callback(i, sigma, x, denoised)``: step index, the noise level the denoiser saw (``t_hat``, fp64 0-d tensor),
#: its input ``x_hat`` and its output ``D(x_hat; t_hat)`` (fp64), before the step's update. Called once per step.
StepCallback = Callable[[int, Tensor, Tensor, Tensor], Any]


def edm_sigma_steps(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str = "cpu",
    round_sigma: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """EDM's time steps (eq. 5): ``t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then ``t_N = 0``.

    Returns fp64 ``[num_steps + 1]``.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an int >= 1, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"`rho` must be > 0, got {rho!r}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t), dtype=torch.float64, device=device)
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_sampler(
    net: Callable[..., Tensor],
    latents: Tensor,
    class_labels: Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    recurrence: int = 1,
) -> Tensor:
    """Sample with EDM Algorithm 2: Heun's 2nd-order method, optional churn; ``2 * num_steps - 1`` network calls.

    Args:
        net: denoiser ``net(x, sigma, class_labels) -> D(x; sigma)`` (e.g. :class:`plpriv.nets.EDMPrecond`). Its
            ``sigma_min``/``sigma_max``/``round_sigma`` attributes are honoured when present.
        latents: standard normal ``[B, C, H, W]``; scaled by ``sigma_max`` and integrated in fp64.
        class_labels: passed to ``net`` unchanged (indices or one-hot).
        num_steps: N; ``S_churn``/``S_min``/``S_max``/``S_noise``: stochasticity (EDM Table 5; 0 = deterministic ODE).
        generator: draws the churn and recurrence noise (only used when ``S_churn > 0`` or ``recurrence > 1``).
        callback: ``callback(i, sigma, x, denoised)`` after each Euler evaluation (see :data:`StepCallback`).
        recurrence: R, universal guidance's self-recurrence (Bansal et al. 2023, Algorithm 1): each step is taken R
            times; between repeats ``x_next`` is re-noised back to ``t_hat`` with fresh noise from ``generator``
            (``x <- x_next + sqrt(t_hat^2 - t_next^2) z``, the forward process), and the last repeat is kept.

    Returns:
        fp64 samples ``[B, C, H, W]`` (no clamping).
    """
    if not isinstance(recurrence, int) or isinstance(recurrence, bool) or recurrence < 1:
        raise ValueError(f"`recurrence` must be an int >= 1 (1 = no recurrence), got {recurrence!r}")
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"`S_churn` and `S_noise` must be >= 0, got S_churn={S_churn!r}, S_noise={S_noise!r}")
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", math.inf)))
    round_sigma = getattr(net, "round_sigma", None)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, latents.device, round_sigma)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, class_labels).to(torch.float64)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: temporarily raise the noise level to t_hat = t + gamma t (Algorithm 2, lines 4-6).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if round_sigma is not None:
            t_hat = torch.as_tensor(round_sigma(t_hat), dtype=torch.float64, device=latents.device)
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float64)
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * eps
        else:
            x_hat = x_cur
        for r in range(recurrence):
            if r > 0:  # self-recurrence: back to t_hat along the forward process, then the same step again
                z = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=torch.float64)
                x_hat = x_next + (t_hat**2 - t_next**2).sqrt() * z
            # Euler step (lines 7-8).
            denoised = denoise(x_hat, t_hat)
            if callback is not None:
                callback(i, t_hat, x_hat, denoised)
            d_cur = (x_hat - denoised) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            # Heun correction except on the last step to t = 0 (lines 9-11).
            if i < num_steps - 1:
                d_prime = (x_next - denoise(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
