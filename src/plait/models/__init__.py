"""Plain PyTorch models."""
from plait.models.gpt import GPT

__all__ = ["GPT"]
