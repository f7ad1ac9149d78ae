"""GPT as an ordered list of pipeline layers: embedding, blocks, final norm + head.

The layers run the GPT's own submodules (after any tensor-parallel swap), so the head stays tied
to the token embedding when both land on one stage; when they land on different stages the
pipeline sums their gradients. The loss is the GPT's own `loss_fn` module, so a vocabulary-parallel
loss swapped in by the tensor-parallel plan is used as is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.models.layers import PipeLayer, PipelineSpec


class GPTEmbedding(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, C): token + position embeddings, dropout."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.block_size = gpt.cfg.block_size
        self.tok_emb, self.pos_emb, self.drop = gpt.tok_emb, gpt.pos_emb, gpt.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds model.block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


class GPTHead(nn.Module):
    """Hidden states -> logits: final LayerNorm and the (tied) output projection."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


class GPTLoss(nn.Module):
    """GPT.forward's loss on (logits, targets), through the model's own (swappable) loss module."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.loss_fn = gpt.loss_fn

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def gpt_pipeline_spec(gpt: nn.Module) -> PipelineSpec:
    """[embedding, block 0 .. block n-1, head] with analytic FLOPs per sample (as GPT.flops_per_token)."""
    c = gpt.cfg
    t, d = c.block_size, c.n_embd
    block_params = sum(p.numel() for p in gpt.blocks[0].parameters())
    layers = [PipeLayer("embedding", GPTEmbedding(gpt), ("tok_emb", "pos_emb", "drop"), 0.0)]
    for i, block in enumerate(gpt.blocks):
        layers.append(PipeLayer(f"blocks.{i}", block, (f"blocks.{i}",),
                                t * (6.0 * block_params + 12.0 * d * t)))
    layers.append(PipeLayer("head", GPTHead(gpt), ("ln_f", "head", "loss_fn"), t * 6.0 * d * c.vocab_size))

    def example_input(batch: int) -> torch.Tensor:
        return torch.zeros(batch, t, dtype=torch.long, device=gpt.tok_emb.weight.device)

    return PipelineSpec(layers, GPTLoss(gpt), example_input, first_block=1, num_blocks=c.n_layer,
                        example_target=example_input)
