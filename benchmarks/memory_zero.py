"""Memory and communication savings: ZeRO 0-3 state per rank, recomputation, gradient compression.

1. Per-rank bytes of parameters, gradients and optimizer state at dp=4 for plain DP (ZeRO 0) and
   ZeRO 1, 2, 3, taken after a step's backward (gradients present, optimizer state created), and
   the same for torch FSDP2 (`fully_shard` per block, then the root), the peer of ZeRO-3.
   "ratio" in the JSON is plait ZeRO-3's total / FSDP2's total.
2. Activation memory without and with recomputation ("selective", "full") on one process:
   bytes forward leaves alive for backward, and the peak of forward + backward, both from the
   allocator events torch.profiler records (profile_memory=True).
3. Gradient compression at dp=2 on the GPT of examples/tiny_gpt.toml: bytes each rank sends per
   step (ring-algorithm model, see plait.parallel.data_parallel.hooks) for each hook; and held-out loss
   after a fixed number of steps through the real Trainer on a small generated corpus
   (compression from step `compression_warmup` = 10 on).
4. Hierarchical all-reduce at dp=4 in nodes of 2: bytes over the slow (inter-node) links.

    python benchmarks/memory_zero.py [--quick] [--json benchmarks/results/memory_zero.json]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import benchmark_parser, print_table, write_json  # noqa: E402
from plait.config import ModelConfig  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

TINY_GPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0)  # examples/tiny_gpt.toml


def _batch(block: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (batch, block + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _plain_bytes(model, opt) -> dict:
    def total(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    return {"params": total(params), "grads": total(grads), "optim": total(state)}


def _fsdp_bytes(model, opt) -> dict:
    from torch.distributed.tensor import DTensor

    def local(ts):
        return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": local(params), "grads": local(grads), "optim": local(state)}


def _state_bytes(kind: str, model_kw: dict) -> dict:
    """Per-rank bytes after one step and the next backward, for plain DP / ZeRO-k / FSDP2."""
    import torch.distributed as dist

    from plait.config import ParallelConfig, TrainConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel import parallelize
    from plait.optim import optimizer_groups

    cfg = TrainConfig()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kw))
    x, y = _batch(model_kw["block_size"], 2, dist.get_rank())
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr)
        wrapped = model
    else:
        wrapped = parallelize(model, ParallelMesh.build(), ParallelConfig(zero=int(kind)))
        opt = wrapped.build_optimizer(cfg)
    for _ in range(2):  # a step (optimizer state), then a backward (gradients)
        opt.zero_grad(set_to_none=True)
        wrapped(x, y)[1].backward()
        if _ < 1:
            opt.step()
    if kind == "fsdp2":
        return _fsdp_bytes(model, opt)
    if kind == "0":
        return _plain_bytes(model, opt)
    return wrapped.memory_bytes()


def _activations(mode: str, model_kw: dict, batch: int) -> dict:
    from plait.models import GPT
    from plait.parallel.memory.recompute import apply_recompute
    from plait.testing.memory import track_allocations

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kw))
    apply_recompute(model, mode)
    x, y = _batch(model_kw["block_size"], batch, 0)
    model(x, y)[1].backward()  # warm-up: grads exist, so the measured step does not allocate them
    with track_allocations() as fwd:
        _, loss = model(x, y)
    with track_allocations() as bwd:
        loss.backward()
        del loss
    return {"held_after_forward": fwd.net, "peak_step": max(fwd.peak, fwd.net + bwd.peak)}


def _wire(kind: str, model_kw: dict) -> dict:
    from plait.config import ParallelConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel.data_parallel.hooks import CountingAllReduce
    from plait.parallel.data_parallel.compression import build_compression_hook
    from plait.parallel.data_parallel.reducer import GradientReducer

    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kw))
    hook = CountingAllReduce() if kind == "none" else build_compression_hook(
        ParallelConfig(compression=kind, compression_warmup=0), model, mesh.dp_size)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=hook)
    x, y = _batch(32, 2, mesh.rank)
    model(x, y)[1].backward()
    reducer.remove()
    return {"wire": hook.stats.wire, "payload": hook.stats.payload}


def _final_val_loss(cfg_dict: dict) -> float:
    from plait.config import Config
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, ParallelMesh.build(), train, val).fit()["final_val_loss"]


def _loss_cfg(kind: str, tmp: str, steps: int) -> dict:
    from plait.config import Config
    words = ("the model data rank gradient bucket tensor process step loss mesh layer token "
             "sample batch epoch reduce gather scatter parameter optimizer").split()
    corpus = os.path.join(tmp, "corpus.txt")
    if not os.path.exists(corpus):
        rng = random.Random(0)
        with open(corpus, "w") as f:
            f.write(" ".join(rng.choice(words) for _ in range(6000)) + "\n")
    return Config.from_dict({
        "model": dict(n_layer=2, n_head=4, n_embd=128, block_size=16),
        "data": {"path": corpus, "val_fraction": 0.1},
        "train": dict(steps=steps, micro_batch_size=4, warmup_steps=5, lr=3e-3, eval_interval=steps,
                      log_interval=steps, out_dir=os.path.join(tmp, kind)),
        "checkpoint": {"resume": "none"}, "parallel": {"compression": kind},
    }).to_dict()


def _hierarchical(model_kw: dict) -> dict:
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel.data_parallel.reducer import GradientReducer
    from plait.parallel.data_parallel.hierarchical import build_hierarchical_hook

    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kw))
    hook = build_hierarchical_hook(mesh, 2)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=hook)
    x, y = _batch(32, 2, mesh.rank)
    model(x, y)[1].backward()
    reducer.remove()
    n = mesh.dp_size
    # A flat ring over ranks ordered by node crosses each node boundary once: a node sends
    # 2(n-1)/n·B out of itself per all-reduce, in 2(n-1) steps over the slow link.
    return {"inter": hook.inter.wire, "intra": hook.intra.wire,
            "flat": 2 * (n - 1) / n * reducer.bytes_per_step, "bucket_bytes": reducer.bytes_per_step}


def main() -> None:
    ap = benchmark_parser(__doc__, "smaller activations and fewer steps (under a minute)")
    args = ap.parse_args()
    act_kw = dict(TINY_GPT, block_size=64) if args.quick else TINY_GPT
    act_batch = 4 if args.quick else 8
    loss_steps = 30 if args.quick else 60
    kinds = ("none", "bf16", "fp16", "powersgd", "topk")
    with WorkerPool(4, timeout_s=1800, threads=1) as pool:
        state = {k: pool.run(_state_bytes, k, TINY_GPT)[0] for k in ("0", "1", "2", "3", "fsdp2")}
        hier = pool.run(_hierarchical, TINY_GPT)
    activations = {m: _activations(m, act_kw, act_batch) for m in ("none", "selective", "full")}
    with WorkerPool(2, timeout_s=1800, threads=1) as pool, tempfile.TemporaryDirectory() as tmp:
        wire = {k: pool.run(_wire, k, TINY_GPT)[0] for k in kinds}
        losses = {k: pool.run(_final_val_loss, _loss_cfg(k, tmp, loss_steps))[0] for k in kinds}

    total = {k: sum(v.values()) for k, v in state.items()}
    payload = {
        "benchmark": "memory_zero", "ratio": total["3"] / total["fsdp2"],
        "ratio_meaning": "per-rank bytes of params+grads+optimizer state, plait ZeRO-3 / FSDP2, dp=4",
        "state_bytes_per_rank": state, "model": TINY_GPT, "dp": 4,
        "activations": {"model": act_kw, "batch": act_batch, "bytes": activations},
        "compression": {"wire_bytes_per_step": {k: v["wire"] for k, v in wire.items()},
                        "reduction": {k: wire["none"]["wire"] / v["wire"] for k, v in wire.items()},
                        "final_val_loss": losses, "loss_steps": loss_steps, "dp": 2,
                        "loss_vs_none": {k: v / losses["none"] for k, v in losses.items()}},
        "hierarchical": {"dp": 4, "node_size": 2, "per_rank": hier},
        "quick": args.quick,
    }
    write_json(args.json, payload)

    mib = 2 ** 20
    print_table("Hierarchical all-reduce, dp=4 in 2 nodes of 2: bytes each rank sends per step "
                "(a flat ring sends 2(n-1)/n·B per rank, and as much out of each node)",
                ["rank", "flat ring", "hier. intra-node", "hier. inter-node"],
                [[r, f"{h['flat'] / mib:.2f} MiB", f"{h['intra'] / mib:.2f} MiB", f"{h['inter'] / mib:.2f} MiB"]
                 for r, h in enumerate(hier)])
    print_table(f"Gradient compression, dp=2, GPT {TINY_GPT['n_layer']}x{TINY_GPT['n_embd']}: bytes per step; "
                f"held-out loss after {loss_steps} steps (2x128 GPT, generated corpus)",
                ["hook", "sent/step", "reduction", "val loss", "vs none"],
                [[k, f"{wire[k]['wire'] / 1024:.0f} KiB", f"{wire['none']['wire'] / wire[k]['wire']:.1f}x",
                  f"{losses[k]:.3f}", f"{losses[k] / losses['none']:.3f}"] for k in kinds])
    print_table(f"Activation memory, one process, GPT {act_kw['n_layer']}x{act_kw['n_embd']}, "
                f"batch {act_batch} x {act_kw['block_size']}",
                ["recompute", "held after forward", "peak fwd+bwd"],
                [[m, f"{a['held_after_forward'] / mib:.2f} MiB", f"{a['peak_step'] / mib:.2f} MiB"]
                 for m, a in activations.items()])
    names = {"0": "plain DP (ZeRO 0)", "1": "ZeRO-1", "2": "ZeRO-2", "3": "ZeRO-3", "fsdp2": "torch FSDP2"}
    print_table(f"Per-rank model state at dp=4, GPT {TINY_GPT['n_layer']}x{TINY_GPT['n_embd']} "
                f"(fp32, AdamW), after a backward",
                ["strategy", "params", "grads", "optimizer", "total", "vs ZeRO 0"],
                [[names[k], *(f"{v[p] / mib:.2f} MiB" for p in ("params", "grads", "optim")),
                  f"{total[k] / mib:.2f} MiB", f"{total[k] / total['0']:.3f}"] for k, v in state.items()])


if __name__ == "__main__":
    main()
