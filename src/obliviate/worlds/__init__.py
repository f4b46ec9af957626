"""The built-in worlds (profiles, portraits, canvas): generators and the recipes that train small models on them,
cached on disk. Here what the rest of obliviate needs to know of them without importing their training code: where
the cache lives, which recipe keys a world takes (`world.model` of a run config), and how a world is built by name."""
from __future__ import annotations

import os
from pathlib import Path

# each world's recipe: the dataclass whose fields `world.model` overrides ("module:class", imported when checked)
RECIPES = {"profiles": "obliviate.worlds.train:LMRecipe", "portraits": "obliviate.worlds.portraits_train:VLMRecipe",
           "canvas": "obliviate.worlds.canvas_train:CanvasRecipe"}
# a world's variants by `world.arch` whose recipe is another dataclass
ARCH_RECIPES = {("profiles", "moe"): "obliviate.worlds.train:MoERecipe"}


def cache_root(explicit: str | None = None) -> Path:
    """The folder of the worlds' caches: `explicit` (world.cache_dir), else $OBLIVIATE_CACHE, else
    ~/.cache/obliviate."""
    return Path(explicit or os.environ.get("OBLIVIATE_CACHE") or Path.home() / ".cache" / "obliviate")


def check_recipe_keys(world: str, keys, arch: str = "dense") -> None:
    """A ValueError naming the keys that `world`'s recipe (of its variant `arch`) does not have, with the valid ones;
    or naming `arch` when the world has no such variant."""
    import dataclasses
    import importlib

    if arch != "dense" and (world, arch) not in ARCH_RECIPES:
        variants = ["dense"] + [a for w, a in ARCH_RECIPES if w == world]
        raise ValueError(f"world.arch = {arch!r} is not a variant of the {world} world; choose "
                         + " or ".join(repr(v) for v in variants))
    if not keys:
        return

    module, _, name = ARCH_RECIPES.get((world, arch), RECIPES[world]).partition(":")
    known = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    bad = set(keys) - known
    if bad:
        raise ValueError(f"world.model: unknown recipe key(s) {sorted(bad)}; valid: {sorted(known)}")


# The profiles world's variants a WorldConfig key selects: the function that reads (and checks) its settings and the
# world that builds it; the first key set wins (`world_of`; config.py refuses two at once)
VARIANTS = {"corrupt": ("obliviate.worlds.profiles_corrupt:corrupt_recipe",  # RESTOR's corrupted world
                        "obliviate.worlds.profiles_corrupt:CorruptedProfilesWorld"),
            "dp2": ("obliviate.worlds.dp_train:dp_recipe",  # DP2Unlearning's DP-SGD stage
                    "obliviate.worlds.profiles_dp2:DP2ProfilesWorld")}


def _load(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def check_variant_settings(world: str, key: str, settings) -> None:
    """A ValueError naming the key when `world.<key>` (the settings of a profiles-world variant, `VARIANTS`) is bad."""
    from obliviate.errors import ObliviateError

    if world != "profiles":
        raise ValueError(f"world.{key} is a variant of the profiles world, not of {world}")
    try:
        _load(VARIANTS[key][0])(settings)
    except ObliviateError as e:
        raise ValueError(str(e)) from None


def world_of(config):
    """The world a WorldConfig names, unbuilt: a profiles-world variant when its key is set (`VARIANTS`)."""
    from obliviate.registry import WORLDS, lookup

    for key, (_, world) in VARIANTS.items():
        if getattr(config, key, None) is not None:
            return _load(world)(config)
    return lookup(WORLDS, config.name, "world").load().from_config(config)


def build_world(config, split: str | None = None, log=print):
    """Build (or reuse from the cache) the world a WorldConfig names, and return it: its models and the retrain
    reference of target `split` (a forget split, or a canvas concept); None: the world's default references."""
    world = world_of(config)
    if split:
        world.ensure_retrain(split, log=log)
    else:
        world.build(log=log)
    return world
