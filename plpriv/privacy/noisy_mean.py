r"""The noisy mean of normalised embeddings: DPAgg-TI's one-shot release (no Lightning imports).

Peetathawatchai, Chen, Isik, Koyejo, No, "Differentially Private Adaptation of Diffusion Models via Noisy Aggregated
Embeddings" (arXiv 2411.14639): one embedding u_i per private image (textual inversion), normalised to bound the
sensitivity, a subsample averaged, Gaussian noise added; the noisy centroid u* is the new token. The paper's exact
normalisation, sample size and calibration could not be read (../shared/reference/dpagg_ti.md); this is the
construction consistent with what could be read, with accounting that is exact for what is run.

Release (:meth:`NoisyMeanMechanism.release`), rows normalised to the sphere of radius C::

    u_i <- C u_i / ||u_i||_2        (a row of norm 0 -> C e_1, a fixed public vector: every row has norm C)
    S   <- m of the n rows without replacement | each row with probability q (Poisson) | all rows
    u*  = (sum_{i in S} u_i + N(0, z^2 C^2 I_d)) / B      (B: m | the public expected count | n)

``z`` is the noise multiplier in opacus' (DP-SGD's) unit: the std of the noise on the *sum*, over C. The noise std
per coordinate of u* is z C / B (:meth:`NoisyMeanMechanism.noise_std`). ``renormalize=True`` rescales u* to norm C
afterwards (post-processing, free: the DP universal guidance target is a unit vector).

Adjacency and accounting (one release at delta; every epsilon is dp-accounting's PLD, pessimistic estimate, of a
dominating pair (P, Q) with P = N(0, z^2), Q its shift; :func:`noisy_mean_epsilon`):

* ``replace_one`` (n public), fixed size m (q = m / n) or no subsampling (m = n, q = 1): one row replaced moves the
  sum of a sample that holds it by at most 2C. Balle, Barthe, Gaboardi 2018 (Thm 10, sampling without replacement
  under substitution) bound the privacy profile by delta'(eps') <= q delta_G(eps), eps' = log(1 + q (e^eps - 1)),
  with delta_G the Gaussian's profile at shift 2 (Balle & Wang 2018, Thm 8). The pair ((1 - q) P + q Q, P), Q the
  shift by 2, attains it: H_{e^eps'}((1-q) P + q Q || P) = q H_{e^eps}(Q || P) exactly, and the data sets "all rows
  v" / "one row -v" realise that pair. So the bound is the exact epsilon, and it is dp-accounting's
  Poisson-subsampled Gaussian PLD at shift 2 (which takes the larger of the pair and its reverse; the reverse is
  bounded by the same theorem). Tested against the closed form and against dp-accounting's RDP bound for sampling
  without replacement (Wang, Balle, Kasiviswanathan 2019), which is larger.
* ``replace_one`` with Poisson sampling at rate q (divisor B = the expected count, ``expected_count`` or q n): the
  pair ((1 - q) P + q Q_-, (1 - q) P + q Q_+), shifts -1 and +1 (dp-accounting's REPLACE_ONE relation).
* ``add_remove`` (n private): Poisson sampling at rate q or none (q = 1), B = ``expected_count``, a PUBLIC figure
  (never n); one row more moves the sum by C: the pair ((1 - q) P + q Q, P), shift 1, both orders (dp-accounting's
  ADD_OR_REMOVE_ONE; opacus' one-step DP-SGD accountant bounds the same mechanism). Fixed-size sampling is refused
  (m / n would publish n). Nothing this object holds, records or prints depends on n; :meth:`epsilon` and
  :meth:`noise_std` ignore it.

A one-shot release does not compose over steps (the point of the method), so this is not a
:class:`plpriv.privacy.mechanisms.Mechanism` (a per-step release run through opacus' optimizer, accounted by a
composing ``IAccountant``); it shares that class' conventions: ``name``, ``title``, a public :meth:`record` with
``"mechanism"``, :meth:`changes`. The randomness (sample and noise) comes from the ``torch.Generator`` handed to
:meth:`release`, never stored. Floating-point attacks on the noise (Mironov 2012) are not addressed.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, ClassVar

import torch
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution

__all__ = ["ADJACENCIES", "SAMPLINGS", "NoisyMeanMechanism", "calibrate_noisy_mean", "noisy_mean_epsilon"]

ADJACENCIES = ("replace_one", "add_remove")  # plpriv's spelling (plpriv.privacy.adjacency); "replace-one" accepted
SAMPLINGS = ("none", "fixed", "poisson")
_PLD_RTOL = 1e-3  # the second pass' discretisation: this fraction of the first pass' (upper) epsilon
_PLD_MIN_INTERVAL = 1e-5


def _pair(adjacency: str, sampling: str) -> tuple[float, NeighboringRelation]:
    """(shift in units of C, dp-accounting's relation) of the dominating pair; see the module docstring."""
    if adjacency == "replace_one" and sampling == "poisson":
        return 1.0, NeighboringRelation.REPLACE_ONE
    if adjacency == "replace_one":
        return 2.0, NeighboringRelation.ADD_OR_REMOVE_ONE  # ((1-q) P + q Q, P) at shift 2: BBG 2018 Thm 10, attained
    return 1.0, NeighboringRelation.ADD_OR_REMOVE_ONE


def _check_accounting(noise_multiplier: float, delta: float, sample_rate: float, adjacency: str,
                      sampling: str) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"`noise_multiplier` must be finite and >= 0, got {noise_multiplier!r}.")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
    if adjacency not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
    if sampling not in SAMPLINGS:
        raise ValueError(f"`sampling` must be one of {SAMPLINGS}, got {sampling!r}.")
    if adjacency == "add_remove" and sampling == "fixed":
        raise ValueError("add/remove adjacency with fixed-size sampling: q = m / n would publish the private n; use"
                         " Poisson sampling (`sample_rate`) or adjacency='replace_one'.")


