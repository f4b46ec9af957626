"""Benchmark (o): how fast each recovery attack goes, in attacked items per second, on this machine's CPU cores.

Usage (from the repository root): .venv/bin/python benchmarks/attack_speed.py [SECTION ...]
Sections are the functions named speed_<family>() below (default: all); add one by appending such a function above
the `__main__` block. Each prints one JSON line per measurement."""
from __future__ import annotations

import json
import sys
import time


def report(row: dict) -> None:
    print(json.dumps(row), flush=True)


def speed_t2i() -> None:
    """Each text-to-image attack on the canvas world's pipeline (the world must be built: `obliviate demo` or
    benchmarks/canvas_build.sh), on the 36 forget prompts of 'star' at the demo's sampling (10 DDIM steps, guidance
    4), with a detector that never fires, so every prompt runs every step and every check (an attack's worst case;
    a real one stops a prompt at its success). Options: the demo's for UnlearnDiffAtk and P4D-K; P4D-N with the 14
    tokens the canvas tokenizer holds and the same 40 steps; Ring-A-Bell at the paper's population of 200 but 100
    generations (the paper: 3000) and the 14 tokens. The attacked pipeline is the original: the cost does not depend
    on the weights."""
    import torch

    from obliviate.attacks.t2i.canvas import attack_pipeline
    from obliviate.attacks.t2i.detectors import Detector
    from obliviate.config import T2IConfig
    from obliviate.models.diffusion import load_pipeline
    from obliviate.registry import ATTACKS
    from obliviate.worlds.canvas import CanvasWorld

    world = CanvasWorld()
    world.require_built()
    pipe = load_pipeline(world.pipeline_dir)
    t2i = T2IConfig(eval_seeds=1, sample_steps=10)
    never = Detector(lambda images: [False] * len(images), "never", "never fires")
    options = {"prompt_attack": {}, "p4d_k": {"iterations": 40, "check_every": 10},
               "p4d_n": {"iterations": 40, "check_every": 10, "tokens": 14},
               "ring_a_bell": {"tokens": 14, "generations": 100}}
    for name, opts in options.items():
        cls = ATTACKS[name].load()
        attack = cls(cls.Config(**opts))
        t0 = time.time()
        result = attack_pipeline(world, pipe, "star", t2i, attack, never, pipe)
        seconds = time.time() - t0
        n = result["aggregate"]["n_attacked"]
        report({"family": "t2i", "attack": name, "options": opts, "items": n, "seconds": round(seconds, 1),
                "items_per_second": round(n / seconds, 3), "threads": torch.get_num_threads()})


def speed_lm() -> None:
    """Each language-model attack on the demo's profiles world (100 people; forget10: 100 questions of 10 people;
    built by `obliviate demo` or `obliviate world build profiles n_people=100`), attacking the world's original model
    alone, at the demo's settings (demo/lm.py ATTACKS) and then at the attacks' defaults (`obliviate attack`)."""
    import torch

    from obliviate.api import attack_instances
    from obliviate.config import WorldConfig
    from obliviate.demo.lm import ATTACKS as DEMO, SPLIT, WORLDS
    from obliviate.models import causal_lm as lm
    from obliviate.registry import ATTACKS, DEFAULT_ATTACKS
    from obliviate.runners.lm_attack import items_target, run_attack
    from obliviate.worlds.profiles import ProfilesWorld

    world = ProfilesWorld(WorldConfig(**WORLDS["demo"]))
    world.build(SPLIT, retrain=True)
    forget, retain = world.unlearning_sets(SPLIT)

    def original():
        model, tok = lm.load(world.full_model_dir)
        return model.eval(), tok

    for label, names, options in (("demo", list(DEMO), DEMO), ("default", DEFAULT_ATTACKS["lm"], {})):
        for name in names:
            attack = attack_instances([ATTACKS[name]], {f"{name}.{k}": v for k, v in options.get(name, {}).items()})
            target = items_target("original", {"original": original}, forget, retain, world)
            result = run_attack(name, attack[name], target, log=lambda *_: None)
            report({"family": "lm", "attack": name, "settings": label, "items": result["items"],
                    "seconds": result["seconds"], "items_per_second": round(result["items_per_second"], 2),
                    "threads": torch.get_num_threads()})


if __name__ == "__main__":
    sections = {name[len("speed_"):]: f for name, f in globals().items() if name.startswith("speed_")}
    for wanted in sys.argv[1:] or list(sections):
        if wanted not in sections:
            sys.exit(f"unknown section {wanted!r}; valid: {', '.join(sections)}")
        sections[wanted]()
