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
    """A GPT's shape. vocab_size 256 matches the byte-level tokenizer.

    arch "mlp" is the digits classifier (plait.models.mlp): n_layer hidden layers of n_embd units.
    """

    arch: str = "gpt"
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
    dataset: str = "text"  # "text" (path or built-in corpus) or "digits" (scikit-learn's bundled digits)
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
    freeze_blocks: int = 0  # freeze the first k transformer blocks (see plait.parallel.freeze)
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
class PSConfig:
    """Parameter-server training (plait.parallel.parameter_server); servers 0 turns it off.

    The first `servers` ranks hold the parameters (sharded by size) and run the optimizer; the
    other ranks are workers. mode: sync (averaged, equals all-reduce), async (applied on arrival)
    or ssp (a worker runs at most `staleness` steps ahead of the slowest).
    """

    servers: int = 0
    mode: str = "sync"
    staleness: int = 2
    optimizer: str = "adam"  # adam (AdamW) or sgd (with momentum)
    momentum: float = 0.9
    worker_timeout_s: float = 60.0  # async/ssp: a worker silent this long is declared dead


@dataclass
class ParallelConfig:
    """Mesh sizes (dp 0 = all processes left after pp × tp) and the gradient reducer."""

    dp: int = 0
    pp: int = 1
    tp: int = 1
    reducer: str = "bucketed"
    bucket_mb: float = 25.0
    sequence_parallel: bool = False  # tp > 1: norms/dropout split along the sequence (Megatron SP)
    # Memory and communication (parallel/zero.py, recompute.py, compression.py, hierarchical.py).
    zero: int = 0  # ZeRO stage over the dp group: 0 off, 1 optimizer state, 2 + grads, 3 + params
    offload_optimizer: bool = False  # optimizer state and update on the CPU (needs zero ≥ 1)
    recompute: str = "none"  # activation recomputation per block: none, full, selective
    compression: str = "none"  # gradient compression hook: none, bf16, fp16, powersgd, topk
    powersgd_rank: int = 4
    topk_ratio: float = 0.01
    compression_warmup: int = 10  # plain all-reduce steps before powersgd/topk start
    node_size: int = 0  # > 0: hierarchical all-reduce over nodes of this many dp ranks
    # Pipeline parallelism (parallel/pipeline/), used when pp > 1.
    schedule: str = "1f1b"  # naive, gpipe, 1f1b, interleaved
    microbatches: int = 0  # pipeline micro-batches per step; 0 = train.grad_accum (the trainer's)
    virtual_stages: int = 1  # chunks per pipeline rank (interleaved only)
    partition: str = "params"  # layer balance by: params, flops, time (measured)
    ps: PSConfig = field(default_factory=PSConfig)  # [parallel.ps]: parameter-server training


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
    # Deeper keys are allowed only into nested tables that exist, e.g. parallel.ps.servers.
    if len(parts) < 2 or not all(parts) or (len(parts) > 2 and not _is_table(parts[:-1])):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.steps=100 "
                          "(or section.table.key for a nested table, e.g. parallel.ps.servers=1)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    section = raw
    for i, name in enumerate(parts[:-1]):
        section = section.setdefault(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])!r} is not a section")
    section[parts[-1]] = parsed


