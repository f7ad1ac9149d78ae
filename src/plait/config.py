"""The run configuration: a tree of dataclasses loaded from TOML, with command-line overrides.

Every field is checked before any process starts: unknown keys, wrong types, values out of range
and sizes that do not divide all raise :class:`plait.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    init_from: str = ""  # "hf:PATH": start training from a Hugging Face GPT-2 folder's weights


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
    # The peak lr follows the global batch (micro_batch_size × grad_accum × dp): "linear" scales
    # lr and min_lr by global / reference_batch (Goyal et al. 2017, with warm-up), "sqrt" by its
    # square root (Adam-family optimizers); "none" uses them as written.
    lr_scaling: str = "none"
    reference_batch: int = 0  # the global batch train.lr was chosen at (linear/sqrt need it)
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    freeze_blocks: int = 0  # freeze the first k transformer blocks (see plait.parallel.memory.freeze)
    # Compute the frozen prefix (embeddings + first k blocks) once per sample and read it back
    # afterwards (plait.parallel.memory.activation_cache); freezes the tied embedding/head too.
    freeze_cache: bool = False
    freeze_cache_mb: float = 1024.0  # that cache's in-memory limit; past it, entries spill to disk
    freeze_cache_dir: str = ""  # where they spill ("" = the system's temporary folder)
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    # torch.compile the whole model (forward, and the backward AOTAutograd derives from it); for
    # layouts whose forward is the plain model's (tp = pp = 1, zero ≤ 2; see validate_compile).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend: inductor, aot_eager or eager
    compile_mode: str = "default"  # inductor's mode: default, reduce-overhead, max-autotune, ...
    # > 0: the GPT's output projection and cross-entropy run this many rows at a time, gradients
    # formed in the same pass, so whole logits never exist (plait.models.fused_loss); 0: plain.
    loss_chunk_rows: int = 0
    out_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    """interval 0 saves only at the end; resume is "auto" (newest valid), "none", or a path."""

    interval: int = 0
    keep: int = 2
    resume: str = "auto"
    # "gathered": one layout-independent copy written by rank 0; "sharded": every rank writes its
    # own pieces with torch.distributed.checkpoint (no gather), loadable under any layout.
    format: str = "gathered"
    async_save: bool = True  # sharded: write in a background thread from a CPU copy
    snapshot: bool = False  # copy the state to node-local shared memory every step (lose ≤ 1 step)
    snapshot_dir: str = ""  # "" = /dev/shm/plait-snapshot-<hash of train.out_dir>
    preemption: bool = True  # SIGTERM/SIGUSR1: finish the step, checkpoint, exit with code 75
    preempt_deadline_s: float = 25.0  # exit even without the checkpoint this long after the signal


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
    # Memory and communication (parallel/zero/, memory/, data_parallel/ compression and hierarchical).
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
    # Relative speed of each pipeline stage (empty = equal): a stage of speed s gets layers
    # costing s/Σs of the model. `[profile] balance = "speed"` measures and sets it.
    stage_speeds: list[float] = field(default_factory=list)
    # Mesh-TensorFlow named layout, e.g. {batch = "dp", heads = "tp", mlp = "tp", vocab = "tp",
    # layers = "pp"}: an alternative spelling of the above, checked by plait.plan.layout.
    layout: dict[str, str] = field(default_factory=dict)
    ps: PSConfig = field(default_factory=PSConfig)  # [parallel.ps]: parameter-server training


@dataclass
class FLConfig:
    """Federated learning on Flower (plait.fl, `plait fl CONFIG`); clients 0 turns it off.

    Each of `clients` data holders trains its partition locally with SGD (`local_epochs` passes,
    or `local_steps` mini-batches, of `batch_size`; batch_size 0 is the whole partition, so
    local_epochs 1 with batch_size 0 is FedSGD) and the server aggregates with `strategy`.
    """

    clients: int = 0
    clients_per_round: int = 0  # 0 = every client, every round
    min_clients: int = 2  # replies a round needs (Flower's minimum-clients rule)
    rounds: int = 10  # server rounds (fedbuff: server updates)
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many local mini-batches instead of local_epochs
    batch_size: int = 10  # 0 = the whole local partition in one batch
    lr: float = 0.05  # the clients' SGD learning rate
    # Client lr at server round r is lr · lr_decay^(r−1): FedAvg on non-IID data converges only
    # with a decaying rate (Li et al. 2020, "On the Convergence of FedAvg on Non-IID Data").
    lr_decay: float = 1.0
    momentum: float = 0.0
    strategy: str = "fedavg"  # fedavg fedprox fedadam fedyogi fedmedian fedtrimmedavg krum multikrum bulyan fedbuff
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 1.0  # fedadam/fedyogi eta, fedbuff's step on the buffered mean
    tau: float = 1e-3  # fedadam/fedyogi adaptivity
    trim_beta: float = 0.2  # fedtrimmedavg: share cut at each end
    byzantine: int = 0  # krum/multikrum/bulyan: malicious clients tolerated
    buffer_size: int = 10  # fedbuff: updates per server step
    concurrency: int = 0  # fedbuff: clients training at once (0 = clients_per_round)
    max_staleness: int = 10  # fedbuff: an update this many server steps old or older is refused
    partition: str = "iid"  # iid, dirichlet (label skew), labels (k labels per client)
    dirichlet_alpha: float = 0.5
    labels_per_client: int = 2
    compression: str = "none"  # client updates: none, topk, powersgd (error feedback kept per client)
    topk_ratio: float = 0.01
    topk_values: str = "float16"  # float16 (4 bytes an entry with uint16 indices) or float32
    powersgd_rank: int = 1
    secure_aggregation: bool = False  # Flower's SecAgg+ (fedavg only)
    secagg_shares: float = 1.0  # SecAgg+ share of the sampled clients each one shares keys with
    secagg_threshold: float = 0.5  # SecAgg+ share of those needed to reconstruct a dropped mask
    dp: str = "none"  # none, central (server-side clipping + noise), local (each client)
    dp_noise_multiplier: float = 1.0  # central
    dp_clip: float = 1.0  # update norm bound
    dp_delta: float = 1e-5
    dp_epsilon: float = 1.0  # local: each release's epsilon
    attack: str = "none"  # none, sign_flip, scale, nan, inf, label_flip
    malicious_share: float = 0.0  # share of the clients that attack
    attack_scale: float = 4.0  # sign_flip sends -scale x its update; scale sends scale x
    stragglers: float = 0.0  # share of each round's clients that do partial local work
    drop_stragglers: bool = False  # refuse partial work (FedAvg as Li et al. run it)
    slow_clients: float = 0.0  # share of clients `slowdown` x slower (the local runner's clock)
    slowdown: float = 3.0
    dropout: float = 0.0  # share of each round's clients that vanish mid-round (local runner)
    eval_every: int = 1  # server-side evaluation every k rounds (and after the last)
    seed: int = 0


@dataclass
class ProfileConfig:
    """Performance debugging and uneven hardware (plait.profile, `plait report RUN_DIR`).

    Traces: `steps` > 0 records that many training steps from step `start` on every rank with
    torch.profiler, plait's phases named, one Chrome/Perfetto trace per rank in out_dir/profile/
    (`plait train --profile N`). Live statistics: every `straggler_interval` steps the ranks
    share their busy time (step time less time blocked in communication); a rank busier than the
    median of its peers by more than `straggler_threshold` is logged as a straggler.

    Uneven hardware: balance "speed" splits each step's global batch over the dp ranks in
    proportion to their speeds (gradients averaged weighted by sample count, so training equals
    the even split's) and cuts pipeline stages in proportion to the stages' speeds. The speeds
    are `speeds` (one per rank) or, when empty, measured: over the first `balance_steps` steps
    (dp), and by a timed pass over the layers before the cut (pp).

    Testing knob, not for real runs: `slow_rank` ≥ 0 makes that rank `slow_factor` times slower
    by stalling after each layer's forward and each backward pass (`slow_phase`: forward,
    backward or compute for both) in proportion to their time, as if its device were slower
    (plait.profile.slow).
    """

    steps: int = 0  # steps to trace (0 = no traces)
    start: int = 2  # first traced step, counted from the run's first step (1 pays one-off costs)
    straggler_interval: int = 50  # gather per-rank step statistics every N steps (0 = never)
    straggler_threshold: float = 0.2  # busier than the median of its peers by this share
    balance: str = "even"  # even, speed
    speeds: list[float] = field(default_factory=list)  # per rank, relative (empty = measure)
    balance_steps: int = 3  # dp: steps measured (even split) before the batch is re-split
    slow_rank: int = -1  # testing knob: the rank made slow (-1 = none)
    slow_factor: float = 1.0  # testing knob: how many times slower
    slow_phase: str = "compute"  # testing knob: forward, backward, compute (both)


@dataclass
class TuneConfig:
    """Hyperparameter search on Ray Tune (plait.tune, `plait tune CONFIG`).

    `search` maps config fields to distributions, e.g. {"train.lr" = "loguniform(1e-4, 1e-2)",
    "model.n_layer" = "choice(2, 4)"} (plait.tune.space lists the spellings); every trial is a
    plait training run of this config with one sample of them, reporting its held-out loss.
    """

    search: dict[str, str] = field(default_factory=dict)
    trials: int = 8  # samples drawn from the space (with grid(...) values: per grid point)
    scheduler: str = "asha"  # asha (stop unpromising trials early) or fifo (every trial to the end)
    searcher: str = "random"  # random (with grid points) or tpe (Optuna's TPE; needs optuna)
    grace_period: int = 1  # asha: evaluations every trial gets before it may be stopped
    reduction_factor: int = 3  # asha: about 1 in reduction_factor trials goes on at each rung
    max_concurrent: int = 0  # trials at once (0 = as many as the CPUs allow)
    nproc: int = 0  # processes per trial (0 = the layout's: dp × pp × tp, or ps.servers + 1)
    seed: int = 0  # the searcher's seed: the same seed draws the same trials
    out_dir: str = ""  # results table, best config, loss curves ("" = train.out_dir + "/tune")


@dataclass
class DistillConfig:
    """Knowledge distillation (plait.train.distill, `plait distill CONFIG --teacher RUN_DIR`).

    The model being trained (the student) learns from a trained teacher's outputs softened at
    `temperature` T, blended with the usual cross-entropy: loss = alpha · T² · KL(teacher_T ‖
    student_T) + (1 − alpha) · CE. The teacher runs in inference mode beside each micro-batch; its
    logits are never stored. teacher "" turns distillation off.
    """

    teacher: str = ""  # a run folder (its newest valid checkpoint) or a step_* folder
    temperature: float = 2.0
    alpha: float = 0.5


@dataclass
class ElasticConfig:
    """Elastic training (plait.elastic): membership changes, hangs, adaptive batch size.

    min_nodes/max_nodes > 0 run the job elastic (`plait train --elastic MIN:MAX`, or torchrun
    --nnodes MIN:MAX): when a node leaves or joins, every worker restarts at the new world size
    from the newest checkpoint. batch "keep" holds the global batch (`global_batch` sequences per
    step; 0 = micro_batch_size × grad_accum × the largest dp) by changing gradient accumulation;
    "rescale" keeps grad_accum, so the global batch follows dp (train.lr_scaling scales the lr).
    """

    min_nodes: int = 0  # 0 = not elastic
    max_nodes: int = 0
    nproc_per_node: int = 1  # processes per elastic node (agent)
    max_restarts: int = 3  # worker-group restarts each node allows (membership changes are free)
    batch: str = "keep"  # keep (grad_accum follows dp) or rescale (global batch follows dp)
    global_batch: int = 0  # keep: sequences per optimizer step (0 = micro × grad_accum × largest dp)
    rdzv_last_call_s: int = 1  # after min_nodes joined, wait this long for more
    rdzv_join_timeout_s: int = 60  # a rendezvous that gathers fewer than min_nodes fails after this
    keep_alive_s: int = 1  # a node silent for 2 × this has left
    # Hangs: collectives fail after timeout_s (not Gloo's 30 minutes); the watchdog names the
    # rank that stopped answering, from heartbeats every heartbeat_s.
    timeout_s: float = 300.0
    watchdog: bool = True
    heartbeat_s: float = 1.0
    log_samples: bool = False  # write each step's sample ids to out_dir/samples.jsonl
    # Gradient noise scale (McCandlish et al. 2018, app. A) from per-rank vs averaged gradients
    # (needs dp ≥ 2), and adaptive batch size: accumulation grows while the noise scale says a
    # bigger batch pays, up to max_global_batch, the lr scaled by lr_rule (adascale or sqrt).
    noise_scale: bool = False
    noise_ema: float = 0.95  # smoothing of the two norm estimates
    adaptive_batch: bool = False
    max_global_batch: int = 0  # adaptive: largest global batch (0 = 8 × the starting one)
    adapt_interval: int = 10  # adaptive: steps between decisions
    lr_rule: str = "adascale"  # adascale (gain ratio) or sqrt


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fl: FLConfig = field(default_factory=FLConfig)  # [fl]: federated learning (plait fl)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # [profile]: traces, stragglers
    elastic: ElasticConfig = field(default_factory=ElasticConfig)  # [elastic]: membership, hangs, batch
    distill: DistillConfig = field(default_factory=DistillConfig)  # [distill]: plait distill
    tune: TuneConfig = field(default_factory=TuneConfig)  # [tune]: hyperparameter search (plait tune)

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
        if p.is_dir():
            raise ConfigError(f"config path {str(p)!r} is a directory; pass a TOML file")
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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted one (tune.search's "train.lr")."""
    bare = key.isascii() and key.replace("_", "a").replace("-", "a").isalnum()
    return key if bare else json.dumps(key, ensure_ascii=False)


