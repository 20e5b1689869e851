"""Estimators with a reference / evaluation split (the many-model audit): the threshold is chosen with the
estimator's own objective on *reference* models and the bound computed on disjoint *evaluation* models; a model id in
both splits is refused (the best threshold on the evaluation models themselves inflates the bound)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from plpriv.privacy.audit_binomial import cp_upper
from plpriv.privacy.audit_checks import check_confidence, check_delta, check_scores
from plpriv.privacy.audit_gdp import gdp_mu_interval, gdp_mu_to_epsilon, mu_from_rates
from plpriv.privacy.audit_threshold import AuditResult, audit_counts, audit_scores, eps_from_rates, select_threshold

__all__ = ["ASSUMPTIONS", "ESTIMATORS", "EstimateResult", "ScoreSplit", "estimate", "selection_objective"]

ESTIMATORS: tuple[str, ...] = ("gdp", "clopper_pearson")

#: What each estimator's bound assumes (the report prints these next to the numbers).
ASSUMPTIONS: dict[str, str] = {
    "clopper_pearson": (
        "Clopper-Pearson (Jagielski et al. 2020): valid for any (eps, delta)-DP mechanism; assumes only that the"
        " evaluation models are independent runs of the training pipeline and that the threshold was fixed without"
        " them. Conservative: with n models per side it cannot certify more than ln(n / 3.7) or so."
    ),
    "gdp": (
        "GDP (Nasr et al. 2023): the mu of the Gaussian trade-off curve through the attack's (FPR, FNR) point,"
        " converted to eps at delta through the mu-GDP privacy profile. It assumes the mechanism's trade-off curve is"
        " Gaussian, which holds for full-batch DP-GD (q = 1: a composition of Gaussian mechanisms, exactly"
        " sqrt(T)/sigma-GDP) and is only an approximation with Poisson subsampling (q < 1). mu_lower is a valid lower"
        " bound on the GDP parameter of any mechanism; the eps conversion is the assumption."
    ),
}


def selection_objective(estimator: str, delta: float, confidence: float = 0.95) -> Callable[[int, int, int, int], float]:
    """The objective an estimator's threshold is chosen with on the reference models: its own bound first.

    ``gdp``: mu_lower (monotone in the GDP eps at any delta); ``clopper_pearson``: the Clopper-Pearson eps, with
    mu_lower breaking the tie where a small reference split certifies 0 at every threshold. Youden's J
    (1 - FPR - FNR) breaks the remaining ties, instead of the smallest candidate.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    delta = check_delta(delta)
    confidence = check_confidence(confidence)
    half_beta = (1.0 - confidence) / 2.0

    def objective(fp: Any, fn: Any, n_out: int, n_in: int) -> Any:
        """Scalars -> float; arrays of counts -> array (``select_threshold`` calls it once for all candidates)."""
        scalar = np.ndim(fp) == 0 and np.ndim(fn) == 0
        fp, fn = np.asarray(fp, dtype=np.float64), np.asarray(fn, dtype=np.float64)
        fpr_u, fnr_u = cp_upper(fp, n_out, half_beta), cp_upper(fn, n_in, half_beta)
        value = 1e3 * mu_from_rates(fpr_u, fnr_u) + (1.0 - fp / n_out - fn / n_in)
        if estimator == "clopper_pearson":
            eps_a, eps_b = eps_from_rates(fpr_u, fnr_u, delta)
            value = value + 1e6 * np.maximum(np.maximum(eps_a, eps_b), 0.0)
        return float(value) if scalar else value

    objective.vectorized = True  # type: ignore[attr-defined]
    return objective


