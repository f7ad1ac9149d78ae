"""plait's trainer step vs a plain compiled GPT on one GPU: step time, memory and MFU at three sizes.

Two sides train the same GPT-2-shaped model (vocabulary padded to 50304, bf16 autocast, SDPA
attention, fused AdamW, gradient clipping to 1.0, random tokens):

- reference: a nanoGPT-style GPT written in this file, `torch.compile(model)`, a hand-written step;
- plait: plait's own training path at world size 1 (`Config`, `ParallelMesh.from_env` over NCCL,
  `TokenDataset`, `Trainer`), timing `Trainer.train_step()`, with `train.compile` when it exists.

    size   layers  heads  width  T     batch   H100 reference (eager -> torch.compile)
    124m   12      12     768    1024  16      305k -> 457k tokens/s
    350m   24      16     1024   1024  16      142k -> 180k tokens/s
    1.3b   24      16     2048   2048  8        53k ->  59k tokens/s

Every (side, size) runs in a fresh subprocess of this script (`--one SIDE --size NAME`), so peak
memory and compile caches (each child gets its own inductor cache) belong to one side alone; the
side that goes first alternates from size to size. A child warms up (compilation happens there),
then times each step between `torch.cuda.synchronize()` calls and reports the median step time,
tokens/s, peak allocated memory since the child started (weights, gradients, optimizer state and
activations), warm-up seconds and the losses. MFU uses FLOPs per token = 6 N + 12 L C T (N the
non-embedding parameters, the tied head counted once; `GPT.flops_per_token`) against the
datasheet bf16 peak (`plait.train.metrics.device_peak_flops`) and against a measured bf16 GEMM
peak (8192^3, its own subprocess). Sizes run largest first; the JSON is rewritten after every
child, so a run cut short keeps what it measured, and a child that fails or times out is recorded
with its error. On CUDA no child starts after --budget-s (450 s), so the table still prints
inside an 8-minute slot. The CPU smoke runs tiny sizes, one thread per child, both sides eager
unless --compile.

    python benchmarks/gpu_train.py --json benchmarks/results/gpu_train.json    # one GPU
    python benchmarks/gpu_train.py --device cpu --quick                         # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import benchmark_parser, print_table, round_order, write_json  # noqa: E402

SIDES = ("reference", "plait")
RESULT_PREFIX = "GPU_TRAIN_RESULT "  # marks the child's one JSON line among anything else it prints
TARGET = "ratio <= 1.0 at every size, memory_ratio <= 1.0, mfu_1p3b >= 0.55"
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP, SEED = 3e-4, 0.1, (0.9, 0.95), 1.0, 1337


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch: int
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64


SIZES = {
    "124m": Size(12, 12, 768, 1024, 16),
    "350m": Size(24, 16, 1024, 1024, 16),
    "1.3b": Size(24, 16, 2048, 2048, 8),
    # CPU smoke (--tiny, or --quick on the CPU): seconds per child, both sides eager by default.
    "tiny": Size(2, 2, 64, 64, 4, vocab_size=256),
    "tiny-wide": Size(2, 4, 128, 64, 4, vocab_size=256),
}
# The largest first: its MFU is a target of its own, and a run cut short loses the cheapest size.
GPU_RUN_ORDER = ("1.3b", "350m", "124m")
CUDA_BUDGET_S = 450.0
TINY_SIZES = ("tiny", "tiny-wide")


def flops_per_token(size: Size) -> float:
    """6 N + 12 L C T, N counted from the shapes: per block two norms, qkv, attention and MLP
    projections (12 C^2 + 13 C with biases), the final norm and the tied embedding/head matrix;
    the position embedding is left out. The same count as plait's `GPT.flops_per_token`."""
    c, layers = size.n_embd, size.n_layer
    n = layers * (12 * c * c + 13 * c) + 2 * c + size.vocab_size * c
    return 6.0 * n + 12.0 * layers * c * size.block_size


