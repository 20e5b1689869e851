"""LightningModules, one per paper."""

from plpriv.modules.classifier import ImageClassifier
from plpriv.modules.edm import EDM

__all__ = ["EDM", "ImageClassifier"]
