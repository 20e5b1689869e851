r"""Empirical audit of :class:`plpriv.privacy.noisy_mean.NoisyMeanMechanism`: many releases on a worst-case pair of
neighbouring private sets, a projection score, and plpriv's Clopper-Pearson epsilon lower bound (no Lightning).

The pairs realise the dominating pair of the accountant (see :mod:`plpriv.privacy.noisy_mean`), so the audit is as
strong as a threshold test can be: on the pair, the likelihood ratio is monotone in the projection of the release
on the canary's direction, so a threshold on that projection is the Neyman-Pearson test.

* replace-one, fixed size or no subsampling: every row C e_1 (OUT), and the same with row 0 replaced by -C e_1 (IN).
  OUT releases are exactly N(C e_1, s^2 I); IN releases are that with probability 1 - q, shifted by -2C / m with
  probability q: the pair ((1 - q) P + q Q, P). Score: the projection on -e_1.
* replace-one, Poisson: rows C e_1 and a canary row +C e_2 (IN) or -C e_2 (OUT): the pair
  ((1 - q) P + q Q_+, (1 - q) P + q Q_-) on e_2 (the others' random count stays on e_1). Score: projection on e_2.
* add/remove, Poisson or none: n - 1 rows C e_1 (OUT), plus a canary row C e_2 (IN): the pair
  ((1 - q) P + q Q, P) on e_2. Score: projection on e_2.

The threshold is chosen on one half of the releases (:func:`plpriv.privacy.audit.select_threshold`) and the bound
computed on the other (:func:`plpriv.privacy.audit.audit_scores`), at the mechanism's delta; the bound holds with
probability ``confidence``. The GDP conversion is reported too, but assumes a Gaussian trade-off curve: it is a
valid lower bound only without subsampling (q = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plpriv.privacy.audit import AuditResult, audit_scores, gaussian_mu_estimate, select_threshold
from plpriv.privacy.noisy_mean import NoisyMeanMechanism
from plpriv.utils.seeding import derive_seed

__all__ = ["NoisyMeanAudit", "audit_noisy_mean", "worst_case_neighbours"]


def worst_case_neighbours(mech: NoisyMeanMechanism, num_rows: int, dim: int = 2
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IN set, OUT set, score direction) of the worst-case neighbours for ``mech`` (module docstring); ``num_rows``
    is the IN set's size (the OUT set has one row fewer under add/remove)."""
    if dim < 2:
        raise ValueError(f"`dim` must be >= 2 (the canary needs a second direction), got {dim!r}.")
    if num_rows < 2:
        raise ValueError(f"`num_rows` must be >= 2, got {num_rows!r}.")
    e1, e2 = torch.eye(dim, dtype=torch.float64)[:2]
    base = mech.norm * e1.expand(num_rows, dim).clone()
    if mech.adjacency == "add_remove":
        d_in = base.clone()
        d_in[0] = mech.norm * e2
        return d_in, base[1:].clone(), e2
    if mech.sampling == "poisson":
        d_in, d_out = base.clone(), base.clone()
        d_in[0], d_out[0] = mech.norm * e2, -mech.norm * e2
        return d_in, d_out, e2
    d_in = base.clone()
    d_in[0] = -mech.norm * e1
    return d_in, base, -e1


@dataclass(frozen=True)
class NoisyMeanAudit:
    """Claimed epsilon against the audited lower bound (``result.epsilon``, Clopper-Pearson) of one audit."""

    claimed_epsilon: float
    result: AuditResult
    mu_estimate: float  # parametric (mean_in - mean_out) / sd of the scores: a sanity statistic, not a bound
    releases: int  # per side

    @property
    def lower_bound(self) -> float:
        return self.result.epsilon


def _scores(mech: NoisyMeanMechanism, rows: torch.Tensor, direction: torch.Tensor, releases: int,
            seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = torch.stack([mech.release(rows, generator=generator) for _ in range(releases)])
    return out @ direction


def audit_noisy_mean(mech: NoisyMeanMechanism, num_rows: int, releases: int, *, dim: int = 2, seed: int = 0,
                     confidence: float = 0.95) -> NoisyMeanAudit:
    """``releases`` releases of ``mech`` on each side of :func:`worst_case_neighbours` (half to choose the threshold,
    half to audit), and the epsilon lower bound at ``mech.delta``."""
    if releases < 4:
        raise ValueError(f"`releases` must be >= 4 (two halves of two sides), got {releases!r}.")
    d_in, d_out, direction = worst_case_neighbours(mech, num_rows, dim)
    claimed = mech.epsilon(num_rows if mech.adjacency == "replace_one" else None)
    s_in = _scores(mech, d_in, direction, releases, derive_seed(seed, "noisy-mean-audit", "in")).numpy()
    s_out = _scores(mech, d_out, direction, releases, derive_seed(seed, "noisy-mean-audit", "out")).numpy()
    half = releases // 2
    threshold = select_threshold(s_in[:half], s_out[:half], mech.delta, confidence, higher_is_in=True)
    result = audit_scores(s_in[half:], s_out[half:], threshold, mech.delta, confidence, higher_is_in=True)
    mu = gaussian_mu_estimate(s_in, s_out, confidence, higher_is_in=True)[0]
    return NoisyMeanAudit(claimed, result, mu, releases)
