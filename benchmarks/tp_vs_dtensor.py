"""plait's Megatron tensor parallelism vs torch DTensor tensor parallelism, tp=2 on Gloo.

The same GPT from the same weights, split two ways over 2 CPU processes: plait's plan
(`GPT.plan()`: column/row linears, vocab-parallel embedding, tied head and cross-entropy), and
torch's `parallelize_module` with ColwiseParallel (qkv, fc, head) / RowwiseParallel (proj,
embedding) and `loss_parallel`, the qkv rows permuted so each rank holds whole q, k and v heads as
plait does. Both compute the same losses (checked on the warm-up steps). Each step is forward, backward, gradient
clipping and an AdamW step on the same batch; the variants take turns step by step, in an order
reversed every other round (plait, torch, plait + sequence parallelism, then the reverse), and
report median step times. Ratios are medians of side-by-side step ratios (`paired_ratio`), which
a shared machine's drifting load does not move; the ratio of the medians is kept next to them.

    python benchmarks/tp_vs_dtensor.py [--quick] [--json benchmarks/results/tp_vs_dtensor.json]
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (benchmark_parser, median, paired_ratio, print_table, round_order,  # noqa: E402
                    slowest_rank_steps, write_json)
from plait.config import ModelConfig  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

VARIANTS = ("plait-tp", "torch-dtensor", "plait-tp-sp")
TP = 2


def _dtensor_gpt(model, tp: int):
    """Split `model` (a plain GPT) with torch's tensor-parallel styles; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (tp,))
    c = model.cfg.n_embd
    # Colwise splits qkv's rows in plain chunks; order them [q0 k0 v0 | q1 k1 v1] so each rank's
    # chunk holds its own heads of q, k and v (what plait's fused column split does).
    order = torch.arange(3 * c).view(3, tp, c // tp).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.copy_(block.attn.qkv.weight[order])
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.copy_(block.attn.qkv.bias[order])
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(len(model.blocks)):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    model.head.weight = model.tok_emb.weight  # both Shard(0) over the vocabulary: re-tie them
    return model


def _clip_mixed(params, max_norm: float) -> float:
    """clip_grad_norm_ for a model holding both DTensor and plain parameters (torch's refuses to
    mix them): one reduction for the sharded norms, as torch does for an all-DTensor model."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2
    total = (total + torch.nn.utils.get_total_norm(plain) ** 2).sqrt().item()
    coef = min(1.0, max_norm / (total + 1e-6))
    for group in (sharded, plain):
        torch._foreach_mul_(group, coef)
    return total


def _bench(model_kw: dict, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from plait.config import ParallelConfig, TrainConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel import parallelize
    from plait.optim import build_optimizer

    cfg = ModelConfig(**model_kw)
    train_cfg = TrainConfig(lr=1e-4, grad_clip=1.0)
    mesh = ParallelMesh.build(tp=TP)
    torch.manual_seed(0)
    plain = GPT(cfg)
    models, opts = {}, {}
    for name in VARIANTS:
        m = copy.deepcopy(plain)
        if name == "torch-dtensor":
            m = _dtensor_gpt(m, TP)
            opts[name] = build_optimizer(m, train_cfg, mesh.device)
        else:
            m = parallelize(m, mesh, ParallelConfig(tp=TP, sequence_parallel=name.endswith("sp")))
            opts[name] = m.build_optimizer(train_cfg)
        models[name] = m
    g = torch.Generator().manual_seed(0)  # the same batch on both tp ranks (one dp replica)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def step(name: str) -> tuple[float, float]:
        m, opt = models[name], opts[name]
        dist.barrier()
        t0 = time.perf_counter()
        if name == "torch-dtensor":
            with loss_parallel():
                _, loss = m(x, y)
                loss.backward()
            _clip_mixed(list(m.parameters()), train_cfg.grad_clip)
        else:
            loss = m.forward_backward([(x, y)])
            m.clip_grad_norm_(train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        return dt, loss.item()

    # Warm-up steps double as the agreement check: same weights, same batch, same updates.
    warmup_losses = {name: [step(name)[1] for _ in range(warmup)] for name in VARIANTS}
    times = {n: [] for n in VARIANTS}
    for r in range(rounds):
        for name in round_order(list(VARIANTS), r):
            times[name] += [step(name)[0] for _ in range(steps)]
    return {"times": times, "warmup_losses": warmup_losses}


def main() -> None:
    ap = benchmark_parser(__doc__, "a smaller model and fewer rounds (under a minute)")
    args = ap.parse_args()
    if args.quick:
        model_kw = dict(n_layer=4, n_head=8, n_embd=128, block_size=128, dropout=0.0)
        batch, rounds, steps, warmup = 8, 15, 1, 2
    else:
        model_kw = dict(n_layer=6, n_head=8, n_embd=256, block_size=128, dropout=0.0)
        batch, rounds, steps, warmup = 8, 48, 1, 3  # one step per turn: pairs meet the same load
    with WorkerPool(TP, timeout_s=1800, threads=1) as pool:
        results = pool.run(_bench, model_kw, batch, rounds, steps, warmup, timeout_s=1800)
    per_step = {n: slowest_rank_steps([r["times"][n] for r in results]) for n in VARIANTS}
    med = {n: median(v) for n, v in per_step.items()}
    vs_peer = {n: paired_ratio(per_step[n], per_step["torch-dtensor"]) for n in VARIANTS}
    ratio = vs_peer["plait-tp"]
    losses = results[0]["warmup_losses"]
    loss_gap = max(abs(a - b) for n in VARIANTS for a, b in zip(losses[n], losses["torch-dtensor"]))
    from plait.models import GPT
    params = GPT(ModelConfig(**model_kw)).num_params()
    payload = {
        "benchmark": "tp_vs_dtensor", "ratio": ratio, "sp_ratio": vs_peer["plait-tp-sp"],
        "ratio_is": "median over rounds of plait's step time / DTensor's step time in the same round",
        "ratio_of_medians": med["plait-tp"] / med["torch-dtensor"],
        "sp_ratio_of_medians": med["plait-tp-sp"] / med["torch-dtensor"],
        "median_step_s": med, "step_s": per_step, "steps_per_variant": len(per_step["torch-dtensor"]),
        "warmup_losses": losses, "max_warmup_loss_gap": loss_gap,
        "tp": TP, "backend": "gloo", "threads_per_rank": 1, "model": model_kw, "params": params,
        "batch": batch, "quick": args.quick, "target": "ratio <= 1.0",
    }
    write_json(args.json, payload)
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{vs_peer[n]:.3f}", f"{med[n] / med['torch-dtensor']:.3f}"]
            for n in VARIANTS]
    print_table(f"tp={TP} gloo, GPT {params / 1e6:.2f}M params, batch {batch} x {model_kw['block_size']} "
                f"(median of {len(per_step['torch-dtensor'])} steps; losses of the {warmup} warm-up steps "
                f"agree within {loss_gap:.1e})",
                ["variant", "step ms", "vs DTensor (paired)", "ratio of medians"], rows)


if __name__ == "__main__":
    main()
