"""Layout-independent checkpoint state for pipeline stages.

A pipelined checkpoint has exactly the form one process would write: the plain model's full
`state_dict()` and its optimizer's `state_dict()` with parameters numbered in the plain model's
order. Each stage knows its parameters by their plain-model names, so saving gathers
{name: tensor} and {name: optimizer state} from the stages, and loading lets each stage pick its
names, whatever pipeline size (1 included) wrote the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists with every tensor on the CPU (for pickling to another rank)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def group_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """Per optimizer group, the plain-model names of this stage's parameters (names: id -> name)."""
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def merge_layout(per_stage: list[list[list[str]]], order: dict[str, int]) -> list[list[str]]:
    """The full model's optimizer layout: per group, all stages' names in plain-model order.

    This is the numbering one process's optimizer would use (it groups parameters in model
    order); a tied parameter held by two stages appears once.
    """
    groups = len(per_stage[0])
    return [sorted({n for stage in per_stage for n in stage[k]}, key=order.__getitem__)
            for k in range(groups)]


# (parameter, tensor) -> tensor: gathers or slices tensor-parallel shards; identity by default.
Transform = Callable[[nn.Parameter, Any], Any]


def _same(p: nn.Parameter, t: Any) -> Any:
    return t


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str],
                          transform: Transform = _same) -> dict[str, Any]:
    """{"groups": hyper-parameters per group, "state": {name: per-parameter state}} on the CPU."""
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {names[id(params[i])]: to_cpu({k: transform(params[i], v) for k, v in s.items()})
             for i, s in sorted(sd["state"].items())}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"groups": groups, "state": state}


def full_optimizer_state(layout: list[list[str]], stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge stages' named optimizer states into one process's optimizer state_dict."""
    index = {n: i for i, n in enumerate(n for names in layout for n in names)}
    state: dict[int, Any] = {}
    for st in stages:
        for name, s in st["state"].items():
            state.setdefault(index[name], s)
    groups, start = [], 0
    for k, names in enumerate(layout):
        groups.append({**stages[0]["groups"][k], "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": state, "param_groups": groups}


def local_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str],
                          layout: list[list[str]], full: dict[str, Any],
                          transform: Transform = _same) -> dict[str, Any]:
    """This stage's optimizer state_dict, cut out of a full one numbered per `layout`."""
    saved_groups = full["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(n) for n in layout]:
        raise ValueError(
            f"optimizer state has groups of {[len(g['params']) for g in saved_groups]} parameters; "
            f"this model's are {[len(n) for n in layout]}"
        )
    by_name = {}
    for names_k, g in zip(layout, saved_groups):
        for name, idx in zip(names_k, g["params"]):
            if idx in full["state"]:
                by_name[name] = full["state"][idx]
    state, groups, i = {}, [], 0
    for g, saved in zip(optimizer.param_groups, saved_groups):
        ids = []
        for p in g["params"]:
            if names[id(p)] in by_name:
                state[i] = {k: transform(p, v) for k, v in by_name[names[id(p)]].items()}
            ids.append(i)
            i += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def canonical_names(model: nn.Module) -> tuple[dict[int, str], dict[str, str], dict[str, int]]:
    """For a plain model: param id -> its first name; every alias -> that name; name -> order."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        alias[name] = first[id(p)]
    order = {n: i for i, n in enumerate(n for n, _ in model.named_parameters())}
    return first, alias, order
