"""Mesh-TensorFlow named-dimension layouts, compiled into plait's strategies.

Mesh-TensorFlow (Shazeer et al. 2018) names every tensor dimension and lays a model out on a
device mesh by a *layout*: a map from dimension names to mesh dimensions. plait's mesh has three
dimensions (dp, pp, tp), and its GPT's tensors are named here, so a layout such as

    {batch = "dp", heads = "tp", mlp = "tp", vocab = "tp", layers = "pp"}

says what `parallel.dp/pp/tp` and `GPT.plan()` say: split the batch over dp (data parallelism),
the heads, MLP width and vocabulary over tp (Megatron-LM's tensor parallelism) and the blocks
over pp (the pipeline). `compile_layout` turns a layout into plait's own terms: mesh sizes, a
tensor-parallel plan in `GPT.plan()`'s format, and the pipeline's layer cut.

A layout is refused, with the rule it breaks, when
  1. it names an unknown tensor dimension or mesh dimension;
  2. one tensor would lay two of its dimensions on one mesh dimension (Mesh-TF's rule);
  3. a split dimension's size is not divisible by its mesh dimension (Mesh-TF's rule; `layers`
     follows the pipeline's rules instead, since plait cuts it by a balanced, uneven split);
  4. plait has no strategy for the placement (it lays batch on dp, layers on pp, and heads,
     mlp, vocab on tp);
  5. a mesh dimension larger than 1 carries no tensor dimension (its ranks would repeat work).

Sequence parallelism (Korthikanti et al. 2022) splits the sequence over tp *between* blocks and
gathers it inside them: a change of layout from one region to the next, which one Mesh-TF layout
cannot say (q, k and v would hold both `sequence` and `heads` on tp). It stays the
`parallel.sequence_parallel` switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plait.errors import LayoutError
from plait.plan.cut import pipeline_cut
from plait.plan.shapes import ModelShape

MESH_DIMS = ("dp", "pp", "tp")
DIMS: dict[str, str] = {
    "batch": "the sequences of a step",
    "sequence": "positions within a sequence",
    "hidden": "the model width (model.n_embd)",
    "heads": "attention heads (model.n_head)",
    "head_dim": "the width of one head",
    "mlp": "the MLP's inner width (4 × n_embd)",
    "vocab": "the token vocabulary (model.vocab_size)",
    "layers": "the stack of blocks (model.n_layer)",
}
# Megatron-LM's layout: data, tensor (heads, MLP, vocabulary) and pipeline parallelism.
MEGATRON = {"batch": "dp", "heads": "tp", "mlp": "tp", "vocab": "tp", "layers": "pp"}
# Where plait has a strategy for a dimension.
SUPPORTED = {"batch": "dp", "layers": "pp", "heads": "tp", "mlp": "tp", "vocab": "tp"}

# The GPT's tensors by named dimensions (weights of a block carry `layers`: they are stacked).
# An integer is a fixed, unsplittable axis (the fused q|k|v axis of the qkv projection).
TENSORS: dict[str, tuple[str | int, ...]] = {
    "tokens": ("batch", "sequence"),
    "tok_emb.weight": ("vocab", "hidden"),
    "pos_emb.weight": ("sequence", "hidden"),
    "residual stream": ("batch", "sequence", "hidden"),
    "norm.weight": ("layers", "hidden"),
    "attn.qkv.weight": ("layers", "hidden", 3, "heads", "head_dim"),
    "q, k, v": ("batch", "sequence", "heads", "head_dim"),
    "attn.proj.weight": ("layers", "heads", "head_dim", "hidden"),
    "mlp.fc.weight": ("layers", "hidden", "mlp"),
    "mlp activation": ("batch", "sequence", "mlp"),
    "mlp.proj.weight": ("layers", "mlp", "hidden"),
    "logits": ("batch", "sequence", "vocab"),
}


@dataclass(frozen=True)
class _Module:
    """A GPT module as the tensor-parallel plan names it: its kind and its weight's dimensions."""

    pattern: str
    kind: str  # embedding | linear | attention | loss
    in_dims: tuple[str | int, ...] = ()
    out_dims: tuple[str | int, ...] = ()


