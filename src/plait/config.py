"""The run configuration: a tree of dataclasses loaded from TOML, with command-line overrides.

Every field is checked before any process starts: unknown keys, wrong types, values out of range
and sizes that do not divide all raise :class:`plait.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.errors import ConfigError


@dataclass
class ModelConfig:
    """A GPT's shape. vocab_size 256 matches the byte-level tokenizer."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True


@dataclass
class DataConfig:
    """Where the text comes from. An empty path means the built-in corpus (Python's own docs)."""

    path: str = ""
    val_fraction: float = 0.05
    cache_dir: str = ""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. The global batch is micro_batch_size × grad_accum × dp."""

    steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    out_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    """interval 0 saves only at the end; resume is "auto" (newest valid), "none", or a path."""

    interval: int = 0
    keep: int = 2
    resume: str = "auto"


@dataclass
class ParallelConfig:
    """Mesh sizes (dp 0 = all processes left after pp × tp) and the gradient reducer."""

    dp: int = 0
    pp: int = 1
    tp: int = 1
    reducer: str = "bucketed"
    bucket_mb: float = 25.0


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Build and type-check a config from nested dicts; see :func:`validate` for ranges."""
        return _build(cls, raw, prefix="")


# --- loading --------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or defaults when None), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    for item in overrides or []:
        apply_override(raw, item)
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` in a raw dict; the value is read as TOML, else as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.steps=100")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: {parts[0]!r} is not a section")
    section[parts[1]] = parsed


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a table (section), got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys in {name}: {', '.join(sorted(fields))}"
        )
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, prefix=f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**values)


def _coerce(value: Any, kind: type, name: str) -> Any:
    # bool is a subclass of int: refuse it where a number is meant, and vice versa.
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")


# --- validation -----------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
REDUCERS = ("bucketed", "naive")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check ranges and cross-field rules; with `world_size`, also the mesh product."""
    m, d, t, c, p = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.parallel
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        _check(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be ≥ 1")
    _check(m.n_embd % m.n_head == 0,
           f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    _check(m.vocab_size >= 256, f"model.vocab_size={m.vocab_size} must be ≥ 256 (byte tokenizer)")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _check(0.0 < d.val_fraction < 0.5, f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")
    for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches", "log_interval"):
        _check(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be ≥ 1")
    _check(t.eval_interval >= 0, f"train.eval_interval={t.eval_interval} must be ≥ 0 (0 = never)")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be ≥ 0")
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be ≥ 0")
    for name in ("beta1", "beta2"):
        _check(0 <= getattr(t, name) < 1, f"train.{name}={getattr(t, name)} must be in [0, 1)")
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be ≥ 0 (0 = no clipping)")
    _check(t.device in DEVICES, f"train.device={t.device!r} is invalid; valid: {', '.join(DEVICES)}")
    _check(t.dtype in DTYPES, f"train.dtype={t.dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    _check(bool(t.out_dir), "train.out_dir must not be empty")
    _check(c.interval >= 0, f"checkpoint.interval={c.interval} must be ≥ 0 (0 = only at the end)")
    _check(c.keep >= 1, f"checkpoint.keep={c.keep} must be ≥ 1")
    _check(bool(c.resume), 'checkpoint.resume must be "auto", "none" or a checkpoint path')
    _check(p.dp >= 0, f"parallel.dp={p.dp} must be ≥ 0 (0 = automatic)")
    for name in ("pp", "tp"):
        value = getattr(p, name)
        _check(value >= 1, f"parallel.{name}={value} must be ≥ 1")
        _check(value == 1, f"parallel.{name}={value}: only {name}=1 is supported by this version")
    _check(p.reducer in REDUCERS, f"parallel.reducer={p.reducer!r} is invalid; valid: {', '.join(REDUCERS)}")
    _check(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be > 0")
    if world_size is not None:
        _check(world_size >= 1, f"--nproc {world_size} must be ≥ 1")
        from plait.errors import MeshError
        from plait.mesh import resolve_shape
        try:
            resolve_shape(world_size, dp=p.dp, pp=p.pp, tp=p.tp)
        except MeshError as exc:
            raise ConfigError(str(exc)) from None