def _is_table(path: list[str]) -> bool:
    """True when `path` names a (nested) section of :class:`Config`."""
    cls: Any = Config
    for name in path:
        kind = typing.get_type_hints(cls).get(name)
        if kind is None or not dataclasses.is_dataclass(kind):
            return False
        cls = kind
    return True


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
    _check(p.reducer in REDUCERS, f"parallel.reducer={p.reducer!r} is invalid; valid: {', '.join(REDUCERS)}")
    _check(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be > 0")
    from plait.parallel.pipeline.checks import check_pipeline_config
    check_pipeline_config(p, m.n_layer, t.micro_batch_size, t.grad_accum)
    # Tensor parallelism splits attention heads (and so the embedding width) over tp ranks.
    _check(m.n_head % p.tp == 0,
           f"model.n_head={m.n_head} is not divisible by parallel.tp={p.tp}; tensor parallelism "
           "splits attention heads over tp ranks, so choose a tp that divides the head count")
    _check(not p.sequence_parallel or m.block_size % p.tp == 0,
           f"model.block_size={m.block_size} is not divisible by parallel.tp={p.tp}; "
           "parallel.sequence_parallel splits each sequence over the tp ranks")
    _check(0 <= t.freeze_blocks <= m.n_layer,
           f"train.freeze_blocks={t.freeze_blocks} must be in [0, model.n_layer={m.n_layer}]")
    _check(t.freeze_blocks == 0 or p.pp == 1,
           f"train.freeze_blocks={t.freeze_blocks} is not supported with parallel.pp={p.pp} in this "
           "version (backward stops inside the frozen first stage); use pp=1 or freeze_blocks=0")
    validate_memory_comm(p)
    validate_ps(cfg, world_size)
    if world_size is not None:
        _check(world_size >= 1, f"--nproc {world_size} must be ≥ 1")
        from plait.errors import MeshError
        from plait.mesh import resolve_shape
        try:
            shape = resolve_shape(world_size, dp=p.dp, pp=p.pp, tp=p.tp)
        except MeshError as exc:
            raise ConfigError(str(exc)) from None
        validate_memory_comm(p, dp=shape.dp)


ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE_MODES = ("none", "full", "selective")
COMPRESSIONS = ("none", "bf16", "fp16", "powersgd", "topk")


def validate_memory_comm(p: ParallelConfig, dp: int | None = None) -> None:
    """The ZeRO, offload, recomputation, compression and hierarchical fields, and how they combine.

    `parallelize` calls this too, with the mesh's dp size, so a bad combination fails before any
    hook is attached.
    """
    _check(p.zero in ZERO_STAGES, f"parallel.zero={p.zero} is invalid; valid: 0, 1, 2, 3")
    _check(p.recompute in RECOMPUTE_MODES,
           f"parallel.recompute={p.recompute!r} is invalid; valid: {', '.join(RECOMPUTE_MODES)}")
    _check(p.compression in COMPRESSIONS,
           f"parallel.compression={p.compression!r} is invalid; valid: {', '.join(COMPRESSIONS)}")
    _check(p.powersgd_rank >= 1, f"parallel.powersgd_rank={p.powersgd_rank} must be ≥ 1")
    _check(0.0 < p.topk_ratio <= 1.0, f"parallel.topk_ratio={p.topk_ratio} must be in (0, 1]")
    _check(p.compression_warmup >= 0,
           f"parallel.compression_warmup={p.compression_warmup} must be ≥ 0 (0 = compress from the start)")
    _check(p.node_size >= 0, f"parallel.node_size={p.node_size} must be ≥ 0 (0 = flat all-reduce)")
    _check(not p.offload_optimizer or p.zero >= 1,
           "parallel.offload_optimizer=true needs parallel.zero ≥ 1 (it moves the ZeRO optimizer shard)")
    # Compression and hierarchical all-reduce are hooks of the bucketed all-reduce: they need it.
    for name, active in (("compression", p.compression != "none"), ("node_size", p.node_size > 0)):
        if not active:
            continue
        value = getattr(p, name)
        _check(p.zero <= 1, f"parallel.{name}={value!r} is not supported with parallel.zero={p.zero}: "
                            "stages 2 and 3 reduce-scatter gradients; use zero 0 or 1")
        _check(p.reducer == "bucketed", f"parallel.{name}={value!r} needs parallel.reducer='bucketed'")
    _check(p.compression == "none" or p.node_size == 0,
           f"parallel.compression={p.compression!r} and parallel.node_size={p.node_size} cannot be "
           "combined; choose one")
    if dp is not None and p.node_size > 0:
        _check(dp % p.node_size == 0,
               f"parallel.node_size={p.node_size} must divide the data-parallel size {dp}")


ARCHS = ("gpt", "mlp")
DATASETS = ("text", "digits")
PS_MODES = ("sync", "async", "ssp")
PS_OPTIMIZERS = ("adam", "sgd")


def validate_ps(cfg: Config, world_size: int | None = None) -> None:
    """The [parallel.ps] table, and the model/data choices that only the parameter server trains."""
    m, d, p, ps = cfg.model, cfg.data, cfg.parallel, cfg.parallel.ps
    _check(m.arch in ARCHS, f"model.arch={m.arch!r} is invalid; valid: {', '.join(ARCHS)}")
    _check(d.dataset in DATASETS, f"data.dataset={d.dataset!r} is invalid; valid: {', '.join(DATASETS)}")
    _check((m.arch == "mlp") == (d.dataset == "digits"),
           f"model.arch={m.arch!r} does not fit data.dataset={d.dataset!r}: "
           "the mlp classifies digits, the gpt models text")
    _check(ps.servers >= 0, f"parallel.ps.servers={ps.servers} must be ≥ 0 (0 = no parameter server)")
    _check(ps.mode in PS_MODES, f"parallel.ps.mode={ps.mode!r} is invalid; valid: {', '.join(PS_MODES)}")
    _check(ps.staleness >= 0, f"parallel.ps.staleness={ps.staleness} must be ≥ 0")
    _check(ps.optimizer in PS_OPTIMIZERS,
           f"parallel.ps.optimizer={ps.optimizer!r} is invalid; valid: {', '.join(PS_OPTIMIZERS)}")
    _check(0 <= ps.momentum < 1, f"parallel.ps.momentum={ps.momentum} must be in [0, 1)")
    _check(ps.worker_timeout_s > 0, f"parallel.ps.worker_timeout_s={ps.worker_timeout_s} must be > 0")
    if ps.servers == 0:
        _check(m.arch == "gpt", f"model.arch={m.arch!r} is trained only by the parameter server in "
                                "this version; set parallel.ps.servers ≥ 1")
        return
    # The parameter server replaces the all-reduce path: its mesh options do not apply.
    for where, name, neutral in (("parallel", "dp", 0), ("parallel", "pp", 1), ("parallel", "tp", 1),
                                 ("parallel", "zero", 0), ("parallel", "compression", "none"),
                                 ("parallel", "node_size", 0), ("train", "freeze_blocks", 0)):
        value = getattr(getattr(cfg, where), name)
        _check(value == neutral, f"{where}.{name}={value!r} cannot be combined with "
                                 f"parallel.ps.servers={ps.servers}; leave it at {neutral!r}")
    if world_size is not None:
        _check(ps.servers < world_size,
               f"parallel.ps.servers={ps.servers} leaves no worker among --nproc {world_size} "
               f"processes; use at most {world_size - 1} servers or more processes")