def config_toml(cfg_dict: dict[str, Any]) -> str:
    """A config tree (Config.to_dict()) as TOML that `plait train` reads back unchanged."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for section, values in cfg_dict.items():
        table(section, values)
    return "\n".join(lines)


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
    elif typing.get_origin(kind) is list:  # a list of numbers (profile.speeds)
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in value):
            return [float(v) for v in value]
        raise ConfigError(f"{name} must be a list of numbers, e.g. [1.0, 0.5], got {value!r}")
    elif typing.get_origin(kind) is dict:  # a table of strings (parallel.layout)
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return dict(value)
        raise ConfigError(f"{name} must be a table of strings, e.g. {{ heads = \"tp\" }}, got {value!r}")
    raise ConfigError(f"{name} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")


# --- validation -----------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
LR_SCALINGS = ("none", "linear", "sqrt")
DTYPES = ("auto", "float32", "bfloat16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REDUCERS = ("bucketed", "naive")
CHECKPOINT_FORMATS = ("gathered", "sharded")


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
    _check(not m.init_from or m.init_from.startswith("hf:"),
           f"model.init_from={m.init_from!r} is invalid; valid: \"\" or \"hf:PATH\" (a GPT-2 folder)")
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
    _check(t.lr_scaling in LR_SCALINGS,
           f"train.lr_scaling={t.lr_scaling!r} is invalid; valid: {', '.join(LR_SCALINGS)}")
    _check(t.reference_batch >= 0, f"train.reference_batch={t.reference_batch} must be ≥ 0")
    _check(t.lr_scaling == "none" or t.reference_batch >= 1,
           f"train.lr_scaling={t.lr_scaling!r} needs train.reference_batch ≥ 1: the global batch "
           "(micro_batch_size × grad_accum × dp) that train.lr was chosen at")
    _check(t.device in DEVICES, f"train.device={t.device!r} is invalid; valid: {', '.join(DEVICES)}")
    _check(t.dtype in DTYPES, f"train.dtype={t.dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    _check(bool(t.out_dir), "train.out_dir must not be empty")
    _check(c.interval >= 0, f"checkpoint.interval={c.interval} must be ≥ 0 (0 = only at the end)")
    _check(c.keep >= 1, f"checkpoint.keep={c.keep} must be ≥ 1")
    _check(bool(c.resume), 'checkpoint.resume must be "auto", "none" or a checkpoint path')
    _check(c.format in CHECKPOINT_FORMATS, f"checkpoint.format={c.format!r} is invalid; valid: "
           f"{', '.join(CHECKPOINT_FORMATS)}")
    _check(c.preempt_deadline_s > 0, f"checkpoint.preempt_deadline_s={c.preempt_deadline_s} must be > 0")
    _check(p.dp >= 0, f"parallel.dp={p.dp} must be ≥ 0 (0 = automatic)")
    for name in ("pp", "tp"):
        value = getattr(p, name)
        _check(value >= 1, f"parallel.{name}={value} must be ≥ 1")
    _check(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be > 0")
    check_pipeline(p, m.n_layer, t.micro_batch_size, t.grad_accum)
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
    check_parallel(p)
    validate_ps(cfg, world_size)
    validate_fl(cfg)
    validate_profile(cfg, world_size)
    validate_freeze_cache(cfg)
    validate_compile(cfg)
    validate_loss_chunks(cfg)
    validate_distill(cfg)
    validate_elastic(cfg)
    validate_tune(cfg)
    dp = None
    if world_size is not None:
        _check(world_size >= 1, f"--nproc {world_size} must be ≥ 1")
        from plait.errors import MeshError
        from plait.mesh import resolve_shape
        try:
            shape = resolve_shape(world_size, dp=p.dp, pp=p.pp, tp=p.tp)
        except MeshError as exc:
            raise ConfigError(str(exc)) from None
        check_parallel(p, dp=shape.dp)
        dp = shape.dp
    if p.layout:  # a named-dimension layout must agree with the sizes (Mesh-TF's rules and plait's)
        from plait.errors import LayoutError
        from plait.plan.layout import check_config_layout
        try:
            check_config_layout(p, m, dp=dp)
        except LayoutError as exc:
            raise ConfigError(f"parallel.layout: {exc}") from None


ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE_MODES = ("none", "full", "selective")
COMPRESSIONS = ("none", "bf16", "fp16", "powersgd", "topk")
PIPELINE_SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved")
PARTITION_COSTS = ("params", "flops", "time")


def _on(p: ParallelConfig, name: str) -> bool:
    """Whether option `name` of `p` is in use (not at its neutral value)."""
    return {"tp": p.tp > 1, "pp": p.pp > 1, "zero": p.zero > 0, "zero2+": p.zero >= 2,
            "offload_optimizer": p.offload_optimizer, "compression": p.compression != "none",
            "node_size": p.node_size > 0, "sequence_parallel": p.sequence_parallel,
            "naive_reducer": p.reducer == "naive"}[name]


def _shown(p: ParallelConfig, name: str) -> str:
    field_name = {"zero2+": "zero", "naive_reducer": "reducer"}.get(name, name)
    return f"parallel.{field_name}={getattr(p, field_name)!r}"


# Every rule for how strategies combine, in one table, checked before any process starts (and
# again by parallelize()). (option, other, kind, why): "excludes" refuses the two together;
# "requires" refuses `option` without `other`.
COMBINATION_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("pp", "zero", "excludes", "pipeline stages do not shard with ZeRO in this version"),
    ("pp", "offload_optimizer", "excludes", "pipeline stages do not offload in this version"),
    ("pp", "compression", "excludes", "pipeline stages reduce gradients uncompressed in this version"),
    ("pp", "node_size", "excludes", "pipeline stages reduce gradients flat in this version"),
    ("tp", "compression", "excludes", "compression hooks see tp shards, not whole matrices, in this version"),
    ("tp", "node_size", "excludes", "hierarchical all-reduce is not combined with tp in this version"),
    ("compression", "zero2+", "excludes", "ZeRO stages 2 and 3 reduce-scatter gradients; use zero 0 or 1"),
    ("node_size", "zero2+", "excludes", "ZeRO stages 2 and 3 reduce-scatter gradients; use zero 0 or 1"),
    ("compression", "naive_reducer", "excludes", "compression is a hook of the bucketed reducer"),
    ("node_size", "naive_reducer", "excludes", "hierarchical all-reduce is a hook of the bucketed reducer"),
    ("compression", "node_size", "excludes", "choose one gradient hook"),
    ("offload_optimizer", "zero", "requires", "offload moves the ZeRO optimizer shard; set parallel.zero ≥ 1"),
    ("sequence_parallel", "tp", "requires", "sequence parallelism splits sequences over tp ranks; "
                                            "set parallel.tp > 1 or sequence_parallel = false"),
)


def check_parallel(p: ParallelConfig, dp: int | None = None) -> None:
    """The [parallel] fields' ranges and :data:`COMBINATION_RULES`; with `dp` (the mesh's
    data-parallel size) also what depends on it. `parallelize` calls this with the mesh's dp."""
    _check(p.zero in ZERO_STAGES, f"parallel.zero={p.zero} is invalid; valid: 0, 1, 2, 3")
    _check(p.recompute in RECOMPUTE_MODES,
           f"parallel.recompute={p.recompute!r} is invalid; valid: {', '.join(RECOMPUTE_MODES)}")
    _check(p.compression in COMPRESSIONS,
           f"parallel.compression={p.compression!r} is invalid; valid: {', '.join(COMPRESSIONS)}")
    _check(p.reducer in REDUCERS, f"parallel.reducer={p.reducer!r} is invalid; valid: {', '.join(REDUCERS)}")
    _check(p.powersgd_rank >= 1, f"parallel.powersgd_rank={p.powersgd_rank} must be ≥ 1")
    _check(0.0 < p.topk_ratio <= 1.0, f"parallel.topk_ratio={p.topk_ratio} must be in (0, 1]")
    _check(p.compression_warmup >= 0,
           f"parallel.compression_warmup={p.compression_warmup} must be ≥ 0 (0 = compress from the start)")
    _check(p.node_size >= 0, f"parallel.node_size={p.node_size} must be ≥ 0 (0 = flat all-reduce)")
    for option, other, kind, why in COMBINATION_RULES:
        if not _on(p, option):
            continue
        if kind == "excludes" and _on(p, other):
            raise ConfigError(f"{_shown(p, option)} cannot be combined with {_shown(p, other)}: {why}")
        if kind == "requires" and not _on(p, other):
            raise ConfigError(f"{_shown(p, option)} needs {_shown(p, other).split('=')[0]} set: {why}")
    if dp is not None and p.node_size > 0:
        _check(dp % p.node_size == 0,
               f"parallel.node_size={p.node_size} must divide the data-parallel size {dp}")


