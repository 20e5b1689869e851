"""LightningModules, one per paper."""

from plpriv.modules.classifier import ImageClassifier
from plpriv.modules.edm import EDM
from plpriv.modules.tspn import TSPN

__all__ = ["EDM", "ImageClassifier"]
