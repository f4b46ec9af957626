"""`obliviate attack` for text-to-image runs: the canvas world's runs, judged by the world's classifier."""
from __future__ import annotations

from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.runs import write_json


def attack_run(run_dir: Path, config, attacks: dict, log=print, **inputs) -> dict:
    """Each attack of `attacks` ({name: instance}) on the run's erased pipeline, the original and the retrain
    reference; returns {name: result}."""
    from obliviate.attacks.canvas import attack_erasure
    from obliviate.runners.t2i import load_run_pipeline
    from obliviate.runs import resolve_device
    from obliviate.worlds.canvas import CanvasWorld

    if inputs:
        raise ObliviateError(f"text-to-image attacks take no {', '.join(inputs)} yet")
    if config.world.name != "canvas" or config.forget_prompts:
        raise ObliviateError("the prompt attack needs a detector for the concept: only canvas-world runs can be "
                             "attacked (the world's classifier is the detector)")
    world = CanvasWorld.from_config(config.world)
    world.require_built()
    base = Path(config.model) if config.model else world.pipeline_dir
    pipe = load_run_pipeline(run_dir / "changed.safetensors", base, resolve_device(config.device))
    results = {}
    for name, attack in attacks.items():
        log(f"attacking {config.method}'s erasure of {config.concept!r} with {name} (and the original and retrain "
            "reference)")
        result = {"method": config.method, "concept": config.concept,
                  **attack_erasure(world, pipe, config.concept, config.t2i, attack.config)}
        _save_attack_grid(run_dir, config.method, result.pop("images"), result["per_prompt"])
        write_json(run_dir / "attack.json", result)
        results[name] = result
    from obliviate.bench.report import rewrite_report
    rewrite_report(run_dir)  # the run's page now shows the attack's pictures too
    return results


def _save_attack_grid(run_dir: Path, method: str, images, rows: list[dict], columns: int = 8) -> None:
    """attack.png: the picture each of the first `columns` forget prompts ended with under attack, those the attack
    broke first."""
    import io

    from obliviate.bench.grids import image_grid
    from obliviate.runs import atomic_write

    def outcome(row: dict) -> str:
        return "drawn without attack" if row["pre_success"] else "concept back" if row["success"] else "held"

    rank = {"concept back": 0, "drawn without attack": 1, "held": 2}
    order = sorted(range(len(rows)), key=lambda i: rank[outcome(rows[i])])[:columns]
    captions = [f"{rows[i]['text']} ({outcome(rows[i])})" for i in order]
    buffer = io.BytesIO()
    image_grid([(f"{method} attacked", images[order])], captions).save(buffer, format="PNG")
    atomic_write(run_dir / "attack.png", buffer.getvalue())