# --- the reference GPT (nanoGPT-style) -------------------------------------------------------


class RefAttention(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        self.n_head = s.n_head
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.c_proj = nn.Linear(s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class RefMLP(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd)
        self.c_proj = nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class RefBlock(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(s.n_embd), RefAttention(s)
        self.ln_2, self.mlp = nn.LayerNorm(s.n_embd), RefMLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        self.wte = nn.Embedding(s.vocab_size, s.n_embd)
        self.wpe = nn.Embedding(s.block_size, s.n_embd)
        self.h = nn.ModuleList(RefBlock(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled down
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * s.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def flops_per_token(self, seq_len: int) -> float:
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()  # tied head once
        return 6.0 * n + 12.0 * len(self.h) * self.wte.embedding_dim * seq_len


# --- one side, one size (the child process) --------------------------------------------------


def _random_tokens(size: Size, sequences: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(0, size.vocab_size, sequences * size.block_size + 1, dtype=np.int64)


def _reference_side(size: Size, device: torch.device, compile_: bool) -> tuple[Callable[[], torch.Tensor], float]:
    """The plain training step (nanoGPT's loop) and the model's FLOPs per token."""
    with device:  # weights made where they live
        model = RefGPT(size)
    fpt = model.flops_per_token(size.block_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, fused=device.type == "cuda")
    run = torch.compile(model) if compile_ else model
    tokens = torch.from_numpy(_random_tokens(size, 4 * size.batch))
    sequences, t, b = 4 * size.batch, size.block_size, size.batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    state = {"i": 0}

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        rows = [(state["i"] * b + j) % sequences for j in range(b)]
        state["i"] += 1
        x = torch.stack([tokens[r * t:r * t + t] for r in rows])
        y = torch.stack([tokens[r * t + 1:r * t + t + 1] for r in rows])
        if device.type == "cuda":
            x, y = (z.pin_memory().to(device, non_blocking=True) for z in (x, y))
        return x, y

    def step() -> torch.Tensor:
        x, y = batch()
        if autocast is not None:
            with autocast:
                loss = run(x, y)
        else:
            loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, fpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plait_side(size: Size, device: torch.device, compile_: bool, work_dir: Path, loss_chunk_rows: int = 0
                ) -> tuple[Callable[[], torch.Tensor], float, dict[str, Any]]:
    """plait's training path as `plait train` builds it, at world size 1: its `train_step` and
    the trainer's FLOPs per token."""
    from plait.config import CheckpointConfig, Config, ModelConfig, TrainConfig, validate
    from plait.data.dataset import TokenDataset
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer

    # torchrun's environment for one process: from_env picks NCCL on CUDA (Gloo on the CPU).
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    extra: dict[str, Any] = {}
    has_compile = hasattr(TrainConfig(), "compile")
    if has_compile:
        extra["compile"] = compile_
    if loss_chunk_rows:  # the fused head + cross-entropy (plait.models.fused_loss)
        extra["loss_chunk_rows"] = loss_chunk_rows
    train = TrainConfig(steps=10_000, micro_batch_size=size.batch, grad_accum=1, lr=LR, min_lr=LR / 10,
                        warmup_steps=0, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
                        grad_clip=GRAD_CLIP, eval_interval=0, log_interval=1_000_000, seed=SEED,
                        device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
                        out_dir=str(work_dir / "run"), **extra)
    model = ModelConfig(n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd,
                        block_size=size.block_size, vocab_size=size.vocab_size, dropout=0.0, bias=True)
    cfg = Config(model=model, train=train,
                 checkpoint=CheckpointConfig(resume="none", preemption=False, snapshot=False))
    validate(cfg, world_size=1)
    mesh = ParallelMesh.from_env(dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp, device=device)
    train_data = TokenDataset(_random_tokens(size, 4 * size.batch), size.block_size)
    val_data = TokenDataset(_random_tokens(size, size.batch)[::-1].copy(), size.block_size)
    trainer = Trainer(cfg, mesh, train_data, val_data)
    trainer.model.train()

    def step() -> torch.Tensor:
        return torch.tensor(trainer.train_step()["loss"])

    info = {"compile_field": has_compile, "mesh": str(mesh.shape),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}
    return step, float(trainer.flops_per_token), info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(side: str, size_name: str, device_name: str, compile_: bool, warmup: int, steps: int,
            loss_chunk_rows: int, work_dir: Path) -> dict[str, Any]:
    """Build one side at one size, warm it up, time `steps` steps; the record the parent keeps."""
    from plait.train.metrics import device_peak_flops

    size = SIZES[size_name]
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        torch.cuda.reset_peak_memory_stats(device)  # from the start: weights, grads, state, activations
    else:  # on a small shared machine another job's load stalls multi-threaded ops many-fold
        torch.set_num_threads(1)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if side == "reference":
        step, fpt = _reference_side(size, device, compile_)
    elif side == "plait":
        step, fpt, info = _plait_side(size, device, compile_, work_dir, loss_chunk_rows)
        info["loss_chunk_rows"] = loss_chunk_rows
    else:
        raise ValueError(f"side {side!r} is unknown; valid: {', '.join(SIDES)}")
    expected = flops_per_token(size)
    if not math.isclose(fpt, expected, rel_tol=1e-12):
        raise AssertionError(f"{side}: FLOPs per token {fpt} differ from the formula's {expected}")
    _sync(device)
    setup_s = time.perf_counter() - t0

    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(warmup):  # torch.compile compiles on the first of these
        losses.append(float(step()))
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times, last = [], []
    for _ in range(steps):
        _sync(device)
        ts = time.perf_counter()
        last.append(step())
        _sync(device)
        times.append(time.perf_counter() - ts)
    losses += [float(x) for x in last]
    if torch.distributed.is_initialized():  # plait's side: leave no process group behind
        torch.distributed.destroy_process_group()

    tokens = size.batch * size.block_size
    step_s = statistics.median(times)
    peak = device_peak_flops(device)
    compiled = compile_ if side == "reference" else bool(compile_ and info.get("compile_field"))
    return {"side": side, "size": size_name, "shape": asdict(size), "device": _device_name(device),
            "compiled": compiled, **info, "setup_s": setup_s, "warmup_steps": warmup, "warmup_s": warmup_s,
            "steps": steps, "step_times_s": times, "step_s": step_s, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "flops_per_token": fpt,
            "achieved_tflops": fpt * tokens / step_s / 1e12,
            "datasheet_peak_tflops": peak / 1e12 if peak else None,
            "mfu_datasheet": fpt * tokens / step_s / peak if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None,
            "loss_first": losses[0] if losses else None, "loss_final": losses[-1] if losses else None,
            "losses_finite": all(math.isfinite(x) for x in losses)}


def matmul_peak(device_name: str) -> dict[str, Any]:
    """Measured dense matmul throughput: bf16 8192^3 on CUDA, fp32 1024^3 on the CPU (quick)."""
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (1024, torch.float32, 3)
    if not cuda:
        torch.set_num_threads(1)  # as the training children on the CPU
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    samples = []
    for _ in range(10 if cuda else 5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        samples.append((time.perf_counter() - t0) / reps)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "device": _device_name(device),
            "seconds": statistics.median(samples), "tflops": 2 * n ** 3 / statistics.median(samples) / 1e12}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


# --- the parent ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the parent dies, even killed outright by a
    time limit, so no child keeps the GPU after the run."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(argv: list[str], work_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run this script with `argv` in its own process group; its JSON record, or the error."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work_dir / "inductor"),
           "TRITON_CACHE_DIR": str(work_dir / "triton"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--work-dir", str(work_dir)]
    t0 = time.perf_counter()
    # Its own session: a timeout kills the child's compile workers with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": err[-2000:],
                "wall_s": time.perf_counter() - t0}
    except BaseException:  # the parent is stopped (SIGTERM, Ctrl-C): take the child along
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
        return {"error": f"exit code {proc.returncode}: {last}"[:300], "stderr_tail": err[-2000:],
                "wall_s": wall}
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "wall_s": wall}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summarise(payload: dict[str, Any]) -> None:
    """Per-size ratios and the top-level figures, from whatever has been measured so far."""
    peak = (payload.get("matmul") or {}).get("tflops")
    ratios, mem_ratios = [], []
    for name, entry in payload["sizes"].items():
        for side in SIDES:
            rec = entry.get(side)
            if rec and "error" not in rec:
                rec["mfu_matmul"] = rec["achieved_tflops"] / peak if peak else None
        ref, pl = entry.get("reference"), entry.get("plait")
        ok = ref and pl and "error" not in ref and "error" not in pl
        entry["ratio"] = _ratio(pl["step_s"], ref["step_s"]) if ok else None
        entry["memory_ratio"] = _ratio(pl["peak_memory_gb"], ref["peak_memory_gb"]) if ok else None
        if entry["ratio"] is not None:
            ratios.append(entry["ratio"])
        if entry["memory_ratio"] is not None:
            mem_ratios.append(entry["memory_ratio"])
    big = payload["sizes"].get("1.3b", {}).get("plait") or {}
    payload["ratio"] = max(ratios) if ratios else None
    payload["memory_ratio"] = max(mem_ratios) if mem_ratios else None
    payload["mfu_1p3b"] = big.get("mfu_datasheet")
    payload["matmul_peak_tflops"] = peak


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(payload: dict[str, Any]) -> None:
    header = ["size", "side", "compiled", "step ms", "tokens/s", "peak GB", "MFU sheet", "MFU gemm",
              "warm-up s", "loss", "plait/ref step", "plait/ref mem"]
    rows = []
    for name, entry in payload["sizes"].items():
        for side in SIDES:
            rec = entry.get(side)
            if rec is None:
                continue
            if "error" in rec:
                rows.append([name, side, "-", rec["error"][:60]] + ["-"] * 8)
                continue
            last = side == "plait"
            rows.append([name, side, "yes" if rec["compiled"] else "no", _fmt(rec["step_s"] * 1e3, ".1f"),
                         _fmt(rec["tokens_per_s"], ",.0f"), _fmt(rec["peak_memory_gb"], ".2f"),
                         _fmt(rec["mfu_datasheet"], ".3f"), _fmt(rec.get("mfu_matmul"), ".3f"),
                         _fmt(rec["warmup_s"], ".1f"), _fmt(rec["loss_final"], ".3f"),
                         _fmt(entry["ratio"], ".3f") if last else "", _fmt(entry["memory_ratio"], ".3f") if last else ""])
    mm = payload.get("matmul") or {}
    gemm = (f"measured {mm['dtype']} GEMM {mm['n']}^3: {mm['tflops']:.1f} TFLOP/s" if "tflops" in mm
            else f"GEMM peak: {mm.get('error', 'not measured')}")
    print_table(f"plait Trainer.train_step vs plain GPT on {payload['device']} ({gemm})", header, rows)
    print(f"\nworst plait/reference step-time ratio {_fmt(payload['ratio'], '.3f')}, memory ratio "
          f"{_fmt(payload['memory_ratio'], '.3f')}, plait 1.3B MFU {_fmt(payload['mfu_1p3b'], '.3f')} "
          f"(target: {TARGET})")


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer steps; on the CPU the tiny sizes")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", help=f"comma list of {', '.join(SIZES)}, run in this order "
                                    f"(default: {','.join(GPU_RUN_ORDER)}: the largest first)")
    ap.add_argument("--tiny", action="store_true", help=f"the CPU smoke sizes: {','.join(TINY_SIZES)}")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10; 5 with --quick)")
    comp = ap.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="torch.compile both sides (the default on CUDA)")
    comp.add_argument("--no-compile", dest="compile", action="store_false", help="both sides eager")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per child process")
    ap.add_argument("--loss-chunk-rows", type=int, default=0,
                    help="plait side: train.loss_chunk_rows, the fused head + cross-entropy (default 0: plain)")
    ap.add_argument("--budget-s", type=float,
                    help=f"start no child past this many seconds of the whole run, and cut a child's "
                         f"timeout to what is left (default {CUDA_BUDGET_S:.0f} on CUDA, to print the "
                         f"table inside an 8-minute slot; 0 on the CPU: no limit)")
    ap.add_argument("--one", choices=(*SIDES, "matmul"), help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    compile_ = args.compile if args.compile is not None else args.device == "cuda"
    steps = args.steps if args.steps is not None else (5 if args.quick else 10)

    if args.one:  # child: one JSON line on stdout
        if args.one == "matmul":
            rec = matmul_peak(args.device)
        else:
            with tempfile.TemporaryDirectory(prefix="gpu_train_") as tmp:  # used without --work-dir
                work = Path(args.work_dir or tmp)
                rec = run_one(args.one, args.size, args.device, compile_, args.warmup, steps, args.loss_chunk_rows,
                              work)
        print(RESULT_PREFIX + json.dumps(rec), flush=True)
        return

    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    elif args.tiny or (args.quick and args.device == "cpu"):
        sizes = list(TINY_SIZES)
    else:
        sizes = ["124m"] if args.quick else list(GPU_RUN_ORDER)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"--sizes: {', '.join(unknown)} unknown; valid: {', '.join(SIZES)}")
    budget = args.budget_s if args.budget_s is not None else (CUDA_BUDGET_S if args.device == "cuda" else 0.0)

    start = time.perf_counter()
    shown = sorted(sizes, key=lambda n: list(SIZES).index(n))  # the table reads small to large
    payload: dict[str, Any] = {
        "benchmark": "gpu_train", "device": None, "compile": compile_, "warmup": args.warmup,
        "steps": steps, "run_order": sizes, "target": TARGET, "ratio": None, "memory_ratio": None,
        "mfu_1p3b": None, "matmul_peak_tflops": None, "matmul": None,
        "sizes": {name: {"shape": asdict(SIZES[name])} for name in shown}}
    common_argv = ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(steps),
                   "--loss-chunk-rows", str(args.loss_chunk_rows),
                   "--compile" if compile_ else "--no-compile"]
    # A time limit's SIGTERM unwinds like Ctrl-C: the running child is killed, the table printed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    try:
        with tempfile.TemporaryDirectory(prefix="gpu_train_") as tmp:
            def child(name: str, argv: list[str]) -> dict[str, Any]:
                timeout = args.timeout_s
                if budget:
                    left = budget - (time.perf_counter() - start)
                    if left < 10:
                        return {"error": f"skipped: --budget-s {budget:.0f} s spent"}
                    timeout = min(timeout, left)
                work = Path(tmp) / name
                work.mkdir()
                return _child(argv, work, timeout)

            payload["matmul"] = child("matmul", ["--one", "matmul", "--device", args.device])
            payload["device"] = payload["matmul"].get("device") or (
                torch.cuda.get_device_name(0) if args.device == "cuda" else _device_name(torch.device("cpu")))
            for i, name in enumerate(sizes):
                for side in round_order(SIDES, i):
                    rec = child(f"{side}-{name}", ["--one", side, "--size", name, *common_argv])
                    payload["sizes"][name][side] = rec
                    _summarise(payload)
                    write_json(args.json, payload)  # after every child: a run cut short keeps its results
                    status = rec.get("error") or f"{rec['step_s'] * 1e3:.1f} ms/step"
                    print(f"{name:>9} {side:<9} {status}", flush=True)
    finally:
        _summarise(payload)
        write_json(args.json, payload)
        _table(payload)


if __name__ == "__main__":
    main()
