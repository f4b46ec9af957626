"""Entry points shared by the CLI and notebooks that are more than a single call."""
from __future__ import annotations

from pathlib import Path

from obliviate.config import RunConfig, WorldConfig
from obliviate.data import load_qa_jsonl
from obliviate.errors import ObliviateError
from obliviate.runs import write_json


def evaluate_folder(model_dir: Path, forget_file: Path | None, retain_file: Path | None, split: str,
                    tofu_dir: Path | None, out: Path) -> dict:
    """Evaluate a transformers folder: on the user's files, or on the profiles world's sets against its retrain."""
    from obliviate.evals.evaluate import compare_to_retrain, evaluate_lm
    from obliviate.models import causal_lm as lm
    from obliviate.runner import resolve_device, retrain_evaluation
    from obliviate.worlds.profiles import ProfilesWorld

    if bool(forget_file) != bool(retain_file):
        raise ObliviateError("--forget-file and --retain-file go together")
    device = resolve_device("auto")
    if forget_file:
        qa_sets = {"forget": load_qa_jsonl(forget_file), "retain": load_qa_jsonl(retain_file)}
        model, tok = lm.load(model_dir, device=device)
        result = evaluate_lm(model, tok, qa_sets, None, None)
    else:
        config = RunConfig(method="Retrain", split=split,
                           world=WorldConfig(tofu_dir=str(tofu_dir) if tofu_dir else None))
        world = ProfilesWorld(config.world)
        world.build(split)
        qa_sets, texts = world.eval_sets(split, config.eval.retain_people)
        model, tok = lm.load(model_dir, device=device)
        result = evaluate_lm(model, tok, qa_sets, texts["forget"], texts["holdout"])
        result = compare_to_retrain(result, retrain_evaluation(world, config, qa_sets, texts))
    write_json(out, result)
    return result


def export_run(run_dir: Path, out: Path, base: Path | None = None) -> Path:
    """Apply a run's changed.safetensors to its base model and save the result as a full transformers folder."""
    import json

    from safetensors.torch import load_file

    from obliviate.models import causal_lm as lm
    from obliviate.runs import atomic_dir

    run_dir, out = Path(run_dir), Path(out)
    changed_path = run_dir / "changed.safetensors"
    if not changed_path.is_file():
        raise ObliviateError(f"no changed.safetensors in {run_dir} (is it a run folder?)")
    if out.exists():
        raise ObliviateError(f"output folder already exists: {out}")
    if base is None:
        env = run_dir / "environment.json"
        if not env.is_file():
            raise ObliviateError(f"{run_dir} records no base model; pass --base")
        base = Path(json.loads(env.read_text())["base_model"])
    if (Path(base) / "model_index.json").is_file():
        return export_pipeline(changed_path, Path(base), out)
    model, tokenizer = lm.load(base)
    changed = load_file(str(changed_path))
    state = model.state_dict()
    unknown = sorted(set(changed) - set(state))
    if unknown:
        raise ObliviateError(f"{changed_path} has tensors the base model lacks, e.g. {unknown[0]}: wrong --base?")
    model.load_state_dict(changed, strict=False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def load_run_pipeline(changed_path: Path, base: Path, device: str = "cpu"):
    """The base pipeline with a run's changed UNet tensors ("unet.<name>") applied (the base folder is only read)."""
    from safetensors.torch import load_file

    from obliviate.models.diffusion import load_pipeline

    pipe = load_pipeline(base, device)
    changed = load_file(str(changed_path))
    state = pipe.unet.state_dict()
    foreign = sorted(k for k in changed if not k.startswith("unet.") or k[len("unet."):] not in state)
    if foreign:
        raise ObliviateError(f"{changed_path} has tensors the base pipeline's UNet lacks, e.g. {foreign[0]}: wrong --base?")
    pipe.unet.load_state_dict({k[len("unet."):]: v for k, v in changed.items()}, strict=False)
    return pipe


def export_pipeline(changed_path: Path, base: Path, out: Path) -> Path:
    """A diffusers pipeline folder: the base pipeline with the run's changed UNet tensors applied."""
    from obliviate.models.diffusion import save_pipeline
    from obliviate.runs import atomic_dir

    pipe = load_run_pipeline(changed_path, base)
    with atomic_dir(out) as tmp:
        save_pipeline(pipe, tmp)
    return out


def attack_run(run_dir: Path, attack=None, log=print) -> dict:
    """The adversarial prompt attack (UnlearnDiffAtk) on a canvas-world text-to-image run, next to the original
    pipeline and the retrain reference; writes RUN_DIR/attack.json and returns it."""
    import json

    from obliviate.attacks.canvas import attack_erasure
    from obliviate.runner import resolve_device
    from obliviate.worlds.canvas import CanvasWorld

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "changed.safetensors").is_file():
        raise ObliviateError(f"{run_dir} is not a run folder (no config.json and changed.safetensors)")
    config = RunConfig(**json.loads((run_dir / "config.json").read_text()))
    if config.family != "t2i":
        raise ObliviateError(f"{run_dir} is a language-model run; the prompt attack is for text-to-image runs")
    if config.world.name != "canvas" or config.forget_prompts:
        raise ObliviateError("the prompt attack needs a detector for the concept: only canvas-world runs can be "
                             "attacked (the world's classifier is the detector)")
    world = CanvasWorld.from_config(config.world)
    world.require_built()
    base = Path(config.model) if config.model else world.pipeline_dir
    pipe = load_run_pipeline(run_dir / "changed.safetensors", base, resolve_device(config.device))
    log(f"attacking {config.method}'s erasure of {config.concept!r} (and the original and retrain reference)")
    result = {"method": config.method, "concept": config.concept,
              **attack_erasure(world, pipe, config.concept, config.t2i, attack)}
    _save_attack_grid(run_dir, config.method, result.pop("images"), result["per_prompt"])
    write_json(run_dir / "attack.json", result)
    from obliviate.bench.report import rewrite_report
    rewrite_report(run_dir)  # the run's page now shows the attack's pictures too
    return result


def _save_attack_grid(run_dir: Path, method: str, images, rows: list[dict], columns: int = 8) -> None:
    """attack.png: the picture each of the first `columns` forget prompts ended with under attack, those the attack
    broke first."""
    from obliviate.bench.grids import image_grid

    def outcome(row: dict) -> str:
        return "drawn without attack" if row["pre_success"] else "concept back" if row["success"] else "held"

    rank = {"concept back": 0, "drawn without attack": 1, "held": 2}
    order = sorted(range(len(rows)), key=lambda i: rank[outcome(rows[i])])[:columns]
    captions = [f"{rows[i]['text']} ({outcome(rows[i])})" for i in order]
    import io

    from obliviate.runs import atomic_write

    buffer = io.BytesIO()
    image_grid([(f"{method} attacked", images[order])], captions).save(buffer, format="PNG")
    atomic_write(run_dir / "attack.png", buffer.getvalue())