@functools.lru_cache(maxsize=4096)
def noisy_mean_epsilon(noise_multiplier: float, delta: float, sample_rate: float = 1.0,
                       adjacency: str = "replace_one", sampling: str = "fixed") -> float:
    """Epsilon at ``delta`` of ONE noisy-mean release with noise multiplier z (std of the sum's noise over C) and
    sampling probability ``sample_rate`` (q = m / n for ``"fixed"``, the Poisson rate, 1 for ``"none"``).

    dp-accounting's PLD of the dominating pair (module docstring), pessimistic (an upper bound up to the truncated
    tail mass), in two passes: a coarse grid sized by the plain Gaussian's scale, then a grid of
    ``1e-3 * epsilon`` (a fixed 1e-4 grid takes seconds at z ~ 1 and is far too coarse for tiny epsilons).
    ``inf`` when z = 0.
    """
    _check_accounting(noise_multiplier, delta, sample_rate, adjacency, sampling)
    if noise_multiplier == 0:
        return math.inf
    shift, relation = _pair(adjacency, sampling)
    q = 1.0 if sampling == "none" else float(sample_rate)

    def epsilon_on_grid(interval: float) -> float:
        pld = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=noise_multiplier, sensitivity=shift, sampling_prob=q,
            value_discretization_interval=interval, neighboring_relation=relation)
        return max(0.0, float(pld.get_epsilon_for_delta(delta)))

    scale = shift**2 / (2 * noise_multiplier**2) + 5 * shift / noise_multiplier  # ~ the unsampled Gaussian's epsilon
    coarse_interval = max(1e-2, 1e-3 * scale)
    coarse = epsilon_on_grid(coarse_interval)
    fine_interval = max(_PLD_MIN_INTERVAL, _PLD_RTOL * coarse)
    return coarse if fine_interval >= coarse_interval else epsilon_on_grid(fine_interval)