@dataclass(frozen=True)
class ScoreSplit:
    """Scores of one split of models: IN (trained with the canary) and OUT, each model named by a hashable id."""

    scores_in: np.ndarray
    scores_out: np.ndarray
    ids_in: tuple[Any, ...]
    ids_out: tuple[Any, ...]

    def __post_init__(self) -> None:
        s_in = check_scores("scores_in", self.scores_in)
        s_out = check_scores("scores_out", self.scores_out)
        ids_in, ids_out = tuple(self.ids_in), tuple(self.ids_out)
        if len(ids_in) != s_in.size or len(ids_out) != s_out.size:
            raise ValueError(
                f"one id per model: {len(ids_in)} ids for {s_in.size} IN scores, {len(ids_out)} for {s_out.size} OUT."
            )
        if len(set(ids_in + ids_out)) != len(ids_in) + len(ids_out):
            raise ValueError("A model id appears twice in one split (or as both IN and OUT).")
        object.__setattr__(self, "scores_in", s_in)
        object.__setattr__(self, "scores_out", s_out)
        object.__setattr__(self, "ids_in", ids_in)
        object.__setattr__(self, "ids_out", ids_out)

    @property
    def ids(self) -> set[Any]:
        return set(self.ids_in) | set(self.ids_out)


@dataclass(frozen=True)
class EstimateResult:
    """An estimator's bound: threshold from the reference split, counts and bound from the evaluation split.

    ``epsilon`` is the estimator's lower bound (Clopper-Pearson eps, or the GDP eps of ``mu_lower``);
    ``reference`` holds the counts at the chosen threshold on the reference split (a diagnostic, never a bound).
    ``max_certifiable`` is the estimator's bound for zero errors on the evaluation counts.
    """

    estimator: str
    assumption: str
    epsilon: float
    mu_lower: float
    mu_estimate: float
    mu_upper: float
    threshold: float
    higher_is_in: bool
    evaluation: AuditResult
    reference: AuditResult
    reference_objective: float
    max_certifiable: float

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evaluation"], out["reference"] = self.evaluation.as_dict(), self.reference.as_dict()
        return out


def estimate(
    reference: ScoreSplit,
    evaluation: ScoreSplit,
    delta: float,
    confidence: float = 0.95,
    *,
    estimator: str = "gdp",
    higher_is_in: bool = False,
) -> EstimateResult:
    """Threshold chosen with ``estimator``'s own objective on ``reference``, bound computed on ``evaluation``.

    Raises if a model id is in both splits: selecting the threshold on the models the bound is computed on (the
    max over thresholds on the evaluation set) is optimistic. ``estimator``: ``"gdp"`` or ``"clopper_pearson"``
    (``ASSUMPTIONS`` says what each assumes). ``delta`` > 0 for ``"gdp"`` (the conversion needs it).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    if not isinstance(reference, ScoreSplit) or not isinstance(evaluation, ScoreSplit):
        raise TypeError("`reference` and `evaluation` must be ScoreSplit objects (scores with model ids).")
    shared = reference.ids & evaluation.ids
    if reference is evaluation or shared:
        some = sorted(map(str, shared))[:5]
        raise ValueError(
            f"The threshold must be chosen on models disjoint from the evaluation models; {len(shared)} model(s) are"
            f" in both splits (e.g. {some}). Choosing it on the evaluation models inflates the bound."
        )
    delta = check_delta(delta, positive=estimator == "gdp")
    confidence = check_confidence(confidence)
    objective = selection_objective(estimator, delta, confidence)
    threshold = select_threshold(
        reference.scores_in, reference.scores_out, delta, confidence, higher_is_in=higher_is_in, objective=objective
    )
    ref = audit_scores(reference.scores_in, reference.scores_out, threshold, delta, confidence, higher_is_in=higher_is_in)
    ev = audit_scores(evaluation.scores_in, evaluation.scores_out, threshold, delta, confidence, higher_is_in=higher_is_in)
    lower, point, upper = gdp_mu_interval(ev.fp, ev.fn, ev.n_out, ev.n_in, confidence)
    best = audit_counts(0, 0, ev.n_out, ev.n_in, delta, confidence)
    if estimator == "gdp":
        eps, cap = gdp_mu_to_epsilon(lower, delta), float(best.epsilon_gdp)  # type: ignore[arg-type]
    else:
        eps, cap = ev.epsilon, best.epsilon
    return EstimateResult(
        estimator=estimator,
        assumption=ASSUMPTIONS[estimator],
        epsilon=float(eps),
        mu_lower=lower,
        mu_estimate=point,
        mu_upper=upper,
        threshold=float(threshold),
        higher_is_in=bool(higher_is_in),
        evaluation=ev,
        reference=ref,
        reference_objective=float(objective(ref.fp, ref.fn, ref.n_out, ref.n_in)),
        max_certifiable=float(cap),
    )
