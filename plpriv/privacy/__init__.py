from plpriv.privacy.audit import (
    AuditResult,
    OneRunResult,
    audit_counts,
    audit_scores,
    epsilon_lower_bound,
    gdp_epsilon_lower_bound,
    gdp_mu_lower_bound,
    gdp_mu_to_epsilon,
    one_run_audit,
    one_run_epsilon_lower_bound,
    select_threshold,
)
from plpriv.privacy.accounting import calibrate_noise_multiplier, default_delta, epsilon, max_steps_within_budget
from plpriv.privacy.poisson import PoissonBatchSampler, PoissonDataLoader
