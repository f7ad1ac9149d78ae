"""Model shapes the planner reasons about: plait's GPT by its sizes, named or read from a config.

Parameter and FLOP counts here are closed forms of `plait.models.GPT` (pre-LayerNorm blocks,
learned positions, GELU MLP of 4× width, head tied to the token embedding); tests check them
against the built model. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import PlanError


@dataclass(frozen=True)
class ModelShape:
    """A GPT's sizes. `seq` is the training sequence length (the config's block_size)."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    seq: int
    vocab: int
    bias: bool = True
    dropout: float = 0.0
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def block_params(self) -> int:
        """One block: qkv 3h² and proj h² (attention), fc 4h² and proj 4h² (MLP), two norms."""
        h = self.n_embd
        biases = 3 * h + h + 4 * h + h if self.bias else 0
        norms = 2 * (2 * h if self.bias else h)
        return 12 * h * h + biases + norms

    def norm_params(self) -> int:
        return 2 * self.n_embd if self.bias else self.n_embd

    def embedding_params(self) -> int:
        return (self.vocab + self.seq) * self.n_embd

    def num_params(self) -> int:
        """All parameters, the tied head counted once (= GPT.num_params())."""
        return self.embedding_params() + self.n_layer * self.block_params() + self.norm_params()

    def flops_per_token(self, seq: int | None = None) -> float:
        """Model training FLOPs per token (= GPT.flops_per_token): 6 × parameters without the
        position table, plus 12 · L · h · s for attention scores and values (Kaplan et al. 2020,
        PaLM appendix B)."""
        s = seq or self.seq
        n = self.num_params() - self.seq * self.n_embd
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * s

    def hardware_flops_per_token(self, recompute: str, seq: int | None = None) -> float:
        """FLOPs the devices execute per token, recomputation included, as Narayanan et al. 2021
        count them (their eq. 3: full recomputation adds one forward of every block, i.e.
        96·B·s·l·h²·(1 + s/6h + V/16lh) per iteration)."""
        s = seq or self.seq
        extra = 0.0
        if recompute == "full":  # one more forward of each block: 2 × its weights + 4·h·s of attention
            extra = self.n_layer * (2.0 * self.block_params() + 4.0 * self.n_embd * s)
        elif recompute == "selective":  # only the attention core is replayed (Korthikanti et al. 2022)
            extra = self.n_layer * 4.0 * self.n_embd * s
        return self.flops_per_token(s) + extra


# GPT-2 BPE vocabulary (50,257) padded to 51,200, as Megatron-LM pads it (Narayanan et al. 2021 §5).
_VOCAB = 51200
_GPT3 = "Brown et al. 2020 (GPT-3), Table 2.1"
_PTD = "Narayanan et al. 2021 (Megatron-LM on GPU clusters), Table 1"

MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("gpt-125m", 12, 12, 768, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-350m", 24, 16, 1024, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-760m", 24, 16, 1536, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-1.3b", 24, 16, 2048, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-1.7b", 24, 24, 2304, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-2.7b", 32, 32, 2560, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-3.6b", 30, 32, 3072, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-6.7b", 32, 32, 4096, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-7.5b", 36, 32, 4096, 2048, _VOCAB, source=_PTD),
    # GPT-3's table lists d_model 5140 with 40 heads of 128; 5120 is the width that divides.
    ModelShape("gpt-13b", 40, 40, 5120, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-18b", 40, 48, 6144, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-39b", 48, 64, 8192, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-76b", 60, 80, 10240, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-145b", 80, 96, 12288, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-175b", 96, 96, 12288, 2048, _VOCAB, source=_GPT3),
    ModelShape("gpt-310b", 96, 128, 16384, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-530b", 105, 128, 20480, 2048, _VOCAB, source=_PTD),
    ModelShape("gpt-1t", 128, 160, 25600, 2048, _VOCAB, source=_PTD),
)}


def named_model(name: str) -> ModelShape:
    """The named GPT (gpt-125m … gpt-1t); PlanError lists the names when it is unknown."""
    key = name.strip().lower()
    if key not in MODELS:
        raise PlanError(f"model {name!r} is unknown; valid: {', '.join(MODELS)} (or a plait config file)")
    return MODELS[key]


def shape_from_config(model_cfg, name: str = "config") -> ModelShape:
    """The shape of a `plait.config.ModelConfig` (any object with its fields)."""
    if getattr(model_cfg, "arch", "gpt") != "gpt":
        raise PlanError(f"model.arch={model_cfg.arch!r}: the planner models the GPT only")
    return ModelShape(name, model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd,
                      model_cfg.block_size, model_cfg.vocab_size, bias=model_cfg.bias,
                      dropout=model_cfg.dropout)