def check_schedule(schedule: str, stages: int, virtual_stages: int = 1,
                   microbatches: int | None = None) -> None:
    """Raise ConfigError naming the field when (schedule, p, v[, m]) cannot run."""
    _check(schedule in PIPELINE_SCHEDULES,
           f"parallel.schedule={schedule!r} is invalid; valid: {', '.join(PIPELINE_SCHEDULES)}")
    _check(virtual_stages >= 1, f"parallel.virtual_stages={virtual_stages} must be ≥ 1")
    _check(virtual_stages == 1 or schedule == "interleaved",
           f"parallel.virtual_stages={virtual_stages} needs parallel.schedule = \"interleaved\" "
           f"(got {schedule!r}); use virtual_stages = 1 otherwise")
    if microbatches is None:
        return
    _check(microbatches >= 1, f"the pipeline needs ≥ 1 micro-batch per step, got {microbatches}")
    _check(schedule != "interleaved" or microbatches % stages == 0,
           f"the interleaved schedule needs the micro-batches per step (m = {microbatches}) to be a "
           f"multiple of parallel.pp = {stages}; set train.grad_accum (or parallel.microbatches) "
           f"to a multiple of {stages}")


def check_layers(num_layers: int, num_blocks: int, stages: int, virtual_stages: int,
                 interleaved: bool, error: type[Exception] = ConfigError) -> None:
    """The layer-count rules of a pipeline cut (raising `error`), shared by config validation and
    the partitioner so bad layouts fail before training."""
    if stages > num_layers:
        raise error(f"parallel.pp={stages} stages exceed the model's {num_layers} pipeline layers "
                    f"(embedding, {num_blocks} blocks, head); use parallel.pp ≤ {num_layers}")
    if interleaved and num_blocks % (stages * virtual_stages):
        raise error(f"parallel.virtual_stages={virtual_stages} with parallel.pp={stages} needs the "
                    f"{num_blocks} blocks (model.n_layer) to be a multiple of pp × virtual_stages = "
                    f"{stages * virtual_stages}, so every chunk holds the same number of blocks")


