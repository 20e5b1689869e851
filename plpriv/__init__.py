"""plpriv: privacy-aware training on PyTorch Lightning."""

__version__ = "0.1.0"
