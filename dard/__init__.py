"""DARD: Dice Adversarial Robustness Distillation."""
__version__ = "0.1.0"
