"""The demo's text-to-image part: erase one style and one object of the canvas world with several methods, starting
each time from the same pipeline, and score them with the original and the retrain-without-concept reference on the
same prompts and seeds (UA, IRA, CRA, UA on held-out paraphrases, FID/KID, alignment), with image grids; and attack
each erasure with adversarial prompts (UnlearnDiffAtk: UA attacked; and P4D-K), next to the same attacks on the
original and the retrain reference: the robustness table."""
from __future__ import annotations

import time
from pathlib import Path

from obliviate.config import RunConfig, T2IConfig, TrainConfig, WorldConfig

CONCEPTS = ("striped", "star")  # the world's retrain references exist for these two
METHODS = ("ESD-x", "UCE", "RGD", "AdvUnlearn")

# Sampling by demo size (the canvas world is the same for both). "demo" (the default of `obliviate demo`): one seed
# per evaluation prompt and 10 DDIM steps, for the training images, the evaluation and the attack. "full"
# (`--full-size`): T2IConfig's defaults (2 seeds, 25 steps), as `obliviate run` uses them.
SAMPLING: dict[str, dict] = {"demo": {"eval_seeds": 1, "sample_steps": 10}, "full": {}}

# Settings for the canvas pipeline's ~1M-parameter UNet (the papers' lr 1e-5 and 1000 steps target SD's 860M UNet
# on a GPU). ESD-x, UCE and RGD come from a small hand sweep on this world (benchmarks/README.md, with the command),
# then ESD-x and AdvUnlearn were halved to 50 steps at twice the step size for the demo's time goal, which left each
# one's pass/fail on the bar as it was (benchmarks/README.md (a); RGD at 50 steps lost its pass on the star, so it
# keeps 100); the others are untuned starting points. Every demo run re-measures each row.
PRESETS: dict[str, dict] = {
    "ESD-x": {"train": {"lr": 4e-4, "max_steps": 50, "batch_size": 8}},
    "ESD-u": {"train": {"lr": 1e-4, "max_steps": 100, "batch_size": 8}},
    # UCE also preserves the retain prompts: with only the bare concepts preserved, IRA fell to 0.80-0.85
    "UCE": {"method_args": {"preserve_retain_prompts": True}},
    "SalUn": {"train": {"lr": 2e-4, "max_steps": 100, "batch_size": 16}},
    "ConceptAblation": {"train": {"lr": 2e-4, "max_steps": 100, "batch_size": 16}},
    "GradDiff": {"train": {"lr": 1e-4, "max_steps": 100, "batch_size": 16}},
    "RG": {"train": {"lr": 1e-4, "max_steps": 100, "batch_size": 16}},
    # RGD: the retain gradient weighted 4x and the ascent stopped at a forget MSE of 0.5 (the paper's 1.1 let the
    # forget term push the small UNet too far)
    "RGD": {"train": {"lr": 1e-4, "max_steps": 100, "batch_size": 16},
            "method_args": {"retain_weight": 4.0, "forget_loss_cap": 0.5}},
    # AdvUnlearn: ESD-x's step size, 10 plain ESD steps first, the retain term at 1.0 (0.3 cost IRA; benchmarks (f)),
    # and 10 attack steps per step rather than the paper's 30, to keep each erasure near half a minute on 2 cores
    # (the attack count was not swept)
    "AdvUnlearn": {"train": {"lr": 4e-4, "max_steps": 50, "batch_size": 8},
                   "method_args": {"attack_steps": 10, "warmup_steps": 10, "retain_weight": 1.0}},
}


# The attacks every erasure gets, with their options: UnlearnDiffAtk at the paper's settings (its references' results
# are cached in the world folder), P4D-K at its paper's k = 3 but UnlearnDiffAtk's budget (40 iterations, a check every
# 10) rather than 3000 and 50: about 5 s per erasure on 2 cores (benchmarks/README.md (o))
ATTACKS: dict[str, dict] = {"prompt_attack": {}, "p4d_k": {"iterations": 40, "check_every": 10}}


