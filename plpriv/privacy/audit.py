"""Empirical privacy auditing: epsilon lower bounds from membership-inference outcomes.

Pure math (numpy + scipy), no Lightning. Three estimators:

* Clopper-Pearson (Jagielski et al. 2020; Nasr et al. 2021): from FP/FN counts over models trained without / with
  a canary, any (eps, delta)-DP mechanism satisfies FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta.
  Plugging in one-sided Clopper-Pearson upper bounds (each at level beta/2, union bound -> joint 1 - beta) gives
  eps_LB = max(ln((1 - delta - FPR+) / FNR+), ln((1 - delta - FNR+) / FPR+)).
* GDP variant (Nasr et al. 2023, "Tight auditing"): mu_LB = Phi^-1(1 - FPR+) - Phi^-1(FNR+), converted to eps at
  delta through the mu-GDP privacy profile delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
  (Dong, Roth, Su 2019, Cor. 2.13). Tighter, but assumes a Gaussian trade-off curve.
* One-run audit (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run"): m canaries, each
  included with probability 1/2; guess IN / OUT on the k+ most / k- least member-like scores; r guesses, v correct.
  Under eps-DP, P[v correct] is dominated by Binomial(r, e^eps / (1 + e^eps)) (their Thm. 3.1); under
  (eps, delta)-DP the tail gains 2 m delta * alpha (their Sec. 5 / App. D p-value). eps_LB is the largest eps whose
  null hypothesis is rejected at level beta = 1 - confidence.

Score convention everywhere: lower score = more likely IN (e.g. the canary's loss); pass ``higher_is_in=True`` for
scores where higher means member (e.g. logit margin, likelihood ratio).

Many-model audits should go through :func:`estimate`: it chooses the threshold with the estimator's own objective
on *reference* models and computes the bound on disjoint *evaluation* models, and refuses to run when a model id
appears in both (taking the best threshold on the evaluation models themselves inflates the bound; see
``ASSUMPTIONS`` for what each estimator assumes).

This module re-exports the public names of its parts, one concern each: :mod:`~plpriv.privacy.audit_checks` (input
checks), :mod:`~plpriv.privacy.audit_binomial` (Clopper-Pearson rate bounds), :mod:`~plpriv.privacy.audit_threshold`
(counts, thresholds, the Clopper-Pearson epsilon), :mod:`~plpriv.privacy.audit_gdp` (GDP),
:mod:`~plpriv.privacy.audit_estimate` (reference / evaluation estimators) and :mod:`~plpriv.privacy.audit_one_run`.
"""

from plpriv.privacy.audit_binomial import clopper_pearson_lower, clopper_pearson_upper
from plpriv.privacy.audit_checks import ArrayLike
from plpriv.privacy.audit_estimate import (
    ASSUMPTIONS,
    ESTIMATORS,
    EstimateResult,
    ScoreSplit,
    estimate,
    selection_objective,
)
from plpriv.privacy.audit_gdp import (
    gaussian_mu_estimate,
    gdp_delta,
    gdp_epsilon_lower_bound,
    gdp_mu_interval,
    gdp_mu_lower_bound,
    gdp_mu_to_epsilon,
)
from plpriv.privacy.audit_one_run import OneRunResult, one_run_audit, one_run_epsilon_lower_bound, one_run_p_value
from plpriv.privacy.audit_threshold import (
    AuditResult,
    Objective,
    audit_counts,
    audit_scores,
    epsilon_lower_bound,
    select_threshold,
)

__all__ = [
    "ASSUMPTIONS",
    "ESTIMATORS",
    "AuditResult",
    "EstimateResult",
    "ScoreSplit",
    "OneRunResult",
    "audit_counts",
    "audit_scores",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "estimate",
    "epsilon_lower_bound",
    "gdp_delta",
    "gdp_epsilon_lower_bound",
    "gaussian_mu_estimate",
    "gdp_mu_interval",
    "gdp_mu_lower_bound",
    "gdp_mu_to_epsilon",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "select_threshold",
    "selection_objective",
    "ArrayLike",  # type aliases of the signatures
    "Objective",
]
