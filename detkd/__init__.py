"""detkd: knowledge distillation for object detectors."""

__version__ = "0.1.0"
