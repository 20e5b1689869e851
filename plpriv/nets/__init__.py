"""Plain ``nn.Module`` networks (no Lightning imports)."""

from plpriv.nets.edm_precond import EDMLoss, EDMPrecond, edm_coefficients
from plpriv.nets.face_detector import FaceCenterNet
from plpriv.nets.lora import ClassLoRA, CompositionalLoRA, ConditionalLoRA, TimeLoRA, apply_lora
from plpriv.nets.small_cnn import SmallCNN
from plpriv.nets.songunet import SongUNet
from plpriv.nets.spn import RandomSPN, distill_to_tspn, fit_density
from plpriv.nets.ternary import ActivationQuantizer, TernaryConv2d, TernaryLinear, ternarize
from plpriv.nets.tspn import TensorSPN

__all__ = ["ActivationQuantizer", "FaceCenterNet", "TernaryConv2d", "TernaryLinear", "ternarize", "EDMLoss", "EDMPrecond", "SmallCNN", "SongUNet", "ClassLoRA", "CompositionalLoRA", "ConditionalLoRA", "TimeLoRA", "apply_lora", "edm_coefficients"]
