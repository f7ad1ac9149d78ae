"""The output projection and cross-entropy in one pass over row chunks, without whole logits.

A language model's logits are (tokens × vocabulary): for GPT-2's vocabulary at 16k tokens a step,
3.3 GB in float32, and the plain loss keeps several such tensors alive at once (the projection's
output, its float32 copy, log-softmax's output saved for backward). Here each chunk of rows is
projected, turned into its loss and, in the same pass, into its gradients with respect to the
hidden states and the projection weight (softmax minus one-hot), so at most one chunk's logits
exist at a time and backward only scales the stored gradients. No matmul is recomputed: the
FLOPs are those of the plain loss (the forward's product and backward's two).

The arithmetic follows the plain loss under autocast: the products run in the autocast dtype,
logits and softmax in float32, the weight's gradient accumulates in float32 across chunks.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        n = hidden.size(0)
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen above
            for start in range(0, n, chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                y = targets[start:start + chunk_rows]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                # d(summed loss)/d(logits) = softmax − one-hot, computed in place of the logits
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(y.numel(), device=y.device), y] -= 1.0
                g = grad_logits.to(dtype)
                grad_hidden[start:start + chunk_rows] = g @ w
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.hidden_dtype, ctx.weight_dtype = n, hidden.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.n
        gh = (grad_hidden.float() * scale).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None


@torch.compiler.disable  # eager inside a compiled model: a loop of in-place chunk updates
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden` (N, C) projected by `weight` (V, C) against `targets` (N,),
    computed `chunk_rows` rows at a time; the same value and gradients as
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be ≥ 1")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
