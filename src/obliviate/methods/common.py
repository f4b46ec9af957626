"""Pieces every family's methods share: the loss parts a loop minimises, config checks that name the key, and the
instantiation of a registered method from its config dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from obliviate.errors import ObliviateError


@dataclass
class LossParts:
    """forget: the term whose gradient is the forget direction; retain: the (already weighted) retain term or None.
    The loop minimises forget + retain, unless the method combines their gradients itself (RG)."""
    forget: torch.Tensor
    retain: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return self.forget if self.retain is None else self.forget + self.retain


def check_choice(method: str, key: str, value, choices) -> None:
    """Config validation: `value` must be one of `choices`; the error names the method, the key and the choices."""
    if value not in choices:
        raise ObliviateError(f"{method}: {key}={value!r} is not valid; choose one of "
                             + ", ".join(repr(c) for c in choices))


def check_number(method: str, key: str, value, *, min: float | None = None, positive: bool = False) -> None:
    """Config validation: a real number, > 0 when `positive`, >= `min` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ObliviateError(f"{method}: {key} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ObliviateError(f"{method}: {key} must be > 0, got {value!r}")
    if min is not None and value < min:
        raise ObliviateError(f"{method}: {key} must be >= {min}, got {value!r}")


def make_method(family: str, name: str, args: dict | None = None):
    """The method `name` of `family` ("lm", "mllm", "t2i") from the registry, its config built from `args`; unknown
    names, unknown keys and bad values fail in one line. The retrain reference is no method: refused here."""
    from obliviate.families import get
    from obliviate.registry import is_reference, lookup_method

    get(family)  # an unknown family is one line too
    entry = lookup_method(family, name)
    if is_reference(entry.name):
        raise ObliviateError(f"{entry.name} is the retrain reference, not a method: a run with method = "
                             f"\"{entry.name}\" takes the built-in world's model trained without the forget set")
    from obliviate.registry import is_world_recipe
    if is_world_recipe(family, entry.name):
        raise ObliviateError(f"{entry.name} is a world recipe, not a method: a run with method = \"{entry.name}\" "
                             "fine-tunes the world's DP base model on the retained data")
    return instantiate(entry, args)


def instantiate(entry, args: dict | None = None):
    """A registered method with its config built from `args`; unknown keys and bad values name the key."""
    cls = entry.load()
    known = {f.name for f in dataclasses.fields(cls.Config)}
    bad = set(args or {}) - known
    if bad:
        raise ObliviateError(f"method_args: unknown key(s) {sorted(bad)} for {entry.name}; valid: {sorted(known)}")
    try:
        return cls(cls.Config(**(args or {})))
    except (TypeError, ValueError) as e:
        raise ObliviateError(f"method_args for {entry.name}: {e}") from None
