"""`plait export RUN --format onnx OUT.onnx [--int8]`: a GPT or the digits MLP for ONNX Runtime.

The graph comes from torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, which needs
onnxscript) with dynamic axes: the batch for both models, and the sequence (up to
model.block_size) for the GPT. Every export is run once by ONNX Runtime and compared with
PyTorch before it is kept. `--int8` quantizes the weights of every MatMul/Gemm (and the GPT's
embedding Gather) with ONNX Runtime's dynamic quantization: int8 weights, activations quantized
on the fly, so no calibration data is needed. ONNX Runtime's graph optimizer then fuses the MLP's
quantize → integer matmul → rescale → bias chains into one DynamicQuantizeMatMul each (a
com.microsoft op, so that int8 file is for ONNX Runtime), which with the weights' all-zero zero
points left out brings its int8 file under 0.3 of the fp32 one.

Inputs and outputs: GPT `idx` int64 (batch, seq) → `logits` float32 (batch, seq, vocab); MLP `x`
float32 (batch, 64), pixel intensities in [0, 1] → `logits` float32 (batch, 10).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from plait.config import ModelConfig
from plait.errors import ExportError
from plait.export.common import (INPUT, PARITY_TOL, check_out, example_input, probe_inputs,
                                 quiet_exporter, write_atomic)

log = logging.getLogger(__name__)

EDGE_EXTRA = "pip install 'plait[edge]'"


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its size, and how closely the fp32 graph matched."""

    path: Path
    arch: str
    int8: bool
    bytes: int
    max_abs_diff: float  # fp32 graph vs PyTorch on the probe inputs
    checkpoint: Path
    skipped: list[str] = field(default_factory=list)


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ExportError(f"--format onnx needs {name}, which is not installed ({exc}); "
                              f"{EDGE_EXTRA}") from None


