"""Server checkpoints: each server writes its shard through plait's atomic checkpoint module.

Layout: `<root>/server_<i>/step_<version>/` with `model.pt` (the shard and where it lies),
`optim.pt` (the shard's optimizer state) and `state.pt` (version, workers' clocks, config).
Servers write independently, so a checkpoint never waits on another server. On resume, sync
servers pick the newest version that every server has (they are in lock-step, so the restored
job is exactly the saved one); async/ssp servers each take their newest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from plait.errors import CheckpointError
from plait.parallel.parameter_server.server import ParameterServer
from plait.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def server_dir(root: str | Path, server_index: int) -> Path:
    return Path(root) / f"server_{server_index}"


def save_server(server: ParameterServer, root: str | Path, keep: int | None = None,
                config: dict[str, Any] | None = None) -> Path:
    """Write `server`'s state as checkpoint `version` under its folder of `root`."""
    st = server.state_dict()
    parts = {
        "model": {k: st[k] for k in ("shard", "bounds", "numel", "n_servers")},
        "optim": st["optim"],
        "state": {"version": st["version"], "clocks": st["clocks"], "mode": st["mode"],
                  "config": config or {}},
    }
    return save_checkpoint(server_dir(root, server.layout.server_index), server.version, parts, keep=keep)


def resume_point(root: str | Path, server_index: int, n_servers: int, mode: str) -> Path | None:
    """The checkpoint this server should resume from, or None when `root` holds none."""
    own = list_checkpoints(server_dir(root, server_index))
    if not own:
        return None
    if mode != "sync":
        return own[-1]
    common = set.intersection(*({int(p.name.split("_")[1]) for p in list_checkpoints(server_dir(root, s))}
                                for s in range(n_servers)))
    if not common:
        raise CheckpointError(f"{str(root)!r}: the {n_servers} servers have no checkpoint step in "
                              "common; a sync job resumes only from a step every server saved")
    return server_dir(root, server_index) / f"step_{max(common):08d}"


def restore_server(server: ParameterServer, path: str | Path) -> None:
    """Load a checkpoint written by :func:`save_server` (verified by checksum first)."""
    parts = load_checkpoint(path)
    missing = {"model", "optim", "state"} - set(parts)
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(sorted(missing))}")
    state = {**parts["model"], "optim": parts["optim"], **parts["state"]}
    try:
        server.load_state_dict(state, source=f"checkpoint {str(path)!r}")
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this server: {exc}") from None
    log.info("server %d resumed from %s at version %d", server.layout.rank, path, server.version)
