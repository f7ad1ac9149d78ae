"""Exporting plait checkpoints to other runtimes' formats (Hugging Face: :mod:`plait.export.hf`).

Kept free of imports so that listing the package costs nothing; each format loads its own
dependencies when used.
"""
