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
from plpriv.privacy.ledger import EpsilonLedger
from plpriv.privacy.per_sample import PerSampleHooks
from plpriv.privacy.poisson import sampler_support
from plpriv.privacy.secret_file import read_secret, secret_path, write_secret
from plpriv.privacy.validation import check_loss_modules, fix_modules, private_roots, validate_modules
from plpriv.privacy.sparsified_gaussian import SparsifiedGaussianAccountant, SparsifiedGaussianMechanism, sparsified_gaussian_epsilon
from plpriv.privacy.adjacency import ADJACENCIES, PublicRate, public_rate, replace_one_epsilon
from plpriv.privacy.contract import PrivateTraining, PrivateTrainingAware, PublicBatch, find_private_training
from plpriv.privacy.engine import DPEngine
from plpriv.privacy.independence import IndependenceProbe
from plpriv.privacy.mechanisms import GaussianMechanism, Mechanism
from plpriv.privacy.noisy_mean import NoisyMeanMechanism, calibrate_noisy_mean, noisy_mean_epsilon
from plpriv.privacy.noisy_mean_audit import NoisyMeanAudit, audit_noisy_mean, worst_case_neighbours
from plpriv.privacy.sparsified_gaussian import SparsifiedMechanism
from plpriv.privacy.world import World
