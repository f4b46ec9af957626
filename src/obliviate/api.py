"""Entry points shared by the CLI and notebooks that are more than a single call."""
from __future__ import annotations

import os
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.run_actions import (attack_instances, attack_run, export_run,  # noqa: F401  (the public api)
                                    is_run_folder)
from obliviate.runs import write_json


def evaluate_folder(model_dir: Path, out: Path, *, force: bool = False, split: str = "forget10",
                    world_tofu_dir: Path | None = None, world: str | None = None, **options) -> dict:
    """Evaluate a transformers folder: on the user's files (forget_file + retain_file, tofu_dir or muse_dir, plus
    eval_sets with their roles, against retrain_model or retrain_eval when given), or on the profiles world's sets
    against its retrain model; a vision-language folder with `mllmu_dir` (MLLMU-Bench's files) or `world =
    "portraits"` through its family's evaluation (the family is the world's, or the one whose inputs the options
    name, else the language model's); `harness` (a HarnessConfig's keys: wmdp_dir, mmlu_dir, ...) adds
    lm-evaluation-harness's WMDP / MMLU tasks, and alone (no files, no `world`) is the whole evaluation. `options` are
    run-config keys (batch_size, max_logit_tokens and
    retain_people go under `eval`, `template` is a name or a mapping, device, dtype, trust_remote_code), checked as a
    run config is. An existing `out` is replaced only with `force`; an input file never is."""
    from obliviate.config import build_config, family_of_keys
    from obliviate.evals.evaluate import compare_to_retrain
    from obliviate.runners.lm import (evaluation_of, format_record, load_model, prepare, retrain_evaluation,
                                      user_retrain_evaluation)
    from obliviate.runners.lm_data import uses_user_data
    from obliviate.runners.lm_checks import check_lm
    from obliviate.runs import resolve_device

    if is_run_folder(Path(model_dir)):
        raise ObliviateError(f"{model_dir} is a run folder (the changed tensors, not a model): export it first with "
                             f"`obliviate export {model_dir} OUT`, then evaluate OUT (the run's own metrics are in "
                             f"{Path(model_dir) / 'metrics.json'})")
    eval_keys = {k: options.pop(k) for k in ("batch_size", "max_logit_tokens", "retain_people")
                 if options.get(k) is not None}
    template = options.pop("template", None) or {}
    template = {"name": template} if isinstance(template, str) else dict(template)
    if (system_prompt := options.pop("system_prompt", None)) is not None:
        template["system_prompt"] = system_prompt
    data = {"method": "GradDiff",  # any method: evaluation trains nothing, the config only carries the options
            "model": str(model_dir), "split": split, "eval": eval_keys, **({"template": template} if template else {}),
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v not in (None, [], ())}}
    if world_tofu_dir:
        data["world"] = {"tofu_dir": str(world_tofu_dir)}
    if world:
        data["world"] = {**data.get("world", {}), "name": world}
    elif family_of_keys(data):  # the options name one family's inputs (--mllmu-dir: a vision-language model's)
        data["family"] = family_of_keys(data)
    config = build_config(data, "eval options")

    def given(key: str):  # a key of the config's family, or None
        return getattr(config, key, None)
    inputs = [Path(f) for f in (given("forget_file"), given("retain_file"), given("retrain_eval")) if f]
    folders = {"the model folder": model_dir, "--tofu-dir": given("tofu_dir"), "--muse-dir": given("muse_dir"),
               "--mllmu-dir": given("mllmu_dir"), "--world-tofu-dir": config.world.tofu_dir,
               "--retrain-model": given("retrain_model"),
               **({"--wmdp-dir": config.harness.wmdp_dir, "--mmlu-dir": config.harness.mmlu_dir}
                  if given("harness") else {})}
    _check_out_file(Path(out), inputs + [Path(s.file) for s in given("eval_sets") or []],
                    {k: Path(v) for k, v in folders.items() if v}, force)
    from obliviate.families import get

    family = get(config.family)
    if family.evaluate:  # a family with its own evaluation (vision-language: MLLMU-Bench's protocol)
        return family.load("evaluate")(config, Path(out))
    if config.harness is not None and not uses_user_data(config) and not world:  # the harness's tasks only
        from obliviate.evals.harness import evaluate_harness, plan
        from obliviate.models import check_model_folder

        check_model_folder(model_dir)
        plan(config.harness)  # every file checked before the model loads
        model, tok = load_model(model_dir, config, resolve_device(config.device))
        return _write_eval(out, evaluate_harness(model, tok, config.harness))
    check_lm(config)
    device = resolve_device(config.device)
    model_path, _, _, (qa_sets, texts, roles, label), world = prepare(config, log=lambda *_: None)
    model, tok = load_model(model_path, config, device)
    result = evaluation_of(model, tok, qa_sets, texts, config.eval, roles=roles, harness=config.harness)
    if world is not None:
        reference = retrain_evaluation(world, split, config.eval, qa_sets, texts, config.device, config.harness)
    else:
        reference = user_retrain_evaluation(config, qa_sets, texts, roles, device) if uses_user_data(config) else None
    if reference is not None:
        result = compare_to_retrain(result, reference)
    result["forget_set"], result["prompt_format"] = label, format_record(tok)
    return _write_eval(out, result)