@functools.lru_cache(maxsize=1024)
def calibrate_noisy_mean(target_epsilon: float, delta: float, sample_rate: float = 1.0,
                         adjacency: str = "replace_one", sampling: str = "fixed", rtol: float = 1e-3) -> float:
    """Smallest noise multiplier z (to a factor 1 + ``rtol``) whose release spends at most ``target_epsilon``:
    bisection in log z on :func:`noisy_mean_epsilon`, which decreases in z. ``target_epsilon = inf`` gives 0."""
    if not target_epsilon > 0:
        raise ValueError(f"`target_epsilon` must be > 0 (math.inf: no noise), got {target_epsilon!r}.")
    if math.isinf(target_epsilon):
        return 0.0

    def fits(z: float) -> bool:
        return noisy_mean_epsilon(z, delta, sample_rate, adjacency, sampling) <= target_epsilon

    lo, hi = 1.0, 1.0  # find fits(hi) and not fits(lo)
    if fits(hi):
        while fits(lo):
            hi, lo = lo, lo / 2
            if lo < 1e-4:
                raise ValueError(f"target_epsilon={target_epsilon!r} is met by any noise multiplier >= {hi:g}; "
                                 "use target_epsilon=math.inf for no noise.")
    else:
        while not fits(hi):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ValueError(f"target_epsilon={target_epsilon!r} at delta={delta!r} needs a noise multiplier "
                                 "above 1e6; raise the target or delta.")
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _adjacency(value: str) -> str:
    canonical = str(value).replace("-", "_").replace("/", "_")
    if canonical not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be 'replace-one' or 'add-remove' (or {ADJACENCIES}), got {value!r}.")
    return canonical


