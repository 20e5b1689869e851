"""LightningModules, one per paper."""

from plpriv.modules.censoring import RewardModel  # censored sampling's reward models (issue 26)
from plpriv.modules.classifier import ImageClassifier
from plpriv.modules.edm import EDM
from plpriv.modules.loyal import LoyalDiffusion, LoyalStableDiffusion
from plpriv.modules.face_detector import TernaryFaceDetector
from plpriv.modules.tspn import TSPN
from plpriv.modules.relu_budget import ReLUBudgetClassifier  # SENet ReLU budgets (issue 27)
from plpriv.modules.textual_inversion import TextualInversion  # textual inversion for EDM, DPAgg-TI (issue 30)
from plpriv.modules import unlearning  # COLA and the unlearning baselines (plpriv.modules.unlearning.COLA, ...)

__all__ = ["EDM", "LoyalDiffusion", "LoyalStableDiffusion", "TernaryFaceDetector", "ImageClassifier", "ReLUBudgetClassifier", "RewardModel", "TextualInversion"]
