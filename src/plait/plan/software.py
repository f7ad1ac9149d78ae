"""What the software does, as far as the cost model needs it: one profile per implementation.

The planner predicts plait's own runs with `PLAIT`. Published results were produced by other
software, whose kernels and schedules differ in ways that change the time (Megatron-LM in 2021
had no fused attention: FlashAttention came in 2022); `MEGATRON_2021` describes that software so
its published figures can be held against the same cost model. A profile holds facts about an
implementation, never a fitted number.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Software:
    name: str
    attention: str            # "flash": one fused kernel, O(s) memory; "unfused": scores materialised
    fused_bias_dropout_add: bool  # one kernel for dropout + residual add (Megatron's fusion)
    residual_fp32: bool       # autocast keeps the residual stream (embeddings, norms, adds) in fp32
    dp_overlap: bool          # gradient reduction overlapped with the last backward (GPUs only)
    zero_with_pp: bool        # ZeRO sharding combines with pipeline stages
    sequence_parallel: bool   # Megatron sequence parallelism is available
    pipeline_scatter_gather: bool  # pipeline sends split over the tp ranks (Narayanan et al. 2021 §4.1)
    sp_copies: bool           # sequence-parallel collectives copy (batch-first activations: the
                              # sequence is not the leading dimension the collectives split)
    schedules: tuple[str, ...]
    partition: str            # pipeline cut: "even" (blocks split evenly), else the layout's own
    # Bytes per parameter held: weights, gradients, optimizer state (master copy + Adam moments).
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    weight_copy_bytes: int    # low-precision weight copies held during the step (autocast's cache)
    optimizer_bytes_moved: int  # bytes read + written per parameter by one optimizer step (GPU)
    validate_with_config: bool  # candidates must pass plait's own config rules


# plait: fp32 parameters under bf16 autocast (torch.autocast caches bf16 weight copies per
# forward), fused AdamW on CUDA (reads p, g, m, v and writes p, m, v: 28 B/param), SDPA attention
# (FlashAttention kernels on GPU and CPU), the bucketed reducer overlapping the last backward.
PLAIT = Software(
    name="plait", attention="flash", fused_bias_dropout_add=False, residual_fp32=True,
    dp_overlap=True, zero_with_pp=False, sequence_parallel=True, pipeline_scatter_gather=False, sp_copies=True,
    schedules=("gpipe", "1f1b", "interleaved"), partition="layout",
    param_bytes=4, grad_bytes=4, optim_bytes=8, weight_copy_bytes=2, optimizer_bytes_moved=28,
    validate_with_config=True,
)

# Megatron-LM as Narayanan et al. 2021 ran it: fp16 weights with fp32 master weights and fp32
# gradient accumulation (2 + 4 + 12 B/param), unfused attention with a fused scale-mask-softmax,
# fused bias-dropout-add, gradients all-reduced after the pipeline flush (not overlapped), the
# scatter/gather optimisation of pipeline sends (§4.1), blocks split evenly over stages, apex's
# fused Adam (one pass: 30 B/param moved), no sequence parallelism (Korthikanti et al. 2022 came
# later).
MEGATRON_2021 = Software(
    name="megatron-2021", attention="unfused", fused_bias_dropout_add=True, residual_fp32=False,
    dp_overlap=False, zero_with_pp=False, sequence_parallel=False, pipeline_scatter_gather=True, sp_copies=False,
    schedules=("1f1b", "interleaved"), partition="even",
    param_bytes=2, grad_bytes=4, optim_bytes=12, weight_copy_bytes=0, optimizer_bytes_moved=30,
    validate_with_config=False,
)

SOFTWARE = {s.name: s for s in (PLAIT, MEGATRON_2021)}
