"""Exporting plait checkpoints to other runtimes' formats: Hugging Face (:mod:`plait.export.hf`),
ONNX with optional int8 weights for ONNX Runtime (:mod:`plait.export.onnx`) and ExecuTorch
(:mod:`plait.export.executorch`); `plait export` is :mod:`plait.export.command`.

Kept free of imports so that listing the package costs nothing; each format loads its own
dependencies when used.
"""
