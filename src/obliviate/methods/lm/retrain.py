"""Retrain: the gold standard of unlearning. A model trained from scratch with the world's own recipe on everything
except the forget split (TOFU, https://arxiv.org/abs/2401.06121). Every other method is measured against it: forget
quality is a KS test against its truth ratios, PrivLeak is relative to its membership AUC.

It is not a loss: it runs through the world recipe (ProfilesWorld.build), which caches it by the recipe's hash. On a
user's own model there is no recipe to repeat, so Retrain needs a built-in world (or a user-supplied retrain folder
for evaluation)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetrainConfig:
    pass


class Retrain:
    name = "Retrain"
    Config = RetrainConfig
    needs_reference = False
    from_world = True  # not a loss: the runner takes the model the world's recipe trained without the forget set

    def __init__(self, config=None):
        self.config = config or RetrainConfig()

    @staticmethod
    def model_dir(world, split: str):
        """Train (or reuse) the world's retrain model for `split` and return its folder."""
        world.build(split, retrain=True)
        return world.retrain_dir(split)