def check_pipeline(p: ParallelConfig, n_layer: int, micro_batch_size: int, grad_accum: int) -> None:
    """The pipeline fields for a GPT of `n_layer` blocks (layer list: embedding, blocks, head);
    m is parallel.microbatches, or train.grad_accum when that is 0."""
    _check(p.partition in PARTITION_COSTS,
           f"parallel.partition={p.partition!r} is invalid; valid: {', '.join(PARTITION_COSTS)}")
    _check(p.microbatches >= 0, f"parallel.microbatches={p.microbatches} must be ≥ 0 (0 = train.grad_accum)")
    check_schedule(p.schedule, p.pp, p.virtual_stages)
    if p.pp == 1:
        for name, value, neutral in (("microbatches", p.microbatches, 0),
                                     ("virtual_stages", p.virtual_stages, 1)):
            _check(value == neutral, f"parallel.{name}={value} applies to pipelines only; set "
                                     f"parallel.pp > 1 or leave it at {neutral}")
        _check(not p.stage_speeds, f"parallel.stage_speeds={p.stage_speeds} applies to pipelines "
                                   "only; set parallel.pp > 1 or leave it empty")
        return
    _check(not p.stage_speeds or len(p.stage_speeds) == p.pp,
           f"parallel.stage_speeds={p.stage_speeds} must list one speed per stage "
           f"(parallel.pp={p.pp}) or be empty")
    _check(all(v > 0 for v in p.stage_speeds),
           f"parallel.stage_speeds={p.stage_speeds} must all be > 0")
    _check(not p.stage_speeds or p.schedule != "interleaved",
           "parallel.stage_speeds does not apply to the interleaved schedule, which cuts the blocks "
           "evenly; use another schedule or leave stage_speeds empty")
    samples = micro_batch_size * grad_accum
    _check(not p.microbatches or samples % p.microbatches == 0,
           f"parallel.microbatches={p.microbatches} must divide the {samples} sequences per step and dp "
           f"rank (train.micro_batch_size={micro_batch_size} × train.grad_accum={grad_accum})")
    check_layers(n_layer + 2, n_layer, p.pp, p.virtual_stages, p.schedule == "interleaved")
    check_schedule(p.schedule, p.pp, p.virtual_stages, p.microbatches or grad_accum)


