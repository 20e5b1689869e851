"""Samplers with per-step hooks (no Lightning imports)."""

from plpriv.sampling.edm import StepCallback, edm_sampler, edm_sigma_steps

__all__ = ["StepCallback", "edm_sampler", "edm_sigma_steps"]
