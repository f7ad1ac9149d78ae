"""Hugging Face GPT-2 folders <-> plait's GPT: the same network under two names.

plait's GPT is GPT-2's architecture (pre-LayerNorm, tanh-approximated GELU, learned positions,
tied head), so conversion is renaming plus one transpose: Hugging Face stores its linear layers
as `Conv1D` with weights of shape (in, out), plait as `nn.Linear` with (out, in). A folder holds
`config.json` and the weights as safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) or a `pytorch_model.bin`. Reading and writing need only
`safetensors`; `transformers` itself is not imported here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from plait.config import ModelConfig
from plait.errors import CheckpointError
from plait.models.gpt import GPT

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_BIN = "pytorch_model.bin"

# Hugging Face Conv1D layers (weights stored transposed) and the plait Linear they become.
_LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
            "mlp.c_proj": "mlp.proj"}
_NORMS = {"ln_1": "ln1", "ln_2": "ln2"}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_hf_folder(path: str | Path) -> bool:
    """True when `path` is a folder with a Hugging Face `config.json` of model_type gpt2."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "gpt2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG) -> ModelConfig:
    """plait's ModelConfig for a GPT-2 `config.json`; refuses GPT-2 variants plait cannot run."""
    def need(key: str, ok: bool, valid: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: {key}={hf.get(key)!r} is not supported; valid: {valid}")

    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{where}: model_type={hf.get('model_type')!r}; only 'gpt2' is supported")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        need(key, isinstance(hf.get(key), int) and hf[key] >= 1, "a positive integer")
    need("activation_function", hf.get("activation_function", "gelu_new") in _GELU_TANH,
         ", ".join(_GELU_TANH) + " (tanh-approximated GELU)")
    need("n_inner", hf.get("n_inner") in (None, 4 * hf["n_embd"]), f"null or {4 * hf['n_embd']}")
    need("layer_norm_epsilon", abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "1e-05")
    need("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "true (the head is tied)")
    need("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true")
    need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false")
    need("add_cross_attention", not hf.get("add_cross_attention", False), "false")
    need("n_embd", hf["n_embd"] % hf["n_head"] == 0, f"a multiple of n_head={hf['n_head']}")
    return ModelConfig(arch="gpt", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       block_size=hf["n_positions"], vocab_size=hf["vocab_size"], dropout=0.0, bias=True)


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """A GPT2LMHeadModel `config.json` for a plait ModelConfig (no dropout: inference weights)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
        "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": "float32",
    }


def hf_state_dict_from_gpt(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensor names -> contiguous fp32 copies of `model`'s weights.

    The head is tied to the token embedding, so `lm_head.weight` is left out (Hugging Face ties it
    on load). A plait model without biases gets zero biases, which compute the same thing.
    """
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    c = model.cfg
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(c.n_embd))

    for i in range(c.n_layer):
        for hf_name, name in _NORMS.items():
            norm(f"blocks.{i}.{name}", f"transformer.h.{i}.{hf_name}")
        for hf_name, name in _LINEARS.items():
            w = sd[f"blocks.{i}.{name}.weight"]
            out[f"transformer.h.{i}.{hf_name}.weight"] = w.t()
            out[f"transformer.h.{i}.{hf_name}.bias"] = sd.get(f"blocks.{i}.{name}.bias",
                                                              torch.zeros(w.shape[0]))
    norm("ln_f", "transformer.ln_f")
    return {k: v.contiguous().clone() for k, v in out.items()}


def gpt_state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                           where: str = "weights") -> dict[str, torch.Tensor]:
    """plait GPT state dict from GPT-2 tensors (with or without the `transformer.` prefix)."""
    flat = {k.removeprefix("transformer."): v for k, v in tensors.items()}

    def get(name: str) -> torch.Tensor:
        if name not in flat:
            raise CheckpointError(f"{where}: tensor {name!r} is missing; not a complete GPT-2")
        return flat[name].float()

    sd = {"tok_emb.weight": get("wte.weight"), "pos_emb.weight": get("wpe.weight")}
    for i in range(cfg.n_layer):
        for hf_name, name in _NORMS.items():
            for part in ("weight", "bias"):
                sd[f"blocks.{i}.{name}.{part}"] = get(f"h.{i}.{hf_name}.{part}")
        for hf_name, name in _LINEARS.items():
            sd[f"blocks.{i}.{name}.weight"] = get(f"h.{i}.{hf_name}.weight").t().contiguous()
            sd[f"blocks.{i}.{name}.bias"] = get(f"h.{i}.{hf_name}.bias")
    for part in ("weight", "bias"):
        sd[f"ln_f.{part}"] = get(f"ln_f.{part}")
    sd["head.weight"] = sd["tok_emb.weight"]
    head = flat.get("lm_head.weight")
    if head is not None and not torch.equal(head.float(), sd["tok_emb.weight"]):
        raise CheckpointError(f"{where}: lm_head.weight differs from wte.weight; plait's GPT ties them")
    return sd


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading a Hugging Face folder needs safetensors: "
                                  "pip install 'plait[hf]'") from None
        files = [folder / WEIGHTS]
        if not files[0].is_file():
            index = json.loads((folder / WEIGHTS_INDEX).read_text())
            files = [folder / f for f in sorted(set(index.get("weight_map", {}).values()))]
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise CheckpointError(f"{str(f)!r} cannot be read as safetensors ({exc})") from None
        return tensors
    if (folder / WEIGHTS_BIN).is_file():
        try:
            return torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{str(folder / WEIGHTS_BIN)!r} cannot be loaded ({exc})") from None
    raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS}, {WEIGHTS_INDEX} or {WEIGHTS_BIN}")


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the GPT-2 folder at `path`."""
    cfg_path = Path(path) / CONFIG
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} has no {CONFIG}; pass a Hugging Face GPT-2 folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(cfg_path)!r} must hold a JSON object")
    return model_config_from_hf(raw, where=str(cfg_path))


def load_hf_gpt2(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A plait GPT (eval mode) with the weights of the GPT-2 folder at `path`."""
    folder = Path(path)
    cfg = read_hf_config(folder)
    model = GPT(cfg)
    load_hf_weights(model, folder)
    return model.to(device).eval()


def load_hf_weights(model: GPT, path: str | Path) -> None:
    """Copy the GPT-2 folder's weights into `model`, whose shape must match the folder's config."""
    folder = Path(path)
    theirs = read_hf_config(folder)
    ours = model.cfg
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(ours, name) != getattr(theirs, name):
            raise CheckpointError(f"model.{name}={getattr(ours, name)} does not match the GPT-2 folder "
                                  f"{str(folder)!r} ({getattr(theirs, name)}); set model.{name} to match")
    if not ours.bias:
        raise CheckpointError("model.bias=false cannot hold GPT-2 weights, which have biases; "
                              "set model.bias = true")
    sd = gpt_state_dict_from_hf(_read_tensors(folder), ours, where=str(folder))
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(sd, strict=False)
    # The loss module has no state; anything else missing would be a bug in the mapping.
    if missing or unexpected:
        raise CheckpointError(f"{str(folder)!r}: weights do not fit (missing {missing}, unexpected {unexpected})")
    log.info("loaded GPT-2 weights from %s", folder)


def save_hf_gpt2(model: GPT, path: str | Path) -> Path:
    """Write `model` as a GPT2LMHeadModel folder: `config.json` and `model.safetensors`."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("writing a Hugging Face folder needs safetensors: pip install 'plait[hf]'") from None
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict_from_gpt(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(hf_config_from_model(model.cfg), indent=2) + "\n")
    log.info("wrote GPT-2 folder %s", folder)
    return folder
