"""Tables and explanations of planner results, as rich renderables (the CLI prints them)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from plait.plan.check import RunCheck
from plait.plan.cost import Estimate
from plait.plan.hardware import Cluster
from plait.plan.shapes import ModelShape

_WHY = {
    "matmul": "matmuls and attention at the achievable matmul rate",
    "other ops": "memory-bound ops: norms, GELU, softmax/cross-entropy, adds, copies",
    "tp comm": "tensor-parallel collectives inside every block (not overlapped)",
    "pipeline bubble": "pipeline fill and drain, and unequal stages",
    "p2p": "activations sent between pipeline stages",
    "dp comm": "gradient reduction and ZeRO gathers not hidden behind backward",
    "tied grads": "summing the embedding/head gradients across the first and last stage",
    "optimizer": "AdamW step and gradient clipping (memory-bound)",
    "core sharing": "more busy processes than CPU cores",
}


def _knobs(e: Estimate) -> str:
    c = e.candidate
    if c.pp == 1:
        return "-"
    return c.schedule + (f"×{c.virtual_stages}" if c.virtual_stages > 1 else "")


def layouts_table(results: list[Estimate], shape: ModelShape, cluster: Cluster, global_batch: int,
                  title: str | None = None) -> Table:
    """One row per layout: its knobs, predicted step, throughput, memory and what bounds it."""
    dev = cluster.device
    table = Table(title=title or f"{escape(shape.name)} on {cluster.devices} × {escape(dev.name)}, "
                                 f"{global_batch} × {shape.seq} tokens per step")
    for col in ("#", "dp·pp·tp", "zero", "mb×m", "schedule", "recompute", "sp", "step s", "tokens/s",
                "TFLOP/s/dev", "MFU", "mem GB", "bound"):
        table.add_column(col, justify="right" if col not in ("dp·pp·tp", "schedule", "recompute", "bound") else "left")
    for i, e in enumerate(results, 1):
        c = e.candidate
        table.add_row(str(i), f"{c.dp}·{c.pp}·{c.tp}", str(c.zero), f"{c.micro_batch}×{e.microbatches}",
                      _knobs(e), c.recompute, "yes" if c.sequence_parallel else "-", f"{e.step_s:.3g}",
                      f"{e.tokens_per_s:,.0f}", f"{e.hardware_flops_per_device / 1e12:.3g}",
                      f"{100 * e.mfu:.1f}%", f"{e.memory.total / 1e9:.3g}", e.bound)
    return table


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else ("es" if noun.endswith("h") else "s"))


def reasoning(e: Estimate, cluster: Cluster) -> Text:
    """Why this layout: where its step time goes and what its memory holds."""
    c = e.candidate
    lines = [f"{c.label()}, ZeRO {c.zero}, {_count(e.microbatches, 'micro-batch')} of "
             f"{_count(c.micro_batch, 'sequence')}, "
             f"recompute {c.recompute}" + (", sequence parallel" if c.sequence_parallel else "")
             + (f", {c.schedule}" + (f" with {c.virtual_stages} chunks" if c.virtual_stages > 1 else "")
                if c.pp > 1 else "") + f": {e.step_s:.4g} s per step"]
    for name, t in sorted(e.breakdown.items(), key=lambda kv: -kv[1]):
        if t > 0.005 * e.step_s:
            lines.append(f"  {100 * t / e.step_s:5.1f}%  {name}: {_WHY.get(name, name)}")
    m, cap = e.memory, cluster.device.mem_bytes
    lines.append(f"  memory per device {m.total / 1e9:.3g} GB of {cap / 1e9:.3g} GB: weights "
                 f"{m.weights / 1e9:.3g}, gradients {m.gradients / 1e9:.3g}, optimizer {m.optimizer / 1e9:.3g}, "
                 f"activations {m.activations / 1e9:.3g}, logits {m.logits / 1e9:.3g}")
    return Text("\n".join(lines))


def check_table(check: RunCheck) -> Table:
    """A finished run's measured step next to the prediction for its layout."""
    e = check.estimate
    c = e.candidate
    table = Table(title=f"predicted vs measured: {escape(check.run_dir)} ({c.label()}, "
                        f"{check.world} processes)")
    table.add_column("")
    table.add_column("step s", justify="right")
    table.add_column("tokens/s", justify="right")
    tokens = e.tokens_per_s * e.step_s
    table.add_row("predicted", f"{e.step_s:.4g}", f"{e.tokens_per_s:,.0f}")
    table.add_row(f"measured (median of {check.steps} steps)", f"{check.measured_step_s:.4g}",
                  f"{tokens / check.measured_step_s:,.0f}")
    table.add_row("error", f"{100 * check.error:+.1f}%", "")
    return table
