"""Checkpoints: atomic directories of tensors with a manifest of checksums.

Layout of one checkpoint, `<root>/step_00000100/`:

    manifest.json   format version, step, and the size and SHA-256 of every other file
    model.pt        the plain (unwrapped) model's state_dict
    optim.pt        the optimizer's state_dict
    state.pt        step, sampler position, per-rank RNG states, the config

It is written into a hidden temporary folder and renamed into place only when complete, so a
crash mid-write never leaves a half checkpoint under a real name, and the previous ones stay.
Saving a step that already has a folder swaps the two atomically (Linux `renameat2`
RENAME_EXCHANGE), so there is never a moment without a valid checkpoint of that step; a folder
that fails verification is never overwritten or deleted: it is renamed `step_<n>.damaged` and
kept for inspection. Loading verifies every checksum first: a truncated or altered file is
refused with :class:`CheckpointError`, never half-loaded.

A sharded checkpoint (:mod:`plait.train.sharded_checkpoint`) is the same kind of folder with a
torch.distributed.checkpoint inside instead of the .pt files (each rank's `__<rank>_0.distcp`,
DCP's `.metadata`, `state.pt`): one manifest, the same checks, publish and fallback.
:func:`load_checkpoint` reads either format into the gathered form.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from plait.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "plait-checkpoint/1"
SHARDED_FORMAT = "plait-sharded-checkpoint/1"
FORMATS = (FORMAT, SHARDED_FORMAT)
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

    An existing valid folder of the same step is replaced atomically; one that fails
    verification is set aside (see :func:`set_aside`), never overwritten. With `keep`, older
    checkpoints beyond the newest `keep` are deleted afterwards (newer folders are left alone).
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
            files[path.name] = file_entry(path)
        write_manifest(tmp, step, files)
        publish(tmp, root, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, step, keep)
    return final


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest entry: size and SHA-256 of one file."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, step: int, files: dict[str, dict[str, Any]], fmt: str = FORMAT) -> None:
    """Write (and fsync) the manifest of a complete temporary checkpoint folder."""
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": fmt, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def publish(tmp: Path, root: Path, step: int) -> Path:
    """Rename the complete folder `tmp` to `<root>/step_<n>`: atomically, over a valid folder of
    the same step (swapped), never over a damaged one (set aside first)."""
    final = root / f"step_{step:08d}"
    if final.exists():
        try:
            verify_checkpoint(final)
        except CheckpointError as exc:
            set_aside(final, str(exc))
    if final.exists():
        _replace_dir(tmp, final)  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    log.info("saved checkpoint %s", final)
    return final


def prune(root: Path, step: int, keep: int | None) -> None:
    """Delete checkpoints older than `step` beyond the newest `keep` (newer folders stay)."""
    if keep is not None:
        older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. a filesystem without RENAME_EXCHANGE
    raise OSError(err, f"cannot swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def _replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final` (an existing folder), leaving the old contents at `new`.

    Atomic where the OS can swap two paths; elsewhere the old folder is moved to `new`'s name
    first, so it is never deleted before the new one is in place.
    """
    if _exchange(new, final):
        return
    parked = new.with_name(new.name + "-old")
    os.replace(final, parked)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(parked, final)  # the old checkpoint goes back under its name
        raise
    os.replace(parked, new)


def set_aside(path: str | Path, reason: str = "") -> Path:
    """Rename a damaged checkpoint folder to `<name>.damaged` (or `.damaged-<i>`), keeping it.

    Checkpoint listing ignores the new name, so it is neither resumed from, overwritten nor
    pruned; what is in it stays for the user to inspect or repair.
    """
    path = Path(path)
    target = path.with_name(f"{path.name}.damaged")
    i = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{i}")
        i += 1
    os.replace(path, target)
    log.warning("checkpoint %s failed verification%s; kept as %s", path,
                f" ({reason})" if reason else "", target)
    return target


def checkpoint_step(path: str | Path) -> int:
    """The step of a `step_<n>` folder."""
    m = STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (step_<8 digits>)")
    return int(m.group(1))


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
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
            f"this version reads {' and '.join(map(repr, FORMATS))}"
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
    """Verify, then load every part of the checkpoint: {"model": ..., "optim": ..., "state": ...}.

    A sharded checkpoint is assembled here into the plain model's full state dict (no optimizer
    state: the trainer loads that shard by shard), for serving, export and generation.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    if manifest["format"] == SHARDED_FORMAT:
        return _load_sharded_full(path, map_location)
    parts = {}
    for name in manifest["files"]:
        try:
            parts[name.removesuffix(".pt")] = torch.load(path / name, map_location=map_location,
                                                         weights_only=True)
        except Exception as exc:  # checksum passed, so this is a foreign or incompatible file
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} cannot be loaded ({exc})") from None
    return parts


def _load_sharded_full(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The full model state dict of a (verified) sharded checkpoint, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        reader = dcp.FileSystemReader(str(path))
        meta = reader.read_metadata().state_dict_metadata
        full = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()
                if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
        with warnings.catch_warnings():  # read in one process, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(full, storage_reader=reader, no_dist=True)
    except Exception as exc:  # checksums passed, so this is a foreign or incompatible file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded ({exc})") from None
    keys = state.get("model_keys") or {k.removeprefix("model."): k.removeprefix("model.") for k in full}
    model = {k: full[f"model.{canon}"].to(map_location) for k, canon in keys.items()}
    return {"model": model, "state": state}


def checkpoint_format(path: str | Path) -> str | None:
    """The manifest's format of a checkpoint folder (unverified), or None without a readable one."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def newest_valid_checkpoint(root: str | Path) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The newest checkpoint under `root` that verifies, and each newer one refused, with why."""
    refused: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path, refused
        except CheckpointError as exc:
            refused.append((path, exc))
    return None, refused


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; corrupted newer ones are skipped with a warning."""
    path, refused = newest_valid_checkpoint(root)
    for _, exc in refused:
        log.warning("skipping %s", exc)
    return path