def _write_eval(out: Path, result: dict) -> dict:
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ObliviateError(f"cannot write to {out}: {e.strerror or e}") from None
    write_json(out, result)  # atomically: a full disk leaves no half file
    return result


def report_folders(folders: list[Path], out: Path | None = None, figures: bool = True) -> list[Path]:
    """`obliviate report`: one folder's page (a run or demo folder's report.html; a bench folder's leaderboard.md,
    leaderboard.html and figures), or for several run and bench folders one page side by side at `out` (default
    ./obliviate-report.html). `figures` False: a bench's or a comparison's tables without plots. Returns the paths
    written."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ObliviateError("report needs at least one run, demo or bench folder")
    for folder in folders:
        if not folder.is_dir():
            raise ObliviateError(f"no such folder: {folder}")
    if len(folders) == 1 and out is None:
        if (folders[0] / "bench.json").is_file():
            from obliviate.bench.leaderboard import write_leaderboard
            return write_leaderboard(folders[0], figures=figures)
        from obliviate.bench.report import rewrite_report
        return [rewrite_report(folders[0])]
    from obliviate.bench.leaderboard import write_comparison
    return [write_comparison(folders, Path(out or "obliviate-report.html"), figures)]


def _check_out_file(out: Path, inputs: list[Path], folders: dict[str, Path], force: bool) -> None:
    """Before any model is loaded (minutes), so a bad --out fails at once: never an input file nor an existing
    file of an input folder (`folders`: {its option: folder}), forced or not; never a folder; an existing file only
    with --force."""
    def same(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))

    for f in inputs:
        if same(out, f):
            raise ObliviateError(f"--out {out} is the input file {f}; choose another output file")
    if out.is_dir():
        raise ObliviateError(f"--out {out} is a folder; give a file name")
    for option, folder in folders.items():
        if out.exists() and folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
            raise ObliviateError(f"--out {out} is a file of {option} {folder}, an input (never overwritten, even "
                                 "with --force); choose another output file")
    existing = next(p for p in out.absolute().parents if p.exists())  # the folders below it are made at the end
    if not existing.is_dir():
        raise ObliviateError(f"--out {out}: {existing} is not a folder")
    if out.exists() and not force:
        raise ObliviateError(f"--out {out} already exists; pass --force to overwrite it")


def bench(spec: str | Path, out: str | Path | None = None, *, workers: int = 1, use_ray: bool = False,
          ray_address: str | None = None, threads: int | None = None, retry_failed: bool = False,
          dry_run: bool = False, overrides: list[str] = (), log=print) -> dict:
    """`obliviate bench SPEC`: the spec's validation grid, a selection per method by its declared rule, the chosen
    settings on the reported target over seeds, the noise floor's retrain references, scalability and
    sustainability, into the bench folder `out` (docs/bench.md). Resumable: finished cells are skipped. Returns
    {"out", "cells", "selection"}."""
    from obliviate.bench.engine import run_bench

    return run_bench(spec, out, workers=workers, use_ray=use_ray, ray_address=ray_address, threads=threads,
                     retry_failed=retry_failed, dry_run=dry_run, overrides=list(overrides), log=log)
