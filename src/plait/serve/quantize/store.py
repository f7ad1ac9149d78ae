"""A quantized checkpoint folder: written atomically, verified by checksums before it is read.

Layout (the conventions of :mod:`plait.train.checkpoint`, under its own format name so that code
reading float checkpoints refuses it by name instead of failing on its tensors):

    manifest.json   {"format": "plait-quantized/1", "step", "files": {name: {"bytes", "sha256"}}}
    model.pt        the quantized model's state dict (int8 / packed int4 / bf16 weights, scales)
    state.pt        {"config": the run's config, "step", "quantization": {"weights", "group_size", "source"}}

The folder is written under a temporary name beside the target and renamed into place when
complete; an existing target is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from plait.config import Config
from plait.errors import CheckpointError, ConfigError
from plait.models.gpt import GPT
from plait.serve.quantize.linear import DEFAULT_GROUP_SIZE, check_scheme
from plait.serve.quantize.model import group_size_of, prepare_empty, scheme_of

log = logging.getLogger(__name__)

FORMAT = "plait-quantized/1"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def is_quantized_folder(path: str | Path) -> bool:
    """Whether `path` holds a manifest naming this format (nothing verified yet)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def save_quantized(model: GPT, config: Config, out: str | Path, step: int = 0, source: str = "") -> Path:
    """Write quantized `model` (with the run `config` it was trained under) as folder `out`."""
    out = Path(out)
    weights = scheme_of(model)
    if weights is None:
        raise ConfigError("the model has no quantized layers; quantize it first (quantize_model)")
    if out.exists():
        raise CheckpointError(f"{str(out)!r} already exists; pass a new folder to write the quantized checkpoint to")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        info = {"weights": weights, "group_size": group_size_of(model), "source": source}
        files = {}
        for name, obj in (("model.pt", model.state_dict()),
                          ("state.pt", {"config": config.to_dict(), "step": step, "quantization": info})):
            buf = io.BytesIO()
            torch.save(obj, buf)
            files[name] = _write(tmp / name, buf.getvalue())
        manifest = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)
        _write(tmp / MANIFEST, manifest.encode())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint %s", weights, out)
    return out


def verify_quantized(path: str | Path) -> dict:
    """Check the manifest and every file's size and checksum; returns the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"quantized checkpoint {str(path)!r} does not exist or is not a folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"quantized checkpoint {str(path)!r} has no {MANIFEST}; it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"quantized checkpoint {str(path)!r}: {MANIFEST} is corrupted ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{str(path)!r} is not a quantized checkpoint of format {FORMAT!r}")
    for name in ("model.pt", "state.pt"):
        if name not in manifest["files"]:
            raise CheckpointError(f"quantized checkpoint {str(path)!r}: its manifest lists no {name}")
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"quantized checkpoint {str(path)!r} is missing {name}")
        if f.stat().st_size != meta.get("bytes"):
            raise CheckpointError(f"quantized checkpoint {str(path)!r}: {name} is {f.stat().st_size} bytes, the "
                                  f"manifest says {meta.get('bytes')} (truncated or overwritten)")
        if _sha256(f) != meta.get("sha256"):
            raise CheckpointError(f"quantized checkpoint {str(path)!r}: {name} fails its SHA-256 check (corrupted)")
    return manifest


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(the quantized GPT in eval mode, the folder's state: config, step, quantization)."""
    path = Path(path)
    verify_quantized(path)
    try:
        model_state = torch.load(path / "model.pt", map_location=device, weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # checksums passed, so this is a foreign or incompatible file
        raise CheckpointError(f"quantized checkpoint {str(path)!r} cannot be loaded ({exc})") from None
    try:
        cfg = Config.from_dict(state["config"])
        info = state["quantization"]
        weights = check_scheme(info["weights"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"quantized checkpoint {str(path)!r} carries no usable config or format: {exc}") from None
    if cfg.model.arch != "gpt":
        raise CheckpointError(f"{str(path)!r} holds a model.arch={cfg.model.arch!r} model; serving reads GPTs")
    model = prepare_empty(GPT(cfg.model), weights, info.get("group_size") or DEFAULT_GROUP_SIZE)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"quantized checkpoint {str(path)!r} does not fit the model its config describes: "
                              f"{exc}") from None
    return model.to(device).eval(), state
