"""Write a chosen layout as a plait config (TOML) that `plait train` accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plait.plan.cost import Estimate
from plait.plan.shapes import ModelShape


def layout_table(dp: int, pp: int, tp: int) -> dict[str, str]:
    """The Megatron-LM named layout restricted to the mesh dimensions in use."""
    out: dict[str, str] = {}
    if dp > 1:
        out["batch"] = "dp"
    if tp > 1:
        out.update(heads="tp", mlp="tp", vocab="tp")
    if pp > 1:
        out["layers"] = "pp"
    return out


def config_dict(est: Estimate, shape: ModelShape, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (a config as nested dicts; defaults when None) with the estimate's layout in it."""
    c = est.candidate
    raw: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
    model = raw.setdefault("model", {})
    model.update(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, block_size=shape.seq,
                 vocab_size=shape.vocab, bias=shape.bias, dropout=shape.dropout)
    raw.setdefault("train", {}).update(micro_batch_size=c.micro_batch, grad_accum=est.microbatches)
    parallel = raw.setdefault("parallel", {})
    parallel.update(dp=c.dp, pp=c.pp, tp=c.tp, zero=c.zero, recompute=c.recompute,
                    sequence_parallel=c.sequence_parallel, layout=layout_table(c.dp, c.pp, c.tp))
    if c.pp > 1:
        parallel.update(schedule=c.schedule, virtual_stages=c.virtual_stages, microbatches=0,
                        partition=c.partition)
    return raw


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} to TOML")


def _table(name: str, values: dict[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in values.items() if not (isinstance(v, dict) and k != "layout")}
    lines.append(f"[{name}]")
    lines += [f"{k} = {_value(v)}" for k, v in scalars.items()]
    lines.append("")
    for k, v in values.items():
        if isinstance(v, dict) and k != "layout":
            _table(f"{name}.{k}", v, lines)


def write_config(path: str | Path, raw: dict[str, Any], header: str) -> Path:
    """Write nested dicts as TOML, `header` as a comment on top."""
    lines = [f"# {line}" for line in header.splitlines()] + [""]
    for name, values in raw.items():
        _table(name, values, lines)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines))
    return p
