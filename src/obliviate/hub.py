"""An exported model as a person publishes it: a model card (README.md, written with huggingface_hub's ModelCard)
that records the base model, what was forgotten, the method and its settings and the run's headline metrics, and
`obliviate export --push-to-hub REPO`, which uploads the exported folder with huggingface_hub."""
from __future__ import annotations

import json
import re
from pathlib import Path

from obliviate.errors import ObliviateError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name": a Hub repository id, not a local folder


def base_model_id(base: Path) -> str | None:
    """The Hub id the base folder was loaded from, when its config records one (transformers' `_name_or_path`,
    diffusers' model_index.json); None for a model made locally."""
    for name in ("config.json", "model_index.json"):
        try:
            recorded = json.loads((Path(base) / name).read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
            return recorded
    return None


def _settings(config) -> list[str]:
    train = config.train
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs:g} epochs over the forget set"
    lines = [f"- optimiser: {train.optimizer}, learning rate {train.lr:g}, batch size {train.batch_size}, {length}, "
             f"seed {train.seed}"]
    if config.method_args:
        lines.append("- method settings: " + ", ".join(f"`{k} = {v!r}`" for k, v in config.method_args.items()))
    if getattr(config, "lora", None) is not None:
        lines.append(f"- LoRA: rank {config.lora.r}, alpha {config.lora.alpha}, merged into the weights")
    return lines


def _metric_rows(metrics: dict) -> list[str]:
    """The scorecard's metrics that the run measured, as a table: this model's value beside the original's and the
    retrain reference's when the run scored them (the registry's headers and formats)."""
    from obliviate.bench.scorecard import cell, run_rows
    from obliviate.registry import ARROWS, scorecard_metrics

    models = run_rows(metrics)
    order = [next(reversed(models)), *(n for n in models if n in ("original", "retrain"))]
    rows = ["| metric | " + " | ".join("this model" if i == 0 else n for i, n in enumerate(order))
            + " | better | what it measures |", "|" + " --- |" * (len(order) + 3)]
    for m in scorecard_metrics():
        if isinstance(metrics.get(m.name), (int, float)) and m.better is not None:
            values = " | ".join(cell(models[n], m.name, m.fmt) for n in order)
            rows.append(f"| {m.header} | {values} | {ARROWS[m.better]} | {m.description} |")
    return rows if len(rows) > 2 else []


def model_card(run_dir: Path, base: Path, export_name: str):
    """The exported model's card: a huggingface_hub ModelCard built from the run folder's records."""
    from huggingface_hub import ModelCard, ModelCardData

    from obliviate import __version__
    from obliviate.data import read_json_file
    from obliviate.families import get
    from obliviate.registry import lookup_method
    from obliviate.runs import read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    family = get(config.family)
    method = lookup_method(config.family, config.method)
    metrics_path = run_dir / "metrics.json"
    metrics = read_json_file(metrics_path, "run metrics") if metrics_path.is_file() else {}
    if not isinstance(metrics, dict):
        raise ObliviateError(f"{metrics_path}: run metrics must be a JSON object")
    hub_id = base_model_id(base)
    library, pipeline_tag = family.hub
    data = ModelCardData(base_model=hub_id, library_name=library, pipeline_tag=pipeline_tag,
                         tags=["obliviate", "machine-unlearning", method.name])
    forgotten = family.describe(config)
    base_text = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"a local model (`{Path(base).name}`)"
    rows = _metric_rows(metrics)
    status = metrics.get("status")
    lines = [
        f"# {export_name}", "",
        f"A {family.title} unlearned with [obliviate](https://pypi.org/project/obliviate/) {__version__}: "
        f"{base_text} with {forgotten} removed by {method.name}.", "",
        "## What was forgotten", "",
        f"- base model: {base_text}",
        f"- forgotten: {forgotten}" + (f" ({metrics['forget_set']})" if metrics.get("forget_set") and
                                       str(metrics["forget_set"]) not in forgotten else ""), "",
        "## Method and settings", "",
        f"- method: **{method.name}**: {method.description}" + (f" ({method.paper})" if method.paper else ""),
        *_settings(config),
        f"- the run: `{run_dir.name}` (its config.json has every setting; `obliviate run` repeats it)", "",
        *_guard_lines(metrics),
        "## Headline metrics", "",
    ]
    if rows:
        lines += [*rows, ""]
        if metrics.get("retrain_reference"):
            lines += [f"Compared with the retrain reference: {metrics['retrain_reference']}.", ""]
    else:
        lines += ["The run was not evaluated (`evaluate = false`): no metrics to report.", ""]
    if status and status != "completed":
        lines += [f"**The run stopped early**: {metrics.get('stopped')}.", ""]
    lines += ["## Limitations", "",
              "Unlearning is judged by the metrics above on the sets the run scored; a model that scores well may "
              "still hold the forgotten data in ways they do not probe. `obliviate attack` on the run folder tries "
              "to bring it back.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _guard_lines(metrics: dict) -> list[str]:
    """A generation-time guard changes no weight: the card says how to sample through it."""
    if not isinstance(metrics.get("guard"), dict):
        return []
    from obliviate.guards import GUARD_FILE, LOAD_CALL
    library = "transformers" if metrics["guard"].get("family") in ("lm", "mllm") else "diffusers"
    return [f"**A generation-time guard**: the weights are the base model's; {metrics['guard'].get('guard')} acts "
            f"while the model samples. `{LOAD_CALL}(folder)` loads this folder with the guard ({GUARD_FILE} holds its "
            f"settings); {library}' `from_pretrained` alone gives the unguarded model.", ""]


def push_to_hub(folder: Path, repo_id: str, private: bool = False, commit_message: str = "obliviate export") -> str:
    """Create `repo_id` (a model repository; kept if it exists) and upload `folder` to it; the URL of the commit.
    The token is huggingface_hub's own (HF_TOKEN or `huggingface-cli login`). A failure is one line, and the
    exported folder stays for a later upload."""
    from huggingface_hub import HfApi

    if not HUB_ID.fullmatch(repo_id):
        raise ObliviateError(f"--push-to-hub {repo_id!r}: a Hub repository id looks like USER/NAME")
    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message)
    except Exception as e:  # huggingface_hub's HTTP errors, no token, no network: the folder is kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ObliviateError(f"push to {repo_id} failed: {first} (the exported folder {folder} is kept; upload it "
                             f"later with `huggingface-cli upload {repo_id} {folder}`)") from None
    return str(getattr(commit, "commit_url", commit))
