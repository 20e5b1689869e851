from plpriv.metrics.hessian import HessianScores, conditional_hessian_score, hessian_scores, log_density_hessian_eigs