_MODULES = (
    _Module("tok_emb", "embedding", ("vocab",), ("hidden",)),
    _Module("blocks.*.attn", "attention", out_dims=("heads",)),
    _Module("blocks.*.attn.qkv", "linear", ("hidden",), (3, "heads", "head_dim")),
    _Module("blocks.*.attn.proj", "linear", ("heads", "head_dim"), ("hidden",)),
    _Module("blocks.*.mlp.fc", "linear", ("hidden",), ("mlp",)),
    _Module("blocks.*.mlp.proj", "linear", ("mlp",), ("hidden",)),
    _Module("head", "linear", ("hidden",), ("vocab",)),
    _Module("loss_fn", "loss", out_dims=("vocab",)),
)
# Modules on the residual stream (batch, sequence, hidden), which no tp split touches: their
# styles keep them consistent across tp ranks (one dropout mask, positions and norms replicated,
# or split along the sequence under sequence parallelism).
_RESIDUAL = {"pos_emb": "position_embedding", "drop": "dropout", "blocks.*.ln1": "sequence_parallel",
             "blocks.*.ln2": "sequence_parallel", "blocks.*.drop": "dropout", "ln_f": "sequence_parallel"}


def _style(module: _Module, split: set[str]) -> str | None:
    """The plan style that splits `module` along the dimensions in `split` (None: not split)."""
    ins = [d for d in module.in_dims if d in split]
    outs = [d for d in module.out_dims if d in split]
    if not ins and not outs:
        return None
    if module.kind == "embedding":
        return "vocab_embedding"
    if module.kind == "attention":
        return "heads"
    if module.kind == "loss":
        return "vocab_loss"
    if outs:
        if "vocab" in outs:
            return "vocab_head"
        fused = 1
        for d in module.out_dims[:module.out_dims.index(outs[0])]:
            fused *= d if isinstance(d, int) else 1
        return f"column(fused={fused})" if fused > 1 else "column"
    return "row"


def dim_sizes(shape: ModelShape, global_batch: int | None = None) -> dict[str, int | None]:
    """The length of each named dimension (batch only when the global batch is known)."""
    return {"batch": global_batch, "sequence": shape.seq, "hidden": shape.n_embd,
            "heads": shape.n_head, "head_dim": shape.head_dim, "mlp": 4 * shape.n_embd,
            "vocab": shape.vocab, "layers": shape.n_layer}


