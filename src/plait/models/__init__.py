"""Plain PyTorch models."""
from plait.models.gpt import GPT
from plait.models.mlp import MLPClassifier

__all__ = ["GPT", "MLPClassifier"]
