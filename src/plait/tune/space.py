"""Search spaces over plait config fields: `train.lr=loguniform(1e-4, 1e-2)` and friends.

A space maps dotted config fields to distributions. Spellings (the arguments are TOML values; a
bare word is a string, as in `--set`):

    uniform(LOW, HIGH)       a float in [LOW, HIGH]
    loguniform(LOW, HIGH)    a float in [LOW, HIGH], uniform in log space (0 < LOW < HIGH)
    randint(LOW, HIGH)       an integer in [LOW, HIGH], both ends included
    choice(A, B, ...)        one of the values, drawn at random
    grid(A, B, ...)          every value in turn (each grid point gets tune.trials samples)

Parsing and checking import neither Ray nor torch; :meth:`Distribution.to_ray` imports Ray Tune.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
import typing
from dataclasses import dataclass
from typing import Any

from plait.config import Config
from plait.errors import ConfigError

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
EXAMPLE = "train.lr=loguniform(1e-4, 1e-2)"


@dataclass(frozen=True)
class Distribution:
    """One field's distribution: `kind` and its arguments (the bounds, or the listed values)."""

    kind: str
    args: tuple[Any, ...]

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    def corners(self) -> list[Any]:
        """The values that bound what this can draw: every listed value, or the two ends."""
        return list(self.args)

    def to_ray(self) -> Any:
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # Ray's upper end is excluded
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(_show(a) for a in self.args)})"


def _show(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else str(value)


def field_kind(name: str) -> type:
    """The type of config field `name` ("train.lr"); ConfigError when it is not a field."""
    parts = name.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        where = ".".join(parts[:i]) or "the config"
        if part not in hints:
            valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise ConfigError(f"tune.search names unknown field {name!r}: {where} has no {part!r}; "
                              f"valid: {valid}")
        kind = hints[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(kind) != (not last):
            if last:
                raise ConfigError(f"tune.search field {name!r} is a section, not a value; name a "
                                  f"field inside it, e.g. {name}.{dataclasses.fields(kind)[0].name}")
            raise ConfigError(f"tune.search field {name!r}: {'.'.join(parts[:i + 1])!r} is a value, "
                              "not a section")
        cls = kind
    if name.startswith("tune."):
        raise ConfigError(f"tune.search cannot search {name!r}: the [tune] section sets up the sweep")
    if typing.get_origin(cls) in (list, dict):
        raise ConfigError(f"tune.search cannot search {name!r}, a list or table; search scalar fields")
    return cls


def _args(text: str) -> list[Any]:
    """Comma-separated TOML values; a value that is not TOML is a bare string."""
    try:
        return list(tomllib.loads(f"v = [{text}]")["v"])
    except tomllib.TOMLDecodeError:
        pass
    out = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            out.append(tomllib.loads(f"v = {piece}")["v"])
        except tomllib.TOMLDecodeError:
            out.append(piece)
    return out


def parse_distribution(name: str, text: str) -> Distribution:
    """Parse `text` ("loguniform(1e-4, 1e-2)") as the distribution of field `name`."""
    text = text.strip()
    kind, _, rest = text.partition("(")
    kind = kind.strip()
    where = f"tune.search {name}={text!r}"
    if not rest.endswith(")") or kind not in KINDS:
        raise ConfigError(f"{where} is not a distribution; write KIND(ARGS) with KIND one of "
                          f"{', '.join(KINDS)}, e.g. {EXAMPLE}")
    inner = rest[:-1].strip()
    args = _args(inner) if inner else []
    kind_of_field = field_kind(name)
    if kind in ("choice", "grid"):
        if not args or any(a == "" for a in args):
            raise ConfigError(f"{where}: {kind} needs one or more values, e.g. {kind}(2, 4)")
        return Distribution(kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes two numbers (low, high), e.g. {kind}(1, 8)"
                          if kind == "randint" else
                          f"{where}: {kind} takes two numbers (low, high), e.g. {kind}(1e-4, 1e-2)")
    low, high = args
    if kind == "randint":
        if kind_of_field is not int or not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint draws integers for an integer field with integer "
                              f"bounds; {name} is {kind_of_field.__name__}"
                              + ("; use uniform or loguniform" if kind_of_field is float else
                                 "; use choice(...)"))
    elif kind_of_field is not float:
        hint = "randint(LOW, HIGH) or choice(...)" if kind_of_field is int else "choice(...)"
        raise ConfigError(f"{where}: {kind} draws floats but {name} is {kind_of_field.__name__}; "
                          f"use {hint}")
    if not low < high:
        raise ConfigError(f"{where}: the low end {low} must be below the high end {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got {low}")
    if not all(math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: the bounds must be finite")
    return Distribution(kind, (float(low), float(high)) if kind != "randint" else (low, high))


def parse_spec(spec: str) -> tuple[str, Distribution]:
    """`FIELD=DIST(ARGS)` (the `--search` flag) as (field, distribution)."""
    name, sep, text = spec.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--search {spec!r} has no '='; write FIELD=DIST(ARGS), e.g. {EXAMPLE}")
    return name.strip(), parse_distribution(name.strip(), text)


def parse_space(search: dict[str, str], specs: list[str] | None = None) -> dict[str, Distribution]:
    """The space of a [tune] search table, with `--search` specs added (they win on a clash)."""
    space = {name: parse_distribution(name, text) for name, text in search.items()}
    for spec in specs or []:
        name, dist = parse_spec(spec)
        space[name] = dist
    return space


def set_field(raw: dict[str, Any], name: str, value: Any) -> None:
    """Set dotted field `name` in a raw (TOML-shaped) config dict."""
    *sections, key = name.split(".")
    for section in sections:
        raw = raw.setdefault(section, {})
    raw[key] = value


def corner_points(space: dict[str, Distribution], limit: int = 256) -> list[dict[str, Any]]:
    """Points that bound the space: every combination of each field's corner values, or, when
    there are more than `limit`, each field's corners with the other fields at their first."""
    names = list(space)
    values = [space[n].corners() for n in names]
    if math.prod(len(v) for v in values) <= limit:
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]
    first = {n: v[0] for n, v in zip(names, values)}
    return [{**first, n: x} for n, v in zip(names, values) for x in v]
