"""`obliviate demo`: the whole loop on the built-in worlds, on a CPU, in minutes.

Profiles: builds (or loads) the world, unlearns forget10 with several methods starting from the same full model,
evaluates each one and the retrain gold standard with the same protocol (demo/lm.py). Canvas (demo/t2i.py): erases a style and an
object from the world's pipeline with several methods, next to the retrain-without-concept references. Prints the
scorecards and writes summary.json, one folder per method (metrics, per-item values, history, changed tensors),
image grids and report.html — atomically.
"""
from __future__ import annotations

import time
from pathlib import Path

from obliviate.errors import ObliviateError

PARTS = {"profiles": "language model", "canvas": "text-to-image"}  # world -> family of the demo part


def run_demo(out: Path, tofu_dir: Path | None, methods: list[str], log=print, t2i_methods=None, concepts=None,
             worlds=("profiles", "canvas")) -> dict:
    """The profiles world's unlearning (LM `methods`) and the canvas world's erasures (`t2i_methods` x `concepts`)."""
    bad = set(worlds) - set(PARTS)
    if bad or not worlds:
        raise ObliviateError(f"unknown demo world(s) {sorted(bad) or '(none)'}; valid: {', '.join(PARTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise ObliviateError(f"{out} exists and is not a demo folder; choose another --out")
    t_start = time.time()
    summary = {"scorecard": {}, "notes": [], "winners": [], "histories": {}, "per_method": {}}
    if "profiles" in worlds:
        from obliviate.demo.lm import run_lm_demo
        summary = run_lm_demo(tofu_dir, methods, log)
    sections = []
    if "canvas" in worlds:
        from obliviate.demo import t2i as demo_t2i
        sections = demo_t2i.run_canvas_demo(list(t2i_methods or demo_t2i.METHODS),
                                            list(concepts or demo_t2i.CONCEPTS), log)
    return _write_demo(out, summary, sections, t_start, log)


def _write_demo(out: Path, summary: dict, sections: list[dict], t_start: float, log) -> dict:
    from obliviate.bench.report import write_demo_report
    from obliviate.bench.scorecard import print_scorecard
    from obliviate.runs import atomic_dir, environment, write_json

    rows, histories, per_method = summary.pop("scorecard"), summary.pop("histories"), summary.pop("per_method")
    summary = {**summary, "scorecard": rows, "environment": environment()}
    with atomic_dir(out) as tmp:
        if per_method:
            from obliviate.demo.lm import write_method_folders
            write_method_folders(tmp, rows, per_method, summary["base_model"])
        if sections:
            from obliviate.demo import t2i as demo_t2i
            from obliviate.worlds.canvas import CanvasWorld
            summary["t2i"] = demo_t2i.write_sections(tmp, sections, str(CanvasWorld().pipeline_dir))
        summary["total_seconds"] = round(time.time() - t_start, 1)
        write_json(tmp / "summary.json", summary)
        write_demo_report(tmp, summary, histories)
    if rows:
        print_scorecard(rows, title=f"obliviate demo: {summary['split']} of the profiles world")
        for n in summary["notes"]:
            log(n)
    for s in summary.get("t2i", []):
        print_scorecard(s["scorecard"], title=f"obliviate demo: {s['title']}")
        for n in s["notes"]:
            log(n)
    log(f"wrote {out / 'summary.json'} and {out / 'report.html'} ({summary['total_seconds']:.0f} s in all)")
    return summary
