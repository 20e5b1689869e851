"""Samplers with per-step hooks, and guidance for any denoiser (no Lightning imports)."""

from plpriv.sampling.edm import StepCallback, edm_sampler, edm_sigma_steps
from plpriv.sampling.guidance import (
    BackwardGuidance,
    Denoiser,
    ForwardGuidance,
    Guidance,
    GuidedDenoiser,
    LogSigmoidEnsemble,
    ScoreGuidance,
)

__all__ = [
    "BackwardGuidance",
    "Denoiser",
    "ForwardGuidance",
    "Guidance",
    "GuidedDenoiser",
    "LogSigmoidEnsemble",
    "ScoreGuidance",
    "StepCallback",
    "edm_sampler",
    "edm_sigma_steps",
]
