"""`obliviate demo`: the whole loop on the built-in worlds, on a CPU.

Profiles (demo/lm.py): builds (or loads) the world, unlearns forget10 with several methods starting from the same
full model, evaluates each one and the retrain gold standard with the same protocol. Canvas (demo/t2i.py): erases a
style and an object from the world's pipeline with several methods, next to the retrain-without-concept references,
and attacks each erasure. Portraits (demo/mllm.py): unlearns forget10 from the world's small LLaVA and scores it with
MLLMU-Bench's protocol. Each part writes its own folders (metrics, per-item values, history, changed tensors, image
grids); this module runs the parts (side by side, one process each, when `jobs` > 1, each on one thread: the small
models gain little from a second thread), then writes
summary.json and report.html and prints the scorecards — the whole folder atomically.
"""
from __future__ import annotations

import time
from pathlib import Path

from obliviate.errors import ObliviateError


def _parts() -> dict[str, str]:
    """world -> its family's demo part (obliviate.families), in the table's order."""
    from obliviate.families import FAMILIES

    return {w: f.demo for f in FAMILIES.values() for w in f.worlds}


PARTS = _parts()
SIZES = ("demo", "full")  # every part takes `size`: its small default world and settings, or the full-size ones


def run_demo(out: Path, tofu_dir: Path | None, methods: list[str], log=print, t2i_methods=None, concepts=None,
             worlds=None, jobs: int = 1, size: str = "demo",
             mllm_methods=None) -> dict:
    """The profiles world's unlearning (LM `methods`), the canvas world's erasures (`t2i_methods` x `concepts`) and
    the portraits world's unlearning (`mllm_methods`). `worlds`: the parts to run (default: every part).
    `size`: "demo" (smaller world and sampling, the default) or "full" (the full-size worlds and settings)."""
    from obliviate.runs import atomic_dir

    worlds = tuple(PARTS) if worlds is None else tuple(worlds)
    bad = set(worlds) - set(PARTS)
    if bad or not worlds:
        raise ObliviateError(f"unknown demo world(s) {sorted(bad) or '(none)'}; valid: {', '.join(PARTS)}")
    if size not in SIZES:
        raise ObliviateError(f"unknown demo size {size!r}; valid: {', '.join(SIZES)}")
    if jobs < 1:
        raise ObliviateError(f"--jobs must be at least 1, got {jobs}")
    if tofu_dir is not None and not Path(tofu_dir).is_dir():
        raise ObliviateError(f"TOFU folder not found: {tofu_dir}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise ObliviateError(f"{out} exists and is not a demo folder; choose another --out")
    options = {"profiles": {"tofu_dir": tofu_dir, "methods": list(methods), "size": size},
               "canvas": {"methods": list(t2i_methods) if t2i_methods else None,
                          "concepts": list(concepts) if concepts else None, "size": size},
               "portraits": {"methods": list(mllm_methods) if mllm_methods else None, "size": size}}
    t_start = time.time()
    with atomic_dir(out) as tmp:
        todo = [(w, options[w]) for w in PARTS if w in worlds]
        if jobs > 1 and len(todo) > 1:
            parts = _side_by_side(tmp, todo, log)
        else:
            parts = {w: _call(PARTS[w], tmp, log, opts) for w, opts in todo}
        summary = _summary(parts, t_start)
        summary["size"] = size
        _write(tmp, summary, parts.get("profiles", {}).get("histories", {}),
               parts.get("portraits", {}).get("histories", {}))
    _print(out, summary, log)
    return summary


def write_method_folders(folder: Path, rows: dict, per_method: dict, base_model: str,
                         attacks: dict[str, dict] | None = None) -> None:
    """One run folder per method of a language-model or vision-language part. per_method: name -> (evaluation,
    UnlearnResult, the method's RunConfig); attacks: name -> {attack: result}."""
    from obliviate.loops.step import changed_tensors

    for name, (evaluation, result, config) in per_method.items():
        write_method_folder(folder / name, config, base_model, rows[name], result.history, evaluation["per_item"],
                            changed_tensors(result.model, result.trainable_names), (attacks or {}).get(name))


def write_method_folder(folder: Path, config, base_model: str, metrics: dict, history: list, per_item,
                        tensors: dict, attacks: dict | None = None, grids: dict[str, str] | None = None) -> None:
    """A demo method's folder as a complete run folder, which `obliviate report`, `export` and `attack` take as they
    take `obliviate run`'s: the config that reproduces it (`config`: a RunConfig), the run record with the base
    model's weight hashes, metrics naming the method and what was forgotten, history, per-item values, the changed
    tensors, the attacks' results (`attacks`: {name: result}) and the run's page. `grids`: caption -> a PNG file of
    the folder."""
    from datetime import datetime, timezone

    from safetensors.torch import save_file

    from obliviate.bench.report import write_run_report
    from obliviate.families import get
    from obliviate.runs import base_record, resolve_device, write_json, write_run_record

    subject = get(config.family).subject
    metrics = {"method": config.method, subject: getattr(config, subject), **metrics}
    base = base_record(base_model)
    folder.mkdir(parents=True)
    write_run_record(folder, config, datetime.now(timezone.utc), base, resolve_device(config.device), history,
                     metrics)
    write_json(folder / "per_item.json", per_item)
    save_file(tensors, str(folder / "changed.safetensors"), metadata={"base_model": base["base_model"]})
    if attacks:
        (folder / "attacks").mkdir()
        for name, result in attacks.items():
            write_json(folder / "attacks" / f"{name}.json", result)
    write_run_report(folder, metrics, history, grids=grids)


def _call(target: str, folder: Path, log, options: dict) -> dict:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(folder, log=log, **options)


def _one_part(target: str, folder: str, options: dict, show_progress: bool) -> dict:
    """A part in a worker process: one torch thread, plain progress lines (two live bars would garble a terminal)."""
    import torch

    from obliviate import progress
    from obliviate.models import quiet_transformers

    torch.set_num_threads(1)
    quiet_transformers()  # transformers' own per-file bars would interleave with the other part's lines
    progress.set_enabled(show_progress)
    progress.force_plain(True)
    return _call(target, Path(folder), print, options)


def _side_by_side(folder: Path, todo: list, log) -> dict:
    """The parts in worker processes at once, one each (three parts on two cores share them: the machine's work is
    the same, and no part waits for another to finish); an error in one stops all (`workers.side_by_side`)."""
    from obliviate import progress
    from obliviate.workers import side_by_side

    log(f"running the {', '.join(w for w, _ in todo)} parts side by side (one process each)")
    return side_by_side({w: (_one_part, (PARTS[w], str(folder), opts, progress.enabled())) for w, opts in todo})


def _summary(parts: dict, t_start: float) -> dict:
    from obliviate.runs import environment

    lm = parts.get("profiles", {"scorecard": {}, "notes": [], "winners": []})
    summary = {k: v for k, v in lm.items() if k != "histories"}
    summary["environment"] = environment()
    if "canvas" in parts:
        summary["t2i"] = parts["canvas"]["sections"]
    if "portraits" in parts:
        summary["mllm"] = {k: v for k, v in parts["portraits"].items() if k != "histories"}
    summary["total_seconds"] = round(time.time() - t_start, 1)
    return summary


def _write(folder: Path, summary: dict, histories: dict, mllm_histories: dict) -> None:
    from obliviate.bench.report import write_demo_report
    from obliviate.runs import write_json

    write_json(folder / "summary.json", summary)
    write_demo_report(folder, summary, histories, mllm_histories)


def _print(out: Path, summary: dict, log) -> None:
    from obliviate.bench.scorecard import print_robustness_table, print_scorecard

    if summary["scorecard"]:
        print_scorecard(summary["scorecard"], title=f"obliviate demo: {summary['split']} of the profiles world")
        for n in summary["notes"]:
            log(n)
    if summary.get("robustness"):
        print_robustness_table(summary["robustness"], title=f"robustness: recovery attacks on {summary['split']} "
                                                            "of the profiles world")
    for s in summary.get("t2i", []):
        print_scorecard(s["scorecard"], title=f"obliviate demo: {s['title']}")
        for n in s["notes"]:
            log(n)
        if s.get("robustness"):
            print_robustness_table(s["robustness"], title=f"robustness: {s['title']}")
    if "mllm" in summary:
        from obliviate.bench.scorecard import print_mllmu_table

        m = summary["mllm"]
        print_mllmu_table(m["scorecard"], title=f"obliviate demo: {m['split']} of the portraits world (MLLMU-Bench)")
        for n in m["notes"]:
            log(n)
    log(f"wrote {out / 'summary.json'} and {out / 'report.html'} ({summary['total_seconds']:.0f} s in all)")