ARCHS = ("gpt", "mlp")
DATASETS = ("text", "digits")
PS_MODES = ("sync", "async", "ssp")
PS_OPTIMIZERS = ("adam", "sgd")


def validate_ps(cfg: Config, world_size: int | None = None) -> None:
    """The [parallel.ps] table, and the model/data choices that only the parameter server trains."""
    m, d, ps = cfg.model, cfg.data, cfg.parallel.ps
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
        # The all-reduce trainer runs the mlp data-parallel (dp, ZeRO); it has no tp plan or
        # pipeline layer list.
        for name, value in (("pp", cfg.parallel.pp), ("tp", cfg.parallel.tp)):
            _check(m.arch == "gpt" or cfg.fl.clients > 0 or value == 1,
                   f"model.arch={m.arch!r} is trained data-parallel only (dp, ZeRO), by the parameter "
                   f"server or by a federated run; parallel.{name}={value} must be 1")
        return
    # The parameter server replaces the all-reduce path: its mesh options do not apply.
    for where, name, neutral in (("parallel", "dp", 0), ("parallel", "pp", 1), ("parallel", "tp", 1),
                                 ("parallel", "zero", 0), ("parallel", "compression", "none"),
                                 ("parallel", "node_size", 0), ("train", "freeze_blocks", 0),
                                 ("train", "lr_scaling", "none")):
        value = getattr(getattr(cfg, where), name)
        _check(value == neutral, f"{where}.{name}={value!r} cannot be combined with "
                                 f"parallel.ps.servers={ps.servers}; leave it at {neutral!r}")
    if world_size is not None:
        _check(ps.servers < world_size,
               f"parallel.ps.servers={ps.servers} leaves no worker among --nproc {world_size} "
               f"processes; use at most {world_size - 1} servers or more processes")


FL_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
                 "multikrum", "bulyan", "fedbuff")
FL_PARTITIONS = ("iid", "dirichlet", "labels")
FL_COMPRESSIONS = ("none", "topk", "powersgd")
FL_TOPK_VALUES = ("float16", "float32")
FL_DP = ("none", "central", "local")
FL_ATTACKS = ("none", "sign_flip", "scale", "nan", "inf", "label_flip")