def _short_name(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        out = digits[i % 36] + out
        i //= 36
        if not i:
            return "t" + out


def compact(proto: Any) -> Any:
    """Drop what only debugging reads (per-node stack traces, doc strings, intermediate shape
    annotations, node names) and give weights and intermediate values short names; the graph
    inputs and outputs keep theirs. On the digits MLP this is a fifth of the int8 file.
    Returns `proto`, changed in place."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    # Subgraphs (If, Loop) may read outer values by name: such graphs keep all their names.
    nested = any(a.g.node or a.graphs for n in graph.node for a in n.attribute)

    def rename(name: str) -> str:
        if nested or not name or name in keep:  # "" marks an omitted optional input
            return name
        return names.setdefault(name, _short_name(len(names)))

    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for value in (*graph.input, *graph.output):
        del value.metadata_props[:]
    del graph.value_info[:]
    proto.doc_string = ""
    return proto


def _save(proto: Any, out: Path) -> None:
    import onnx

    write_atomic(out, lambda tmp: onnx.save_model(proto, tmp))


def to_onnx(model: nn.Module, cfg: ModelConfig, out: str | Path) -> Path:
    """Export `model` (a plait GPT or MLP in eval mode, on the CPU) to the ONNX file `out`.

    Batch (and, for the GPT, sequence) axes are dynamic; `cfg` is recorded in the file's
    metadata (`plait.arch`, `plait.model`).
    """
    _require("onnx", "onnxscript")
    arch = cfg.arch
    name = INPUT[arch]
    x = example_input(cfg)  # batch 2, not 1: a size-1 axis would be fixed to 1
    batch = torch.export.Dim("batch")
    axes: dict[int, Any] = {0: batch}
    if arch == "gpt":
        # min 2 as for the batch; size 1 still runs (the sizes 0/1 are not specialised on).
        axes[1] = torch.export.Dim("seq", max=cfg.block_size)
    model = model.eval()
    with torch.no_grad(), quiet_exporter():
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=[name],
                                        output_names=["logits"], dynamic_shapes={name: axes},
                                        verbose=False, report=False)
        except Exception as exc:  # the exporter raises many types; the cause goes to the user
            raise ExportError(f"torch.onnx.export could not export the model.arch={arch!r} model: "
                              f"{type(exc).__name__}: {exc}") from exc
    proto = compact(program.model_proto)
    import onnx

    onnx.helper.set_model_props(proto, {"plait.arch": arch,
                                        "plait.model": json.dumps(_model_fields(cfg), sort_keys=True)})
    out = Path(out)
    _save(proto, out)
    return out


def _model_fields(cfg: ModelConfig) -> dict[str, Any]:
    fields = {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
    if cfg.arch == "gpt":
        fields.update(n_head=cfg.n_head, block_size=cfg.block_size, vocab_size=cfg.vocab_size)
    return fields


# DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias): an omitted zero point means 0.
_ZERO_POINT_INPUT = {"DynamicQuantizeMatMul": 3}


def prune(proto: Any) -> Any:
    """Drop what a graph carries but does not need: all-zero weight zero points where the op
    defaults to 0 (symmetric int8 weights), initializers no node reads, and opset imports of
    domains no node uses (ONNX Runtime's optimizer declares every domain it knows).
    Returns `proto`, changed in place."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        i = _ZERO_POINT_INPUT.get(node.op_type)
        if node.domain == "com.microsoft" and i is not None and len(node.input) > i:
            zp = inits.get(node.input[i])
            if zp is not None and not numpy_helper.to_array(zp).any():
                node.input[i] = ""
    used = {n for node in graph.node for n in node.input} | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    domains = {node.domain or "" for node in graph.node}
    nested = any(a.g.node or a.graphs for n in graph.node for a in n.attribute)
    if not nested:  # subgraphs may use other domains: left as they are
        ops = [o for o in proto.opset_import if (o.domain or "") in domains | {""}]
        del proto.opset_import[:]
        proto.opset_import.extend(ops)
    return proto


def _fuse(src: Path, dst: Path) -> Path:
    """`src` as ONNX Runtime's graph optimizer rewrites it (extended level: fused contrib ops,
    no hardware-specific layouts), saved to `dst`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ExportError(f"ONNX Runtime could not optimize the int8 graph: {exc}") from None
    return dst


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True,
                  reduce_range: bool = True, fuse: bool | None = None) -> Path:
    """Dynamic int8 quantization of `src`'s weights into `dst` (ONNX Runtime's quantize_dynamic).

    MatMul/Gemm weights become signed int8 (per output channel with `per_channel`), the
    embedding table of a GPT too; activations are quantized to uint8 at run time.
    `reduce_range` keeps weights within 7 bits: x86 CPUs without VNNI multiply uint8 × int8
    pairs into saturating 16-bit sums, which full-range weights overflow (on the digits MLP that
    cost 1.7 accuracy points here; with 7-bit weights, none). `fuse` runs ONNX Runtime's graph
    optimizer on the result (see the module docstring): 13 nodes become 3 on the digits MLP, and
    the file then needs ONNX Runtime's contrib ops. By default everything but the GPT is fused:
    there the optimizer's constant folding stores a transposed uint8 copy of the tied embedding
    table for the head (+18% file, same logits).
    """
    _require("onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    meta = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
    gpt = meta.get("plait.arch") == "gpt"
    ops = ["MatMul", "Gemm"] + (["Gather"] if gpt else [])
    fuse = not gpt if fuse is None else fuse
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "int8.onnx"
        root = logging.getLogger()  # the quantizer logs a pre-processing hint on the root logger
        level = root.level
        root.setLevel(max(level, logging.ERROR))
        try:
            quantize_dynamic(src, staged, weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=ops)
        finally:
            root.setLevel(level)
        if fuse:
            staged = _fuse(staged, Path(tmp) / "fused.onnx")
        proto = prune(compact(onnx.load(staged)))
        onnx.helper.set_model_props(proto, {**meta, "plait.int8": "dynamic"})
        _save(proto, dst)
    return dst


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session for `path` with `threads` intra-op threads and no inter-op
    parallelism (an edge device's budget; also what makes timings comparable)."""
    _require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise ExportError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from None


def run_session(sess: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The logits `sess` computes for the input batch `x`."""
    feed = x.numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {sess.get_inputs()[0].name: feed})[0]


def max_difference(model: nn.Module, cfg: ModelConfig, path: str | Path) -> float:
    """Largest |ONNX Runtime − PyTorch| over probe inputs of other shapes than the traced one
    (one sample; several; for the GPT also the longest sequence), relative to the logits' scale."""
    sess = session(path)
    worst = 0.0
    with torch.no_grad():
        for x in probe_inputs(cfg):
            ref = model(x)
            got = torch.from_numpy(run_session(sess, x))
            if got.shape != ref.shape:
                raise ExportError(f"ONNX Runtime returned logits of shape {tuple(got.shape)} for an "
                                  f"input of shape {tuple(x.shape)}; PyTorch returns {tuple(ref.shape)}")
            scale = max(1.0, ref.abs().max().item())
            worst = max(worst, (got - ref).abs().max().item() / scale)
    return worst


def export_onnx(path: str | Path, out: str | Path, int8: bool = False) -> OnnxExport:
    """Export the model of the run or checkpoint folder `path` to the ONNX file `out`.

    The fp32 graph is checked against PyTorch (≤ 1e-4 relative) before anything is written;
    with `int8`, `out` holds the quantized graph. `out` must end in `.onnx` and not exist.
    """
    out = check_out(out, ".onnx", "onnx")
    _require("onnx", "onnxscript", "onnxruntime")
    import onnx

    from plait.export.source import load_source

    src = load_source(path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = to_onnx(src.model, src.cfg.model, Path(tmp) / "fp32.onnx")
        diff = max_difference(src.model, src.cfg.model, fp32)
        if diff > PARITY_TOL:
            raise ExportError(f"the ONNX graph of {str(src.checkpoint)!r} differs from PyTorch by "
                              f"{diff:.2e} (relative), more than {PARITY_TOL:g}; nothing was written")
        if int8:
            quantize_int8(fp32, out)
            run_session(session(out), example_input(src.cfg.model, 1))  # loads and runs
        else:
            _save(onnx.load(fp32), out)
    log.info("exported %s (%s) to %s", src.checkpoint, src.arch, out)
    return OnnxExport(out, src.arch, int8, out.stat().st_size, diff, src.checkpoint, src.skipped)
