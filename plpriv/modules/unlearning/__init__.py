"""Machine unlearning from an original classifier: COLA (Jeon et al., arXiv 2405.17878) and the standard baselines."""

from plpriv.modules.unlearning.base import FlaggedSubset, UnlearningModule
from plpriv.modules.unlearning.evaluation import (
    average_gap,
    forget_vs_unseen_auc,
    loss_threshold_mia,
    mia_efficacy,
    relearn_probe,
    relearn_trials,
    roc_auc,
    unlearning_metrics,
)
from plpriv.modules.unlearning.methods import (
    COLA,
    FT,
    GA,
    METHODS,
    RL,
    SCRUB,
    HeadDistillation,
    L1Sparse,
    Retrain,
    SalUn,
    supcon_loss,
)

__all__ = [
    "COLA", "FT", "GA", "METHODS", "RL", "SCRUB", "FlaggedSubset", "HeadDistillation", "L1Sparse", "Retrain",
    "SalUn", "UnlearningModule", "average_gap", "forget_vs_unseen_auc", "loss_threshold_mia", "mia_efficacy",
    "relearn_probe", "relearn_trials", "roc_auc", "supcon_loss", "unlearning_metrics",
]