def validate_fl(cfg: Config) -> None:
    """The [fl] table: ranges, and which strategies, privacy and attacks go together."""
    f = cfg.fl

    def one_of(name: str, valid: tuple[str, ...]) -> None:
        value = getattr(f, name)
        _check(value in valid, f"fl.{name}={value!r} is invalid; valid: {', '.join(valid)}")

    def share(name: str, upper_open: bool = True) -> None:
        value = getattr(f, name)
        ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
        _check(ok, f"fl.{name}={value} must be in [0, 1{')' if upper_open else ']'}")

    _check(f.clients == 0 or f.clients >= 2, f"fl.clients={f.clients} must be 0 (off) or ≥ 2")
    n = f.clients_per_round or f.clients
    _check(0 <= f.clients_per_round <= f.clients,
           f"fl.clients_per_round={f.clients_per_round} must be in [0, fl.clients={f.clients}] (0 = all)")
    _check(1 <= f.min_clients and (f.clients == 0 or f.min_clients <= n),
           f"fl.min_clients={f.min_clients} must be in [1, {n}] (the clients sampled per round)")
    for name in ("rounds", "local_epochs", "eval_every", "buffer_size", "powersgd_rank"):
        _check(getattr(f, name) >= 1, f"fl.{name}={getattr(f, name)} must be ≥ 1")
    for name in ("local_steps", "batch_size", "byzantine", "concurrency", "max_staleness"):
        _check(getattr(f, name) >= 0, f"fl.{name}={getattr(f, name)} must be ≥ 0")
    for name in ("lr", "server_lr", "tau", "dirichlet_alpha", "dp_clip", "dp_epsilon", "attack_scale"):
        _check(getattr(f, name) > 0, f"fl.{name}={getattr(f, name)} must be > 0")
    _check(f.proximal_mu >= 0, f"fl.proximal_mu={f.proximal_mu} must be ≥ 0")
    _check(0.0 < f.lr_decay <= 1.0, f"fl.lr_decay={f.lr_decay} must be in (0, 1] (1 = constant lr)")
    _check(f.dp_noise_multiplier >= 0, f"fl.dp_noise_multiplier={f.dp_noise_multiplier} must be ≥ 0")
    share("momentum")
    share("malicious_share")
    share("dropout")
    share("stragglers", upper_open=False)
    share("slow_clients", upper_open=False)
    _check(0.0 < f.trim_beta < 0.5, f"fl.trim_beta={f.trim_beta} must be in (0, 0.5)")
    _check(0.0 < f.topk_ratio <= 1.0, f"fl.topk_ratio={f.topk_ratio} must be in (0, 1]")
    _check(0.0 < f.dp_delta < 1.0, f"fl.dp_delta={f.dp_delta} must be in (0, 1)")
    _check(0.0 < f.secagg_shares <= 1.0, f"fl.secagg_shares={f.secagg_shares} must be in (0, 1]")
    _check(0.0 < f.secagg_threshold <= 1.0, f"fl.secagg_threshold={f.secagg_threshold} must be in (0, 1]")
    _check(f.slowdown >= 1.0, f"fl.slowdown={f.slowdown} must be ≥ 1")
    for name, valid in (("strategy", FL_STRATEGIES), ("partition", FL_PARTITIONS),
                        ("compression", FL_COMPRESSIONS), ("dp", FL_DP), ("attack", FL_ATTACKS),
                        ("topk_values", FL_TOPK_VALUES)):
        one_of(name, valid)
    _check((f.attack == "none") == (f.malicious_share == 0.0),
           f"fl.attack={f.attack!r} with fl.malicious_share={f.malicious_share}: set both (an attack "
           "and a share > 0 of attacking clients) or neither")
    _check(f.attack != "label_flip" or cfg.model.arch == "mlp",
           "fl.attack=\"label_flip\" needs labels: use it with the digits classifier (model.arch=\"mlp\")")
    if f.partition != "iid" and cfg.model.arch == "mlp":
        from_classes = 10  # the digits' classes
        _check(1 <= f.labels_per_client <= from_classes,
               f"fl.labels_per_client={f.labels_per_client} must be in [1, {from_classes}] for the digits")
    if f.clients == 0:
        return
    if f.strategy == "fedbuff":
        _check(f.concurrency <= f.clients, f"fl.concurrency={f.concurrency} must be ≤ fl.clients={f.clients}")
        _check(f.buffer_size <= (f.concurrency or n),
               f"fl.buffer_size={f.buffer_size} must be ≤ the {f.concurrency or n} clients training at once "
               "(fl.concurrency, or fl.clients_per_round): the buffer would never fill")
    # Krum needs n > 2f + 2 updates to choose from; Bulyan n ≥ 4f + 3 (Flower checks the same).
    if f.strategy in ("krum", "multikrum"):
        _check(n > 2 * f.byzantine + 2, f"fl.strategy={f.strategy!r} with fl.byzantine={f.byzantine} needs "
                                         f"more than {2 * f.byzantine + 2} clients per round, got {n}")
    if f.strategy == "bulyan":
        _check(n >= 4 * f.byzantine + 3, f"fl.strategy=\"bulyan\" with fl.byzantine={f.byzantine} needs "
                                          f"≥ {4 * f.byzantine + 3} clients per round, got {n}")
    if f.secure_aggregation:
        for name, value, neutral in (("strategy", f.strategy, "fedavg"), ("compression", f.compression, "none"),
                                     ("dp", f.dp, "none")):
            _check(value == neutral, f"fl.secure_aggregation = true runs Flower's SecAgg+ with FedAvg "
                                     f"on whole updates; fl.{name}={value!r} must be {neutral!r}")
        _check(n >= 3, f"fl.secure_aggregation needs ≥ 3 clients per round, got {n}")
    if f.strategy == "fedbuff":
        _check(f.dp == "none" or f.dp == "local",
               f"fl.dp={f.dp!r} is not combined with fl.strategy=\"fedbuff\": Flower's central DP "
               "wraps a round-based strategy; use dp = \"local\" or a round-based strategy")


BALANCES = ("even", "speed")
SLOW_PHASES = ("forward", "backward", "compute")


