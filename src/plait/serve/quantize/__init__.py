"""Reduced-bit weights for serving: bf16, int8 (per output channel) and int4 (grouped) linear layers.

    plait quantize runs/tiny_gpt --weights int8 runs/tiny_gpt-int8
    plait generate runs/tiny_gpt-int8 --prompt "The list "
    plait serve runs/tiny_gpt --quantize int8          # quantized at load

:mod:`~plait.serve.quantize.linear` holds the layers, :mod:`~plait.serve.quantize.model` swaps
them into a model, :mod:`~plait.serve.quantize.store` saves and loads a quantized checkpoint
folder, :mod:`~plait.serve.quantize.runtime` plugs the layers into the serving engine's runner.
Kept free of imports: each submodule loads what it needs.
"""
