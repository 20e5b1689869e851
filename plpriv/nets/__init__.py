"""Plain ``nn.Module`` networks (no Lightning imports)."""

from plpriv.nets.augment import NonLeakingAugment
from plpriv.nets.dp_attention import DPMultiheadAttention
from plpriv.nets.edm_precond import EDMLoss, EDMPrecond, edm_coefficients
from plpriv.nets.face_detector import FaceCenterNet
from plpriv.nets.itb import install_itbs, install_itbs_diffusers, sigma_from_timestep_fraction
from plpriv.nets.lora import ClassLoRA, CompositionalLoRA, ConditionalLoRA, TimeLoRA, apply_lora
from plpriv.nets.small_cnn import SmallCNN
from plpriv.nets.raunet import RAUNet, SigmaRoutedUNet
from plpriv.nets.songunet import SongUNet
from plpriv.nets.spn import RandomSPN, distill_to_tspn, fit_density
from plpriv.nets.ternary import ActivationQuantizer, TernaryConv2d, TernaryLinear, ternarize
from plpriv.nets.tspn import TensorSPN
from plpriv.nets.binary_baselines import BernoulliMixture, ChowLiuTree, IndependentBernoulli
from plpriv.nets.learnspn import LearnSPN
from plpriv.nets.variable_order import resolve_order

__all__ = ["ActivationQuantizer", "DPMultiheadAttention", "NonLeakingAugment", "FaceCenterNet", "TernaryConv2d", "TernaryLinear", "ternarize", "EDMLoss", "EDMPrecond", "SmallCNN", "SongUNet", "RAUNet", "SigmaRoutedUNet", "install_itbs", "install_itbs_diffusers", "sigma_from_timestep_fraction", "ClassLoRA", "CompositionalLoRA", "ConditionalLoRA", "TimeLoRA", "apply_lora", "edm_coefficients", "RandomSPN", "distill_to_tspn", "fit_density", "TensorSPN", "BernoulliMixture", "ChowLiuTree", "IndependentBernoulli", "LearnSPN", "resolve_order"]