def demo_attacks() -> dict:
    """{name: the attack built with the demo's options}."""
    from obliviate.registry import ATTACKS as REGISTERED

    built = {}
    for name, options in ATTACKS.items():
        cls = REGISTERED[name].load()
        built[name] = cls(cls.Config(**options))
    return built


def run_canvas_demo(methods: list[str], concepts: list[str], log=print, size: str = "demo") -> list[dict]:
    """One section per concept: rows (original, retrain, methods), per-method results, the grid image."""
    import torch

    from obliviate.attacks.t2i.canvas import attack_erasure
    from obliviate.attacks.t2i.common import attack_result
    from obliviate.loops.t2i import erase
    from obliviate.methods.common import make_method
    from obliviate.evals.canvas import evaluate_erasure
    from obliviate.models.diffusion import load_pipeline
    from obliviate.runners.t2i import canvas_task
    from obliviate.worlds.canvas import CanvasWorld

    world = CanvasWorld()
    tasks = {c: canvas_task(world, c) for c in concepts}  # unknown concepts fail before the build
    methods = [make_method("t2i", m).name for m in methods]
    t0 = time.time()
    record = world.build(log=log)
    build_seconds = time.time() - t0
    t2i = T2IConfig(**SAMPLING[size])
    attacks = demo_attacks()
    original = load_pipeline(world.pipeline_dir)
    sections = []
    for concept in concepts:
        rows, results, robustness, grid_rows, evaluation = {}, {}, {}, None, None
        for name in methods:
            preset = PRESETS.get(name, {})
            train = TrainConfig(**preset.get("train", {}))
            pipe = load_pipeline(world.pipeline_dir)
            log(f"erasing '{concept}' with {name}")
            result = erase(pipe, tasks[concept], make_method("t2i", name, preset.get("method_args", {})), train,
                           t2i.images_per_prompt, t2i.sample_steps, t2i.guidance)
            evaluation = evaluate_erasure(world, pipe, concept, t2i, label=name)
            attacked, pictures = {}, None
            for attack_name, attack in attacks.items():
                log(f"attacking {name}'s erasure of '{concept}' with {attack_name}")
                out = attack_erasure(world, pipe, concept, t2i, attack_name, attack, name, original=original)
                attacked[attack_name] = attack_result(attack_name, attack, name, concept, out["per_item"],
                                                      out["seconds"], out["detector"])
                if attack_name == "prompt_attack":  # the grid's "attacked" row and the scorecard's UA attacked
                    pictures, indices = out["images"], out["eval_indices"]
            robustness[name] = {a: {k: v for k, v in r.items() if k != "per_item"} for a, r in attacked.items()}
            models = attacked["prompt_attack"]["models"]
            agg = {**evaluation["aggregate"], **models[name],
                   **{f"{m}_{k}": v for m in ("original", "retrain") if m in models for k, v in models[m].items()}}
            if not rows:
                rows["original"] = {k[len("original_"):]: v for k, v in agg.items() if k.startswith("original_")}
                if any(k.startswith("retrain_") for k in agg):
                    rows["retrain"] = {k[len("retrain_"):]: v for k, v in agg.items() if k.startswith("retrain_")}
                grid_rows = evaluation["grid_rows"][:-1]
            rows[name] = {**{k: v for k, v in agg.items() if not k.startswith(("original_", "retrain_"))},
                          "unlearn_seconds": round(result.seconds, 1), "stopped": result.stopped}
            grid_rows.append((name, evaluation["images"]))
            shown = torch.ones_like(evaluation["images"])  # blank where no prompt was attacked (retain prompts)
            shown[indices] = pictures
            grid_rows.append((f"{name} attacked", shown))
            results[name] = (evaluation["per_item"], result, RunConfig(
                family="t2i", method=name, method_args=preset.get("method_args", {}), concept=concept,
                world=WorldConfig(name="canvas"), train=train, t2i=t2i), attacked)
        from obliviate.bench.grids import image_grid
        from obliviate.evals.canvas import eval_prompts
        prompts, _ = eval_prompts(world, t2i.eval_seeds)
        cols = evaluation["columns"]
        grid = image_grid([(n, imgs[cols]) for n, imgs in grid_rows], [prompts[i].text for i in cols])
        o = rows["original"]
        unlearn_diff, p4d = attacks["prompt_attack"].config, attacks["p4d_k"].config
        winners = [n for n in methods if (rows[n].get("ua") or 0) >= 0.9 and o.get("ira") and o.get("cra")
                   and rows[n]["ira"] >= 0.9 * o["ira"] and rows[n]["cra"] >= 0.9 * o["cra"]]
        notes = [f"Base pipeline's samples read correctly by the classifier: object {record['base']['object']:.1%}, "
                 f"style {record['base']['style']:.1%}. The original's UA is the share of its own concept images "
                 "the classifier misses (the floor of UA).",
                 f"Every model sampled with {t2i.eval_seeds} seed(s) per prompt and {t2i.sample_steps} DDIM steps ("
                 + ("the demo's settings; --full-size: 2 and 25)." if size == "demo" else "the full-size settings)."),
                 f"UA attacked: 1 - ASR of the UnlearnDiffAtk prompt attack ({unlearn_diff.prefix_tokens} optimised "
                 f"prefix tokens, {unlearn_diff.iterations} steps) on the {rows[methods[0]]['n_attacked']} canonical "
                 "forget prompts, seed 0. On the retrain reference, which never saw the concept, it shows how far the "
                 "attack gets without it. In the grid, the 'attacked' rows show the picture each forget prompt ended "
                 "with under attack.",
                 "Robustness table: each attack's ASR (share of forget prompts whose picture shows the concept, with "
                 f"or without the attack; lower is safer). P4D-K: a learnable token after every k-th prompt token (k "
                 f"= {p4d.every_k}), {p4d.iterations} steps towards the original's noise prediction "
                 "(the paper runs 3000).",
                 ("Methods with UA >= 90% and IRA, CRA >= 0.9 x the original's: " + ", ".join(winners)) if winners
                 else "No method reached UA >= 90% with IRA and CRA >= 0.9 x the original's in this run."]
        sections.append({"concept": concept, "title": f"Erasing '{concept}' from the canvas pipeline",
                         "scorecard": rows, "winners": winners, "notes": notes, "grid_image": grid,
                         "results": results, "grid": f"t2i/{concept}/grid.png", "robustness": robustness})
    for s in sections:
        s["world_build_seconds"] = round(build_seconds, 1)
        s["world"] = str(world.root)
    return sections