def parse_layout(text: str) -> dict[str, str]:
    """'batch=dp,heads=tp' -> {'batch': 'dp', 'heads': 'tp'}."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, mesh = item.partition("=")
        if not sep or not name.strip() or not mesh.strip():
            raise LayoutError(f"layout entry {item!r} must be DIMENSION=MESH_DIM, e.g. heads=tp")
        out[name.strip()] = mesh.strip()
    return out


def check_layout(layout: Mapping[str, Any], shape: ModelShape, sizes: Mapping[str, int | None], *,
                 global_batch: int | None = None, virtual_stages: int = 1) -> dict[str, str]:
    """The layout as {dimension: mesh dimension}, or LayoutError naming the rule it breaks.

    `sizes` gives dp, pp and tp (dp may be None when it is only known at launch).
    """
    if not isinstance(layout, Mapping):
        raise LayoutError(f"a layout is a table of dimension = mesh dimension, got {layout!r}")
    out: dict[str, str] = {}
    for name, mesh in layout.items():  # rule 1: names
        if name not in DIMS:
            raise LayoutError(f"layout names tensor dimension {name!r}, which the GPT does not have; "
                              f"valid: {', '.join(DIMS)}")
        if mesh not in MESH_DIMS:
            raise LayoutError(f"layout puts {name} on mesh dimension {mesh!r}; valid: {', '.join(MESH_DIMS)}")
        out[name] = mesh
    for tensor, dims in TENSORS.items():  # rule 2 (Mesh-TF): one mesh dimension per tensor dimension
        seen: dict[str, str] = {}
        for d in dims:
            mesh = out.get(d) if isinstance(d, str) else None
            if mesh is None:
                continue
            if mesh in seen:
                raise LayoutError(
                    f"layout breaks Mesh-TensorFlow's rule that a tensor lays at most one dimension on "
                    f"each mesh dimension: {tensor} {_dims(dims)} would lay both {seen[mesh]} and {d} "
                    f"on {mesh}; put one of them elsewhere")
            seen[mesh] = d
    lengths = dim_sizes(shape, global_batch)
    for name, mesh in out.items():  # rule 3 (Mesh-TF): even splits
        n, size = sizes.get(mesh), lengths[name]
        if n is None or size is None or n == 1:
            continue
        if name == "layers":
            _check_layers(shape, n, virtual_stages)
        elif size % n:
            raise LayoutError(
                f"layout breaks Mesh-TensorFlow's rule that a split dimension divides evenly: {name} "
                f"({DIMS[name]}) has size {size}, not divisible by {mesh}={n}; choose a {mesh} that "
                f"divides {size}" + (" or pad model.vocab_size" if name == "vocab" else ""))
    for name, mesh in out.items():  # rule 4: what plait compiles
        if SUPPORTED.get(name) != mesh:
            raise LayoutError(
                f"plait has no strategy that lays {name} on {mesh} (Mesh-TF could); plait lays batch on "
                "dp, layers on pp, and heads, mlp, vocab on tp")
    used = set(out.values())
    for mesh in MESH_DIMS:  # rule 5: no idle mesh dimension
        n = sizes.get(mesh)
        if n is not None and n > 1 and mesh not in used:
            want = {"dp": "batch", "pp": "layers", "tp": "heads, mlp and vocab"}[mesh]
            raise LayoutError(f"mesh dimension {mesh}={n} carries no tensor dimension, so its ranks would "
                              f"repeat each other's work; lay {want} on {mesh}, or set {mesh} = 1")
    return out


def _dims(dims: tuple[str | int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims if isinstance(d, str)) + ")"


def _check_layers(shape: ModelShape, pp: int, virtual_stages: int) -> None:
    # plait's pipeline cuts [embedding, blocks, head] by a balanced split: no even division needed,
    # except for interleaved virtual stages, which hold equal runs of blocks (Megatron-LM's rule).
    if pp > shape.n_layer + 2:
        raise LayoutError(f"layers on pp={pp}: the pipeline needs at least one of the {shape.n_layer + 2} "
                          f"layers (embedding, {shape.n_layer} blocks, head) per stage")
    if virtual_stages > 1 and shape.n_layer % (pp * virtual_stages):
        raise LayoutError(f"layers on pp={pp} with {virtual_stages} virtual stages: the {shape.n_layer} "
                          f"blocks must divide evenly into pp × virtual_stages = {pp * virtual_stages} chunks")


def tp_plan(layout: Mapping[str, str]) -> dict[str, str]:
    """The tensor-parallel plan (`GPT.plan()`'s format) for the dimensions the layout puts on tp."""
    split = {d for d, mesh in layout.items() if mesh == "tp"}
    if not split:
        return {}
    plan: dict[str, str] = {}
    for module in _MODULES:
        style = _style(module, split)
        if style is not None:
            plan[module.pattern] = style
    return {**dict(_RESIDUAL), **plan}


@dataclass(frozen=True)
class CompiledLayout:
    """A layout in plait's terms: mesh sizes, the tensor-parallel plan, the pipeline cut."""

    layout: dict[str, str]
    dp: int | None
    pp: int
    tp: int
    tp_plan: dict[str, str] = field(default_factory=dict)
    pipeline_cut: tuple[tuple[int, int], ...] = ()  # [start, end) over [embedding, blocks, head]

    @property
    def full_tensor_parallel(self) -> bool:
        """Whether heads, mlp and vocab are all on tp (the plan is then GPT.plan() itself)."""
        return all(self.layout.get(d) == "tp" for d in ("heads", "mlp", "vocab"))


def compile_layout(layout: Mapping[str, Any], shape: ModelShape, *, dp: int | None = 1, pp: int = 1,
                   tp: int = 1, global_batch: int | None = None, partition: str = "params",
                   virtual_stages: int = 1) -> CompiledLayout:
    """Check `layout` on a dp × pp × tp mesh and compile it (LayoutError when it is illegal)."""
    checked = check_layout(layout, shape, {"dp": dp, "pp": pp, "tp": tp},
                           global_batch=global_batch, virtual_stages=virtual_stages)
    cut = pipeline_cut(shape, pp, partition, virtual_stages) if pp > 1 else ()
    return CompiledLayout(checked, dp, pp, tp, tp_plan(checked) if tp > 1 else {}, cut)


def check_config_layout(parallel: Any, model: Any, dp: int | None = None) -> None:
    """A config's `parallel.layout` against its own sizes (LayoutError naming the rule).

    `plait train` applies the model's whole plan (GPT.plan()) whenever tp > 1, so a layout in a
    config must put all of heads, mlp and vocab on tp or none; partial plans are for the library
    (`compile_layout(...).tp_plan` passed to `parallelize(..., plan=...)`).
    """
    layout = getattr(parallel, "layout", None)
    if not layout:
        return
    from plait.plan.shapes import shape_from_config

    shape = shape_from_config(model)
    dp = dp if dp is not None else (parallel.dp or None)
    checked = check_layout(layout, shape, {"dp": dp, "pp": parallel.pp, "tp": parallel.tp},
                           virtual_stages=getattr(parallel, "virtual_stages", 1))
    on_tp = [d for d in ("heads", "mlp", "vocab") if checked.get(d) == "tp"]
    if on_tp and len(on_tp) < 3:
        raise LayoutError(f"layout puts only {', '.join(on_tp)} on tp; in a config, lay all of heads, mlp "
                          "and vocab on tp or none (a partial split is available through "
                          "plait.plan.layout.compile_layout and parallelize(..., plan=...))")