def validate_profile(cfg: Config, world_size: int | None = None) -> None:
    """The [profile] table: traces, live straggler statistics, uneven hardware, the testing knob."""
    f, p = cfg.profile, cfg.parallel
    _check(f.steps >= 0, f"profile.steps={f.steps} must be ≥ 0 (0 = no traces)")
    _check(f.start >= 1, f"profile.start={f.start} must be ≥ 1 (the run's first step is 1)")
    _check(f.straggler_interval >= 0,
           f"profile.straggler_interval={f.straggler_interval} must be ≥ 0 (0 = no live statistics)")
    _check(f.straggler_threshold > 0, f"profile.straggler_threshold={f.straggler_threshold} must be > 0")
    _check(f.balance in BALANCES, f"profile.balance={f.balance!r} is invalid; valid: {', '.join(BALANCES)}")
    _check(all(v > 0 for v in f.speeds), f"profile.speeds={f.speeds} must all be > 0")
    _check(not f.speeds or f.balance == "speed",
           f"profile.speeds={f.speeds} is used only with profile.balance = \"speed\"; set it or "
           "leave speeds empty")
    _check(f.balance_steps >= 1, f"profile.balance_steps={f.balance_steps} must be ≥ 1")
    _check(f.slow_rank >= -1, f"profile.slow_rank={f.slow_rank} must be ≥ 0, or -1 for none")
    _check(f.slow_factor >= 1.0, f"profile.slow_factor={f.slow_factor} must be ≥ 1")
    _check(f.slow_phase in SLOW_PHASES,
           f"profile.slow_phase={f.slow_phase!r} is invalid; valid: {', '.join(SLOW_PHASES)}")
    if world_size is not None:
        _check(not f.speeds or len(f.speeds) == world_size,
               f"profile.speeds lists {len(f.speeds)} speeds for --nproc {world_size} processes; "
               "give one per rank or leave it empty to measure")
        _check(f.slow_rank < world_size,
               f"profile.slow_rank={f.slow_rank} is not a rank of --nproc {world_size} processes")
    if f.balance != "speed":
        return
    _check(not cfg.parallel.ps.servers,
           "profile.balance = \"speed\" cannot be combined with parallel.ps.servers; the parameter "
           "server has its own loop")
    _check(p.zero < 2, f"profile.balance = \"speed\" cannot be combined with parallel.zero={p.zero}: "
                       "ZeRO stages 2 and 3 reduce-scatter gradients unweighted; use zero 0 or 1")
    _check(p.pp == 1 or p.schedule != "interleaved",
           "profile.balance = \"speed\" cuts pipeline stages by speed, which the interleaved schedule "
           "(even blocks) does not; use gpipe or 1f1b")
    dp = p.dp or (world_size // (p.pp * p.tp) if world_size else 0)
    _check(p.pp == 1 or dp <= 1 or p.microbatches == 0,
           f"profile.balance = \"speed\" splits each step's samples unevenly over dp ranks; "
           f"parallel.microbatches={p.microbatches} must be 0 (the pipeline then runs "
           "train.grad_accum micro-batches)")


TUNE_SCHEDULERS = ("asha", "fifo")
TUNE_SEARCHERS = ("random", "tpe")


def validate_tune(cfg: Config) -> None:
    """The [tune] table's ranges; the search space itself is checked by plait.tune.space."""
    u = cfg.tune
    _check(u.trials >= 1, f"tune.trials={u.trials} must be ≥ 1")
    _check(u.scheduler in TUNE_SCHEDULERS,
           f"tune.scheduler={u.scheduler!r} is invalid; valid: {', '.join(TUNE_SCHEDULERS)}")
    _check(u.searcher in TUNE_SEARCHERS,
           f"tune.searcher={u.searcher!r} is invalid; valid: {', '.join(TUNE_SEARCHERS)}")
    _check(u.grace_period >= 1, f"tune.grace_period={u.grace_period} must be ≥ 1 (evaluations)")
    _check(u.reduction_factor >= 2, f"tune.reduction_factor={u.reduction_factor} must be ≥ 2")
    for name in ("max_concurrent", "nproc"):
        _check(getattr(u, name) >= 0, f"tune.{name}={getattr(u, name)} must be ≥ 0 (0 = automatic)")


ELASTIC_BATCH = ("keep", "rescale")
LR_RULES = ("adascale", "sqrt")


def validate_elastic(cfg: Config) -> None:
    """The [elastic] table's ranges (the global batch against each dp is checked at launch)."""
    e = cfg.elastic
    _check(e.min_nodes >= 0 and e.max_nodes >= e.min_nodes,
           f"elastic.min_nodes={e.min_nodes}, elastic.max_nodes={e.max_nodes}: need 0 ≤ min ≤ max")
    _check((e.min_nodes == 0) == (e.max_nodes == 0),
           f"elastic.min_nodes={e.min_nodes} and elastic.max_nodes={e.max_nodes}: set both ≥ 1 or both 0")
    for name in ("nproc_per_node", "adapt_interval"):
        _check(getattr(e, name) >= 1, f"elastic.{name}={getattr(e, name)} must be ≥ 1")
    for name in ("max_restarts", "global_batch", "max_global_batch"):
        _check(getattr(e, name) >= 0, f"elastic.{name}={getattr(e, name)} must be ≥ 0")
    for name in ("rdzv_last_call_s", "rdzv_join_timeout_s", "keep_alive_s", "timeout_s", "heartbeat_s"):
        _check(getattr(e, name) > 0, f"elastic.{name}={getattr(e, name)} must be > 0 (seconds)")
    _check(e.heartbeat_s < e.timeout_s,
           f"elastic.heartbeat_s={e.heartbeat_s} must be below elastic.timeout_s={e.timeout_s}")
    _check(e.batch in ELASTIC_BATCH, f"elastic.batch={e.batch!r} is invalid; valid: {', '.join(ELASTIC_BATCH)}")
    _check(e.lr_rule in LR_RULES, f"elastic.lr_rule={e.lr_rule!r} is invalid; valid: {', '.join(LR_RULES)}")
    _check(0.0 <= e.noise_ema < 1.0, f"elastic.noise_ema={e.noise_ema} must be in [0, 1)")
    _check(not e.adaptive_batch or e.noise_scale,
           "elastic.adaptive_batch = true needs elastic.noise_scale = true (it decides from the noise scale)")
    _check(not e.global_batch or e.global_batch % cfg.train.micro_batch_size == 0,
           f"elastic.global_batch={e.global_batch} must be a multiple of "
           f"train.micro_batch_size={cfg.train.micro_batch_size}")


def validate_freeze_cache(cfg: Config) -> None:
    """train.freeze_cache: the cached prefix must be a fixed function of each sample's tokens."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    _check(t.freeze_cache_mb >= 0, f"train.freeze_cache_mb={t.freeze_cache_mb} must be ≥ 0 "
                                   "(0 = every entry on disk)")
    if not t.freeze_cache:
        return
    _check(t.freeze_blocks >= 1, "train.freeze_cache = true caches the outputs of the frozen "
                                 "blocks; set train.freeze_blocks ≥ 1 or freeze_cache = false")
    _check(m.dropout == 0.0, f"train.freeze_cache = true needs model.dropout = 0 (got {m.dropout}): "
                             "with dropout the frozen blocks' outputs differ on every pass")
    _check(p.tp == 1, f"train.freeze_cache = true is not combined with parallel.tp={p.tp} in this "
                      "version; use tp = 1 or freeze_cache = false")


def validate_compile(cfg: Config) -> None:
    """train.compile: one graph of the plain model's forward, so only where the layout leaves that
    forward as it is (strategies that hook into it run their own communication inside it)."""
    t, p = cfg.train, cfg.parallel
    _check(t.compile_backend in COMPILE_BACKENDS, f"train.compile_backend={t.compile_backend!r} is "
           f"invalid; valid: {', '.join(COMPILE_BACKENDS)}")
    _check(t.compile_mode in COMPILE_MODES, f"train.compile_mode={t.compile_mode!r} is invalid; valid: "
           f"{', '.join(COMPILE_MODES)}")
    _check(t.compile_mode == "default" or t.compile_backend == "inductor",
           f"train.compile_mode={t.compile_mode!r} is a mode of the inductor backend; with "
           f"train.compile_backend={t.compile_backend!r} leave it at \"default\"")
    if not t.compile:
        return
    _check(cfg.model.arch == "gpt", f"train.compile = true compiles GPT models; model.arch={cfg.model.arch!r}")
    for name, value, neutral in (("parallel.tp", p.tp, 1), ("parallel.pp", p.pp, 1),
                                 ("parallel.ps.servers", p.ps.servers, 0),
                                 ("parallel.recompute", p.recompute, "none"),
                                 ("train.freeze_cache", t.freeze_cache, False),
                                 ("distill.teacher", cfg.distill.teacher, ""),
                                 ("profile.slow_rank", cfg.profile.slow_rank, -1)):
        _check(value == neutral, f"train.compile = true cannot be combined with {name}={value!r} in this "
                                 f"version (it changes the model's forward); leave it at {neutral!r} or "
                                 "set train.compile = false")
    _check(p.zero <= 2, f"train.compile = true cannot be combined with parallel.zero={p.zero} (stage 3 "
                        "gathers parameters inside the forward); use zero ≤ 2 or train.compile = false")


def validate_loss_chunks(cfg: Config) -> None:
    """train.loss_chunk_rows: the GPT's own head and loss, on whole (unsharded) logits rows."""
    t, p = cfg.train, cfg.parallel
    _check(t.loss_chunk_rows >= 0, f"train.loss_chunk_rows={t.loss_chunk_rows} must be ≥ 0 (0 = plain loss)")
    if not t.loss_chunk_rows:
        return
    _check(cfg.model.arch == "gpt", f"train.loss_chunk_rows applies to GPT models; model.arch={cfg.model.arch!r}")
    for name, value, neutral in (("parallel.tp", p.tp, 1), ("parallel.pp", p.pp, 1),
                                 ("parallel.ps.servers", p.ps.servers, 0), ("fl.clients", cfg.fl.clients, 0),
                                 ("train.freeze_cache", t.freeze_cache, False),
                                 ("distill.teacher", cfg.distill.teacher, "")):
        _check(value == neutral, f"train.loss_chunk_rows={t.loss_chunk_rows} cannot be combined with "
                                 f"{name}={value!r} in this version (it needs the plain head and loss, or "
                                 f"whole logits); leave it at {neutral!r} or set train.loss_chunk_rows = 0")
    _check(p.zero <= 2, f"train.loss_chunk_rows={t.loss_chunk_rows} cannot be combined with "
                        f"parallel.zero={p.zero} (stage 3 gathers the head's weight only for the head's own "
                        "forward); use zero ≤ 2 or train.loss_chunk_rows = 0")


def validate_distill(cfg: Config) -> None:
    """The [distill] table; the teacher checkpoint itself is checked by plait.train.distill."""
    d, p = cfg.distill, cfg.parallel
    _check(math.isfinite(d.temperature) and d.temperature > 0,
           f"distill.temperature={d.temperature} must be a finite number > 0 (e.g. 2.0)")
    _check(0.0 <= d.alpha <= 1.0, f"distill.alpha={d.alpha} must be in [0, 1] (the weight of the "
                                  "teacher's term; 1 - alpha weighs the cross-entropy)")
    if not d.teacher:
        return
    _check(cfg.model.arch == "gpt", f"distill.teacher is set but model.arch={cfg.model.arch!r}: "
                                    "distillation trains GPT students only")
    for name, value, neutral in (("pp", p.pp, 1), ("tp", p.tp, 1), ("ps.servers", p.ps.servers, 0)):
        _check(value == neutral, f"distill.teacher cannot be combined with parallel.{name}={value} in "
                                 f"this version (distillation runs under data parallelism and ZeRO); "
                                 f"leave it at {neutral}")
    _check(cfg.fl.clients == 0, f"distill.teacher cannot be combined with fl.clients={cfg.fl.clients}")