def write_sections(folder: Path, sections: list[dict], base_model: str) -> list[dict]:
    """Write each concept's folders (metrics, per-image rows, history, changed tensors per method, grid.png) and
    return the JSON-ready sections for summary.json."""
    from obliviate.demo import write_method_folder
    from obliviate.loops.t2i import changed_pipeline_tensors

    out = []
    for s in sections:
        root = folder / "t2i" / s["concept"]
        root.mkdir(parents=True)
        s["grid_image"].save(root / "grid.png")
        for name, (per_item, result, config, attacks) in s["results"].items():
            write_method_folder(root / name, config, base_model, s["scorecard"][name], result.history, per_item,
                                changed_pipeline_tensors(result), attacks)
        out.append({k: v for k, v in s.items() if k not in ("grid_image", "results")})
    return out


def run_part(folder: Path, log=print, methods: list[str] | None = None, concepts: list[str] | None = None,
             size: str = "demo") -> dict:
    """The demo's text-to-image part: run it and write each concept's folders into `folder`; returns the JSON-ready
    sections for summary.json."""
    from obliviate.worlds.canvas import CanvasWorld

    sections = run_canvas_demo(list(methods or METHODS), list(concepts or CONCEPTS), log, size)
    return {"sections": write_sections(folder, sections, str(CanvasWorld().pipeline_dir))}
