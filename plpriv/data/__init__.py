"""LightningDataModules with seeded splits, optional duplication of chosen training images, resumable shuffling."""

from plpriv.data.base import EpochSeededRandomSampler, ImageDataModule
from plpriv.data.binary_density import BinaryDensityDataModule
from plpriv.data.crossed_digits import CrossedDigitsDataModule  # censored sampling (issue 26)
from plpriv.data.embedded import DigitsDataModule, LFWFacesDataModule
from plpriv.data.federated import FederatedDigits
from plpriv.data.face_scenes import FaceScenesDataModule
from plpriv.data.files import ImageFolderDataModule, TorchvisionDataModule

__all__ = [
    "CrossedDigitsDataModule",
    "DigitsDataModule",
    "EpochSeededRandomSampler",
    "FederatedDigits",
    "FaceScenesDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "LFWFacesDataModule",
    "TorchvisionDataModule",
]
