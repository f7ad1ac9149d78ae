"""Checkpoints: atomic directories of tensors with a manifest of checksums.

Layout of one checkpoint, `<root>/step_00000100/`:

    manifest.json   format version, step, and the size and SHA-256 of every other file
    model.pt        the plain (unwrapped) model's state_dict
    optim.pt        the optimizer's state_dict
    state.pt        step, sampler position, per-rank RNG states, the config

It is written into a hidden temporary folder and renamed into place only when complete, so a
crash mid-write never leaves a half checkpoint under a real name, and the previous ones stay.
Loading verifies every checksum first: a truncated or altered file is refused with
:class:`CheckpointError`, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from plait.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "plait-checkpoint/1"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, parts: dict[str, Any], keep: int | None = None) -> Path:
    """Write `parts` (name -> object for torch.save) as checkpoint `step` under `root`, atomically.

    With `keep`, older checkpoints beyond the newest `keep` are deleted afterwards.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
    try:
        files = {}
        for name, obj in parts.items():
            path = tmp / f"{name}.pt"
            buf = io.BytesIO()
            torch.save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": FORMAT, "step": step, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", final)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def verify_checkpoint(path: str | Path) -> dict:
    """Check the manifest and every file's size and checksum; returns the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {MANIFEST}; it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} is corrupted ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
            f"this version reads {FORMAT!r}"
        )
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {name} is {size} bytes, the manifest says {meta['bytes']} "
                "(truncated or overwritten)"
            )
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} fails its SHA-256 check (corrupted)")
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load every part of the checkpoint: {"model": ..., "optim": ..., "state": ...}."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    parts = {}
    for name in manifest["files"]:
        try:
            parts[name.removesuffix(".pt")] = torch.load(path / name, map_location=map_location,
                                                         weights_only=True)
        except Exception as exc:  # checksum passed, so this is a foreign or incompatible file
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} cannot be loaded ({exc})") from None
    return parts


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; corrupted newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping %s", exc)
    return None