class NoisyMeanMechanism:
    """One release of the noisy mean of C-normalised rows (module docstring: release, adjacency, accounting).

    Args:
        norm: C, the norm every row is normalised to (public, e.g. the typical norm of the vocabulary's tokens).
        sample_size: m, rows drawn without replacement (replace-one only; q = m / n).
        sample_rate: q, Poisson sampling rate. Neither: no subsampling (m = n under replace-one).
        noise_multiplier: z (the std of the sum's noise over C). Or ``target_epsilon`` (``math.inf``: no noise), the
            noise then calibrated at ``delta`` (for fixed-size sampling q = m / n needs the public n: lazily, per n).
        delta: the delta of the guarantee.
        adjacency: ``"replace-one"`` (n public) or ``"add-remove"`` (n private: Poisson or no sampling, and the
            divisor is ``expected_count``, a public figure).
        expected_count: the public divisor B under Poisson/no sampling (required under add/remove; replace-one with
            Poisson defaults to q n).
        renormalize: rescale the release to norm C (post-processing).
    """

    name: ClassVar[str] = "noisy-mean"
    title: ClassVar[str] = "Noisy-mean (DPAgg-TI) epsilon"

    def __init__(self, norm: float = 1.0, sample_size: int | None = None, sample_rate: float | None = None,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None, delta: float = 1e-5,
                 adjacency: str = "replace-one", expected_count: float | None = None,
                 renormalize: bool = False) -> None:
        if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not (norm > 0 and math.isfinite(norm)):
            raise ValueError(f"`norm` (C) must be a finite number > 0, got {norm!r}.")
        if sample_size is not None and sample_rate is not None:
            raise ValueError(f"Give one of `sample_size` (fixed size, got {sample_size!r}) and `sample_rate` "
                             f"(Poisson, got {sample_rate!r}), not both; neither means no subsampling.")
        if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, numbers.Integral)
                                        or sample_size < 1):
            raise ValueError(f"`sample_size` must be an int >= 1, got {sample_size!r}.")
        if sample_rate is not None and not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(f"Give exactly one of `noise_multiplier` (got {noise_multiplier!r}) and `target_epsilon`"
                             f" (got {target_epsilon!r}; math.inf for no noise).")
        if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"`noise_multiplier` must be finite and >= 0, got {noise_multiplier!r}.")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"`target_epsilon` must be > 0 (math.inf: no noise), got {target_epsilon!r}.")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
        adjacency = _adjacency(adjacency)
        if expected_count is not None and not (expected_count > 0 and math.isfinite(expected_count)):
            raise ValueError(f"`expected_count` must be finite and > 0, got {expected_count!r}.")
        if adjacency == "add_remove":
            if sample_size is not None:
                raise ValueError(f"sample_size={sample_size!r} under add/remove adjacency: q = m / n would publish the"
                                 " private n. Use sample_rate=q (Poisson) or adjacency='replace-one'.")
            if expected_count is None:
                raise ValueError("expected_count=None under add/remove adjacency: the divisor must be a public figure"
                                 " (e.g. q times a rounded, published size), never the private n.")
        elif sample_rate is None and expected_count is not None:
            raise ValueError(f"expected_count={expected_count!r} is the divisor of Poisson sampling; under replace-one"
                             " without `sample_rate` the divisor is the exact count m (or n).")
        self.norm = float(norm)
        self.sample_size = None if sample_size is None else int(sample_size)
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.adjacency = adjacency
        self.expected_count = None if expected_count is None else float(expected_count)
        self.renormalize = bool(renormalize)
        self.sampling = "fixed" if sample_size is not None else ("poisson" if sample_rate is not None else "none")
        self._public_n: int | None = None  # replace-one only: n of the last release (public under replace-one)

    # --- public figures of one release -------------------------------------------------------------------------
    def _needs_n(self) -> bool:
        """Does q, z or the divisor depend on n? (only under replace-one, where n is public)"""
        return self.adjacency == "replace_one" and (self.sampling != "poisson" or self.expected_count is None)

    def _n(self, n: int | None) -> int | None:
        if self.adjacency == "add_remove":
            return None  # never used, never kept
        n = self._public_n if n is None else n
        if n is None:
            if self._needs_n():
                raise ValueError("Under replace-one adjacency the public number of rows n is needed here (the sample "
                                 "rate m / n or the divisor); pass it, e.g. mech.epsilon(n).")
            return None
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"`n` (the number of rows) must be an int >= 1, got {n!r}.")
        if self.sample_size is not None and self.sample_size > n:
            raise ValueError(f"sample_size={self.sample_size} exceeds the n={n} rows; lower it to at most n.")
        return n

    def sampling_probability(self, n: int | None = None) -> float:
        """q: m / n (fixed size), the Poisson rate, or 1 (no subsampling)."""
        if self.sampling == "poisson":
            return float(self.sample_rate)  # type: ignore[arg-type]
        if self.sampling == "fixed":
            return self.sample_size / self._n(n)  # type: ignore[operator]
        return 1.0

    def divisor(self, n: int | None = None) -> float:
        """B, what the sum is divided by: m, n (replace-one, none), the public expected count (or q n)."""
        if self.expected_count is not None:
            return self.expected_count
        n = self._n(n)
        if self.sampling == "fixed":
            return float(self.sample_size)  # type: ignore[arg-type]
        return float(n) * (self.sample_rate if self.sampling == "poisson" else 1.0)  # type: ignore[operator]

    def calibrated_noise_multiplier(self, n: int | None = None) -> float:
        """z: the given noise multiplier, or the one calibrated to ``target_epsilon`` (cached by its arguments)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return calibrate_noisy_mean(self.target_epsilon, self.delta, self.sampling_probability(n), self.adjacency,
                                    self.sampling)

    def calibrate(self, n: int | None = None) -> float:
        """Calibrate (if ``target_epsilon`` was given) for ``n`` rows and return the noise std per coordinate."""
        return self.noise_std(n)

    def noise_std(self, n: int | None = None) -> float:
        """The std z C / B of the Gaussian added to each coordinate of the mean (``n`` ignored under add/remove)."""
        return self.calibrated_noise_multiplier(n) * self.norm / self.divisor(n)

    def epsilon(self, n: int | None = None, delta: float | None = None) -> float:
        """Epsilon of one release at ``delta`` (default ``self.delta``); ``n`` ignored under add/remove."""
        return noisy_mean_epsilon(self.calibrated_noise_multiplier(n), self.delta if delta is None else float(delta),
                                  self.sampling_probability(n), self.adjacency, self.sampling)

    # --- the release --------------------------------------------------------------------------------------------
    def normalize(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Rows rescaled to norm C, in float64; rows of norm 0 become C e_1 (public); non-finite rows refused."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] < 1:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"`embeddings` must be a tensor [n, d] with n >= 1, got {shape}.")
        if not embeddings.is_floating_point():
            raise TypeError(f"`embeddings` must be floating point, got {embeddings.dtype}.")
        rows = embeddings.detach().to(torch.float64)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"`embeddings` has {int((~finite).sum())} row(s) with NaN/inf; fix the per-image "
                             "inversion that produced them (the release refuses rather than guesses).")
        norms = rows.norm(dim=1, keepdim=True)
        public = torch.zeros_like(rows[:1])
        public[0, 0] = 1.0  # the fixed public unit vector e_1 for rows of norm 0
        unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(torch.float64).tiny), public)
        return self.norm * unit

    def release(self, embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """u* (Tensor[d], the input's dtype and device): normalise, subsample, average, add noise; the sample and
        the noise are drawn from ``generator`` (its device), which is not kept."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator (seeded from a secret seed), got "
                            f"{type(generator).__name__}.")
        rows = self.normalize(embeddings)
        n, d = rows.shape
        if self.adjacency == "replace_one":
            self._n(n)  # checks sample_size <= n
        std = self.noise_std(n)
        gen_device = generator.device
        if self.sampling == "fixed":
            picked = torch.randperm(n, generator=generator, device=gen_device)[: self.sample_size].to(rows.device)
            total = rows[picked].sum(dim=0)
        elif self.sampling == "poisson":
            keep = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) < self.sample_rate
            total = rows[keep.to(rows.device)].sum(dim=0)
        else:
            total = rows.sum(dim=0)
        noise = torch.randn(d, generator=generator, device=gen_device, dtype=torch.float64).to(rows.device)
        out = total / self.divisor(n) + std * noise  # u* = (sum_S u_i) / B + N(0, (z C / B)^2 I)
        if self.renormalize and bool(out.norm() > 0):
            out = self.norm * out / out.norm()  # post-processing
        if self.adjacency == "replace_one":
            self._public_n = n
        return out.to(dtype=embeddings.dtype)

    # --- public record (plpriv.privacy.mechanisms.Mechanism's conventions) -------------------------------------
    def record(self) -> dict[str, Any]:
        """Public constants (under add/remove nothing here depends on n; under replace-one the last release's n)."""
        rec: dict[str, Any] = {
            "mechanism": self.name, "adjacency": self.adjacency, "sampling": self.sampling, "norm": self.norm,
            "sample_size": self.sample_size, "sample_rate": self.sample_rate, "expected_count": self.expected_count,
            "noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon, "delta": self.delta,
            "renormalize": self.renormalize, "accountant": "dp_accounting PLD (pessimistic), one release",
        }
        if self.adjacency == "replace_one":
            rec["num_rows"] = self._public_n
        if self.adjacency == "add_remove" or self._public_n is not None or not self._needs_n():
            rec["noise_multiplier"] = self.calibrated_noise_multiplier()
            rec["noise_std"] = self.noise_std()
            rec["epsilon"] = self.epsilon()
        return rec

    def changes(self, state: dict[str, Any]) -> list[str]:
        """What differs between this mechanism and a saved record (``"key old -> new"``)."""
        return [f"{k} {state[k]!r} -> {v!r}" for k, v in self.record().items()
                if k != "mechanism" and k in state and state[k] != v]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in (
            ("norm", self.norm), ("sample_size", self.sample_size), ("sample_rate", self.sample_rate),
            ("noise_multiplier", self.noise_multiplier), ("target_epsilon", self.target_epsilon),
            ("delta", self.delta), ("adjacency", self.adjacency), ("expected_count", self.expected_count),
            ("renormalize", self.renormalize)) if v is not None)
        return f"{type(self).__name__}({args})"
