"""A bench spec (TOML or YAML): a base run config, the methods with their grids, the seeds, the validation and reported
targets, the declared selection rule, the noise floor, MUSE's scalability and sustainability, and attacks. Validated
like a run config: an unknown key or a bad value is one line naming the key and the file. Importing this module does
not import torch."""
from __future__ import annotations

import math
import operator
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from obliviate.errors import ObliviateError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
WORDS = {">=": "at least", "<=": "at most", ">": "above", "<": "below"}
# "utility_ratio >= 0.9", "ira >= 0.9 * original" (the original model's value of the same metric, from metrics.json)
_CONSTRAINT = re.compile(r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[-+0-9.eE]+)"
                         r"(?:\s*(?:\*|x|×)\s*(?P<original>original))?\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _known_metric(name: str) -> str:
    from obliviate.registry import METRICS

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r} (obliviate ls metrics)")
    return name


class Constraint(_Strict):
    metric: str
    op: str
    value: float
    relative: bool = False  # value x the original model's value of the metric

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        m = _CONSTRAINT.match(text)
        if not m:
            raise ValueError(f"constraint {text!r} must look like 'utility_ratio >= 0.9' or 'ira >= 0.9 * original'")
        try:
            value = float(m["value"])
        except ValueError:
            raise ValueError(f"constraint {text!r}: {m['value']!r} is not a number") from None
        return cls(metric=_known_metric(m["metric"]), op=m["op"], value=value, relative=bool(m["original"]))

    def words(self) -> str:
        return f"{self.metric} {WORDS[self.op]} {self.value:g}" + ("x the original's" if self.relative else "")

    def check(self, metrics: dict) -> tuple[bool, str | None]:
        """(met, why not) on one candidate's metrics (metrics.json's top level, with "original" beside)."""
        value = metrics.get(self.metric)
        bound = self.value
        if self.relative:
            # the original's row in metrics.json (language models), or its flat original_<metric> (text-to-image)
            reference = (metrics.get("original") or {}).get(self.metric, metrics.get(f"original_{self.metric}"))
            if not _number(reference):
                return False, f"no original {self.metric} to compare with"
            bound = self.value * reference
        if not _number(value):
            return False, f"no {self.metric}"
        if not OPERATORS[self.op](value, bound):
            return False, f"{self.metric} {value:.4g} not {self.op} {bound:.4g}"
        return True, None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class SelectRule(_Strict):
    """Pick per method the candidate with the best `maximize` (or `minimize`) metric among those meeting every
    constraint, on the validation target only."""
    maximize: str | None = None
    minimize: str | None = None
    constraints: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_goal(self):
        if (self.maximize is None) == (self.minimize is None):
            raise ValueError("give exactly one of maximize or minimize")
        _known_metric(self.metric)
        for c in self.constraints:
            Constraint.parse(c)
        return self

    @property
    def metric(self) -> str:
        return self.maximize or self.minimize

    @property
    def parsed(self) -> list[Constraint]:
        return [Constraint.parse(c) for c in self.constraints]

    def words(self) -> str:
        goal = f"the {'highest' if self.maximize else 'lowest'} {self.metric} on the validation target"
        if self.constraints:
            goal += " among the settings with " + " and ".join(c.words() for c in self.parsed)
        return goal


class MethodSpec(_Strict):
    name: str
    label: str | None = None  # the method's row (default: its name); to grid one method twice with other overrides
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys or nested sections, fixed for every cell
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # dotted key -> the values to try
    # false: this method's chosen setting is left out of the spec's scalability / sustainability cells (6 cells a
    # method on the profiles spec), so a method added to a long grid costs its validation and reported cells only
    scalability: bool = True
    sustainability: bool = True

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid):
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid {key!r} has no values")
        return grid

    @property
    def row(self) -> str:
        return self.label or self.name


Target = dict[str, Any] | str  # config overrides, or the family's subject (a split or a concept) alone


class BenchSpec(_Strict):
    name: str | None = None
    base: dict[str, Any]
    methods: list[MethodSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # reported cells run at least 3 seeds; a spec that means fewer says so here, and the leaderboard says it too
    allow_fewer_seeds: bool = False
    validation: Target
    reported: Target
    # more reported targets, each with the chosen settings over the seeds, its reference cells and its own table:
    # e.g. a worst-case split beside the forget split (`also_reported = ["worst10"]`)
    also_reported: list[Target] = Field(default_factory=list)
    select: SelectRule
    noise_floor: list[int] = Field(default_factory=lambda: [1])  # retrain reference seeds run on each target
    scalability: list[Target] = Field(default_factory=list)
    sustainability: list[Target] = Field(default_factory=list)  # ordered, cumulative requests
    attacks: dict[str, dict[str, Any]] = Field(default_factory=dict)  # attack name -> options, on reported cells
    # published evaluations placed on the leaderboard as labelled, unranked rows: label -> file (OpenUnlearning's
    # TOFU_EVAL.json, TOFU's eval logs; evals/reference_logs.py reads them)
    published: dict[str, str] = Field(default_factory=dict)

    @field_validator("seeds", "noise_floor")
    @classmethod
    def _distinct(cls, seeds):
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{seeds} repeats a seed")
        return seeds

    @field_validator("sustainability")
    @classmethod
    def _requests(cls, requests):
        if len(requests) == 1:
            raise ValueError("needs at least two requests")
        return requests

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, attacks):
        from obliviate.registry import ATTACKS

        for name in attacks:
            if name not in ATTACKS:
                raise ValueError(f"unknown attack {name!r} (obliviate ls attacks)")
        return attacks

    @model_validator(mode="after")
    def _checks(self):
        if len(self.seeds) < 3 and not self.allow_fewer_seeds:
            raise ValueError(f"seeds = {self.seeds}: reported cells need at least 3 seeds (set allow_fewer_seeds = "
                             "true to report fewer; the leaderboard then says so)")
        rows = [m.row for m in self.methods]
        if len(set(rows)) != len(rows):
            raise ValueError(f"methods: {rows} name a row twice; give one a `label`")
        return self


def read_spec(path: str | Path, overrides: list[str] = ()) -> tuple[BenchSpec, dict]:
    """The spec at `path` and its data (relative paths of `base` made absolute against the spec's folder);
    `key=value` overrides go to `base`."""
    from obliviate.config import apply_overrides, read_config_file, resolve_paths

    path = Path(path)
    if not path.is_file():
        raise ObliviateError(f"bench spec not found: {path}")
    data = read_config_file(path)
    base = data.get("base")
    if isinstance(base, dict):
        data["base"] = apply_overrides(resolve_paths(base, path.absolute().parent), list(overrides))
    elif overrides:
        raise ObliviateError(f"{path}: key=value overrides go to `base`, which the spec lacks")
    for key in ("validation", "reported"):
        if isinstance(data.get(key), dict):
            data[key] = resolve_paths(data[key], path.absolute().parent)
    for key in ("also_reported", "scalability", "sustainability"):
        if isinstance(data.get(key), list):
            data[key] = [resolve_paths(t, path.absolute().parent) if isinstance(t, dict) else t for t in data[key]]
    try:
        spec = BenchSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ObliviateError(f"{path}: {loc}: {msg}") from None
    return spec, data
