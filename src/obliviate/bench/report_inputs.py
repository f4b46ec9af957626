"""The shapes of the JSON files a report reads (metrics.json, history.json, attacks/*.json, a demo's summary.json):
a file that parses but holds a string where a number is due, or lacks a key the page needs, is one line naming the
file and the key, not a traceback from the middle of the page."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from obliviate.errors import ObliviateError


def _number(v):
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    raise ValueError(f"must be a number or null, got {v!r}")


def _text(v):
    if v is None or isinstance(v, str):
        return v
    raise ValueError(f"must be a string or null, got {v!r}")


def _string(v):
    if isinstance(v, str):
        return v
    raise ValueError(f"must be a string, got {v!r}")


def _integer(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise ValueError(f"must be an integer, got {v!r}")


Number = Annotated[Any, AfterValidator(_number)]
Text = Annotated[Any, AfterValidator(_text)]
String = Annotated[Any, AfterValidator(_string)]
Integer = Annotated[Any, AfterValidator(_integer)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # other keys are the run's to keep; the page does not read them


class _Step(_Open):  # a row of history.json, or a point of a relearning curve
    step: Integer
    loss: Number = None
    forget_nll: Number = None
    recall: Number = None


class _Metrics(_Open):
    method: Text = None
    status: Text = None
    forget_set: Text = None
    split: Text = None
    concept: Text = None


class _Row(_Open):  # a per-item row of an attack
    adversarial_prompt: Text = None


class _Attack(_Open):
    method: String
    headline: String
    label: Text = None
    models: dict[str, dict[str, Any]]
    columns: list[Text] = Field(default_factory=list)
    percent: list[Text] = Field(default_factory=list)
    per_item: dict[str, list[_Row]] = Field(default_factory=dict)
    curves: dict[str, list[_Step]] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    items: Number = None
    seconds: Number = None
    items_per_second: Number = None


class _Summary(_Open):
    scorecard: dict[str, dict[str, Any]]
    notes: list[Text] = Field(default_factory=list)
    robustness: dict[str, dict[str, _Attack]] | None = None


SHAPES = {"metrics": _Metrics, "attack result": _Attack, "demo summary": _Summary}


def check_report_input(path: Path, what: str, data) -> None:
    """`data` read from `path` (a report's `what`: metrics, history, attack result, demo summary) has the shape the
    page reads: else ObliviateError "PATH: key 'KEY': what is wrong", KEY a dotted path (models.NPO.accuracy,
    0.loss: the first row's loss)."""
    from obliviate.bench.scorecard import columns

    try:
        if what == "history":
            for i, row in enumerate(data):
                _check(_Step, row, f"{i}.")
        elif what in SHAPES:
            _check(SHAPES[what], data)
    except _Bad as e:
        raise ObliviateError(f"{path}: {e}") from None
    numeric = [key for key, _, _ in columns()]
    if what == "metrics":
        _numbers(path, data, numeric)
    elif what == "demo summary":
        for model, row in data["scorecard"].items():
            _numbers(path, row, numeric, f"scorecard.{model}.")
        for method, attacks in (data.get("robustness") or {}).items():
            for name, result in attacks.items():
                _attack_numbers(path, result, f"robustness.{method}.{name}.")
    elif what == "attack result":
        _attack_numbers(path, data)


class _Bad(Exception):
    pass


def _check(shape: type[BaseModel], data, prefix: str = "") -> None:
    try:
        shape.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = prefix + ".".join(str(x) for x in err["loc"]) if err["loc"] else prefix.rstrip(".") or "(top level)"
        msg = "missing (the report needs it)" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        raise _Bad(f"key '{key}': {msg}") from None


def _numbers(path: Path, row: dict, keys: list[str], prefix: str = "") -> None:
    for key in keys:
        try:
            _number(row.get(key))
        except ValueError as e:
            raise ObliviateError(f"{path}: key '{prefix}{key}': {e}") from None


def _attack_numbers(path: Path, result: dict, prefix: str = "") -> None:
    """The headline and the declared columns of each model's aggregate are numbers (the tables format them)."""
    keys = [result["headline"], *(c for c in result.get("columns") or [] if isinstance(c, str))]
    for model, aggregate in result["models"].items():
        _numbers(path, aggregate, keys, f"{prefix}models.{model}.")
    if result.get("curves"):
        for key in ("data", "lr"):
            if key not in result.get("config", {}):
                raise ObliviateError(f"{path}: key '{prefix}config.{key}': missing (the relearning plot needs it)")
        _numbers(path, result["config"], ["lr"], f"{prefix}config.")
