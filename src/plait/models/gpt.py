"""A plain GPT in one sitting: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied head.

No parallel code lives here. Strategies are applied afterwards by `plait.parallel.parallelize`, which
looks the model up by module names (`blocks.N.attn.qkv`, `blocks.N.mlp.fc`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.config import ModelConfig
from plait.models.fused_loss import linear_cross_entropy
from plait.models.layers import PipelineSpec


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sizes are read off the projection, so a tensor-parallel shard with fewer heads (or a
        # sequence-parallel input holding part of the sequence) runs the same code.
        qkv = self.qkv(x)
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer language model with GPT-2 initialisation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings
        # A module, so a parallel plan can swap in a loss that reads vocabulary-sharded logits.
        self.loss_fn = nn.CrossEntropyLoss()
        # > 0: forward with targets projects and scores this many rows at a time and returns no
        # logits (plait.models.fused_loss; train.loss_chunk_rows sets it).
        self.loss_chunk_rows = 0
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits of shape (B, T, vocab); with targets, (logits, mean cross-entropy loss), or
        (None, loss) when `loss_chunk_rows` is set."""
        _, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds model.block_size={self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        if targets is not None and self.loss_chunk_rows:
            h = self.ln_f(x)
            return None, linear_cross_entropy(h.reshape(-1, h.size(-1)), self.head.weight, targets.reshape(-1),
                                              self.loss_chunk_rows)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = self.loss_fn(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @staticmethod
    def plan() -> dict:
        """The tensor-parallel plan (Megatron-LM): module-name patterns -> styles.

        qkv and the MLP's first layer split by output (qkv per q, k and v, in whole heads), the
        projections after them by input; the embedding, head and loss split by vocabulary; norms
        and dropout between blocks split along the sequence under sequence parallelism.
        """
        return {
            "tok_emb": "vocab_embedding",
            "pos_emb": "position_embedding",
            "drop": "dropout",
            "blocks.*.ln1": "sequence_parallel",
            "blocks.*.attn": "heads",
            "blocks.*.attn.qkv": "column(fused=3)",
            "blocks.*.attn.proj": "row",
            "blocks.*.ln2": "sequence_parallel",
            "blocks.*.mlp.fc": "column",
            "blocks.*.mlp.proj": "row",
            "blocks.*.drop": "dropout",
            "ln_f": "sequence_parallel",
            "head": "vocab_head",
            "loss_fn": "vocab_loss",
        }

    def pipeline_spec(self) -> "PipelineSpec":
        """The layer list a pipeline cuts: [embedding, block 0 .. block n-1, final norm + head]."""
        from plait.models.gpt_layers import gpt_pipeline_spec  # its layers wrap this model's modules

        return gpt_pipeline_spec(self)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix and nanoGPT.

        6 × (non-embedding parameters, with the tied head counted once as a matmul) plus
        12 × layers × embedding × sequence for attention scores and values.
        """
        c = self.cfg
        t = seq_len or c.block_size
        n = self.num_params(exclude_embeddings=True)
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * t

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]
            logits = self(context)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
