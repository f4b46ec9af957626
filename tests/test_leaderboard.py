"""The bench's leaderboard read from a bench folder as the bench writes it (cell records, run folders whose
metrics.json has the key structure of a real tiny run: tests/data/lm_metrics.json is one, copied as written): mean ±
std over seeds, the retrain reference on top and the original at the bottom, directions from the registry, failed
cells shown as failed, "k of n seeds", the measured noise floor, `obliviate report A B`, and the page in Chromium."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
# method -> one (forget quality, model utility, forget accuracy) per seed; None: the seed's cell failed
LM_CELLS = {"NPO": [(0.40, 0.62, 0.10), (0.20, 0.61, 0.05), (0.30, 0.625, 0.20)],
            "GradDiff": [(0.02, 0.55, 0.30), (0.08, 0.50, 0.00), None],
            "RMU": [None, None, None]}
ORIGINAL = {"forget_quality": 1e-5, "model_utility": 0.64, "forget_accuracy": 0.95}
RETRAIN = {"forget_quality": 1.0, "model_utility": 0.62, "forget_accuracy": 0.05, "privleak": 0.0}
FLOOR = {"forget_quality": 0.55, "model_utility": 0.615, "forget_accuracy": 0.10}  # retrain seed 1 vs seed 0
REASON = "non-finite loss at step 7 (lr 1e-3): the last good state is kept"


def lm_metrics(method: str, fq: float, mu: float, facc: float) -> dict:
    """A metrics.json with the real run's keys, its headline numbers set."""
    m = json.loads((DATA / "lm_metrics.json").read_text())
    m.update(method=method, forget_quality=fq, model_utility=mu, forget_accuracy=facc)
    m["retrain_comparison"]["forget_quality"] = fq
    m["original"].update(ORIGINAL)
    m["retrain"].update(RETRAIN)
    return m


def _record(out: Path, kind: str, method: str, seed: int, status: str = "done", reason: str | None = None,
            params: dict | None = None, target: str = "forget10", size=None, request=None, family: str = "lm",
            config: dict | None = None) -> str:
    import hashlib

    base = json.loads((DATA / "lm_config.json").read_text()) if family == "lm" else {
        "family": "t2i", "concept": target, "world": {"name": "canvas"}}
    config = {**base, **(config or {}), "method": method}
    key = hashlib.sha256(json.dumps([config, kind, seed, size, request, target], sort_keys=True).encode()
                         ).hexdigest()[:16]
    record = {"key": key, "kind": kind, "method": method, "params": params or {}, "target": target, "seed": seed,
              "request": request, "size": size, "status": status, "reason": reason, "seconds": 1.5, "host": "test",
              "run": key, "config": config}
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "cells" / f"{key}.json").write_text(json.dumps(record))
    return key


def _run_folder(out: Path, key: str, metrics: dict, history=None, evaluations=None) -> Path:
    folder = out / "cells" / key
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.json").write_text(json.dumps(history or [
        {"step": s, "loss": -1.0 - s, "forget_nll": 2.0 + 0.3 * s, "retain_nll": 1.0 + 0.01 * s} for s in range(6)]))
    if evaluations:
        (folder / "evaluations.json").write_text(json.dumps(evaluations))
    return folder


def make_bench(tmp_path: Path) -> Path:
    """Profiles (lm): 3 methods x 3 seeds (one method partly failed, one wholly), two retrain seeds for the floor,
    scalability and sustainability cells, an attack; canvas (t2i): one method with an image grid; selection.json."""
    from PIL import Image

    out = tmp_path / "bench"
    out.mkdir()
    spec = {"name": "test grid", "selection": {"metric": "forget_quality", "constraints": [
        "forget_quality >= 0.05", "model_utility >= 0.9x original"]}}
    (out / "bench.json").write_text(json.dumps({"name": "test grid", "family": "lm", "spec": spec,
                                                "created": "2026-12-03T00:00:00", "obliviate_version": "0.1.0"}))
    for method, seeds in LM_CELLS.items():
        for seed, numbers in enumerate(seeds):
            params = {"train.lr": 1e-5 if method == "NPO" else 3e-5}
            if numbers is None:
                _record(out, "reported", method, seed, "failed", REASON, params)
                continue
            key = _record(out, "reported", method, seed, params=params)
            evaluations = [{"step": s, "epoch": s / 4, "metrics": {"forget_quality": 1e-5 + numbers[0] * s / 8,
                                                                   "model_utility": 0.64 - s * 0.004}}
                           for s in (0, 4, 8)]
            folder = _run_folder(out, key, lm_metrics(method, *numbers), evaluations=evaluations)
            if method == "NPO" and seed == 0:
                (folder / "attacks").mkdir()
                (folder / "attacks" / "paraphrase.json").write_text(json.dumps({
                    "family": "lm", "method": "NPO", "headline": "recall", "label": "paraphrase recall",
                    "models": {"NPO": {"recall": 0.12}, "original": {"recall": 0.9}, "retrain": {"recall": 0.05}}}))
    for seed in (1, 2):
        key = _record(out, "reference", "Retrain", seed, config={"method_args": {"seed": seed}})
        floor = {k: v + (seed - 1) * 0.02 for k, v in FLOOR.items()}
        _run_folder(out, key, lm_metrics("Retrain", floor["forget_quality"], floor["model_utility"],
                                         floor["forget_accuracy"]))
    for size, fq in ((1, 0.5), (5, 0.3), (10, 0.2)):
        for seed in (0, 1):
            key = _record(out, "scalability", "NPO", seed, size=size, target=f"forget{size:02d}")
            _run_folder(out, key, lm_metrics("NPO", fq + 0.01 * seed, 0.6 - 0.01 * size, 0.1))
    for request in (1, 2, 3):
        key = _record(out, "sustainability", "NPO", 0, request=request, target="forget10")
        _run_folder(out, key, lm_metrics("NPO", 0.4 / request, 0.6 - 0.03 * request, 0.1))
    _record(out, "sustainability", "NPO", 1, "failed", "out of memory", request=1, target="forget10")
    # text-to-image: the canvas runner's metrics.json keeps the references as prefixed keys
    for seed, ua in enumerate((0.9, 0.8)):
        key = _record(out, "reported", "ESD-x", seed, target="striped", family="t2i", params={"train.lr": 1e-4})
        folder = _run_folder(out, key, {"method": "ESD-x", "concept": "striped", "status": "completed",
                                        "ua": ua, "ira": 0.85, "cra": 0.9, "original_ua": 0.05, "original_ira": 0.95,
                                        "original_cra": 0.92, "retrain_ua": 0.97, "retrain_ira": 0.9,
                                        "retrain_cra": 0.91, "ira_vs_original": 0.89, "unlearn_seconds": 3.0},
                             history=[{"step": s, "loss": 1.0 / (s + 1), "esd_mse": 0.1 / (s + 1)} for s in range(5)])
        Image.new("RGB", (96, 48), (40 * seed, 120, 200)).save(folder / "grid.png")
    (out / "selection.json").write_text(json.dumps({
        "NPO": {"rule": "best forget_quality with model_utility >= 0.9x original", "chosen": {"train.lr": 1e-5},
                "chosen_cell": "aaaa", "score": 0.31, "margin": 0.07, "candidates": [
                    {"params": {"train.lr": 1e-5}, "cell": "aaaa", "score": 0.31, "eligible": True, "status": "done"},
                    {"params": {"train.lr": 3e-5}, "cell": "bbbb", "score": 0.24, "eligible": True, "status": "done"},
                    {"params": {"train.lr": 1e-4}, "cell": "cccc", "score": None, "eligible": False,
                     "status": "failed"}]},
        "GradDiff": {"rule": "best forget_quality with model_utility >= 0.9x original",
                     "chosen": {"train.lr": 3e-5}, "chosen_cell": "dddd", "score": 0.09, "margin": None,
                     "candidates": [{"params": {"train.lr": 3e-5}, "cell": "dddd", "score": 0.09, "eligible": True,
                                     "status": "done"}]}}))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from obliviate.bench.leaderboard import write_leaderboard

    out = make_bench(tmp_path_factory.mktemp("lb"))
    paths = write_leaderboard(out)
    return out, paths


def _md_rows(md: str, title: str) -> list[list[str]]:
    """The rows of the first table under the section `title`."""
    section = md.split(f"## {title}")[1].split("\n\n- ")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_mean_and_std_over_seeds_match_numpy(bench):
    from obliviate.bench.leaderboard import board, read_bench

    b = board(read_bench(bench[0]), "the profiles world", "lm", "forget10")
    npo = next(ln for ln in b.lines if ln.label == "NPO")
    values = np.array([s[0] for s in LM_CELLS["NPO"]])
    assert npo.stats["forget_quality"].mean == pytest.approx(values.mean())
    assert npo.stats["forget_quality"].std == pytest.approx(values.std(ddof=1))
    assert npo.stats["forget_quality"].n == 3
    mu = np.array([s[1] for s in LM_CELLS["NPO"]])
    rows = _md_rows((bench[0] / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")
    header, npo_row = rows[0], next(r for r in rows if r[1] == "NPO")
    assert npo_row[header.index("model utility ↑")].startswith(f"{mu.mean():.3f} ± {mu.std(ddof=1):.3f}")
    # the utility ratio comes from each seed's own original
    assert npo.stats["utility_ratio"].mean == pytest.approx((mu / ORIGINAL["model_utility"]).mean())


def test_retrain_on_top_original_at_the_bottom_and_ranked_by_the_rule(bench):
    rows = _md_rows((bench[0] / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")
    labels = [r[1] for r in rows[1:]]
    assert labels[0].startswith("retrain") and labels[1].startswith("retrain seed 1/2 vs seed 0")
    assert labels[-1].startswith("original")
    assert labels[2:5] == ["NPO", "GradDiff", "RMU"]  # by forget quality; the failed method last, unranked
    assert [r[0] for r in rows[3:6]] == ["1", "2", ""]


def test_column_directions_come_from_the_registry(bench):
    from obliviate.bench.leaderboard import board, read_bench
    from obliviate.registry import METRICS

    b = board(read_bench(bench[0]), "the profiles world", "lm", "forget10")
    header = _md_rows((bench[0] / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")[0]
    for m in b.columns:
        assert METRICS[m.name].column_title in header
    assert "forget quality ↑" in header and "forget acc ↓" in header and "PrivLeak →0" in header
    assert METRICS["forget_accuracy"].higher_is_better is False
    # GradDiff is worse by forget quality (higher is better) than NPO, so it ranks after it
    ranks = {ln.label: ln.rank for ln in b.lines}
    assert ranks["NPO"] < ranks["GradDiff"]


def test_failed_cells_show_as_failed_with_their_reason(bench):
    md = (bench[0] / "leaderboard.md").read_text()
    rows = _md_rows(md, "the profiles world, lm: forgetting forget10")
    rmu = next(r for r in rows if r[1] == "RMU")
    assert rmu[4].startswith("failed") and REASON in rmu[4] and not re.search(r"\d\.\d{3}", rmu[4].split("(")[0])
    graddiff = next(r for r in rows if r[1] == "GradDiff")
    assert graddiff[3].startswith("2 of 3 seeds") and REASON in graddiff[3]
    html = (bench[0] / "leaderboard.html").read_text()
    assert "class='text failed'" in html and REASON in html
    assert "failed: out of memory" in md  # a sustainability cell


def test_bar_met_on_k_of_n_seeds(bench):
    rows = _md_rows((bench[0] / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")
    header = rows[0]
    bar = header.index("meets the bar")
    # NPO: fq >= 0.05 on all 3 seeds, utility >= 0.9 x 0.64 = 0.576 on all 3; GradDiff: fq fails seed 0, mu fails seed 1
    assert next(r for r in rows if r[1] == "NPO")[bar] == "3 of 3 seeds"
    assert next(r for r in rows if r[1] == "GradDiff")[bar] == "0 of 2 seeds"


def test_noise_floor_is_a_line_and_forget_quality_is_never_one_by_definition(bench):
    from obliviate.bench.leaderboard import board, read_bench

    md = (bench[0] / "leaderboard.md").read_text()
    assert "retrain seed 1/2 vs seed 0: the noise floor" in md
    assert "1 by definition" not in md and "1 by definition" not in (bench[0] / "leaderboard.html").read_text()
    b = board(read_bench(bench[0]), "the profiles world", "lm", "forget10")
    retrain, floor = b.lines[0], b.lines[1]
    floors = np.array([FLOOR["forget_quality"], FLOOR["forget_quality"] + 0.02])
    assert retrain.stats["forget_quality"].mean == pytest.approx(floors.mean())  # measured, not 1.0
    assert floor.stats["forget_quality"].mean == pytest.approx(floors.mean())
    assert retrain.stats["model_utility"].mean == pytest.approx(RETRAIN["model_utility"])
    assert set(retrain.notes) == {"forget_quality", "privleak"}  # the metrics.json's retrain_comparison keys
    # how far a second retrain model is from the reference: |0.615 - 0.62| and |0.635 - 0.62|
    assert b.floor_gap["model_utility"] == pytest.approx(np.mean([0.005, 0.015]))
    assert b.floor_gap["forget_quality"] == pytest.approx(np.mean([0.45, 0.43]))
    near = {ln.label: ln.near for ln in b.lines if ln.kind == "method"}
    assert "model_utility" in near["NPO"]  # 0.618: 0.002 from the reference, inside the floor's 0.01
    assert "model_utility" not in near["GradDiff"]  # 0.525: 0.095 away
    assert "forget_quality" not in near["NPO"]  # 0.30 vs 1: 0.70 away, the floor 0.44
    npo_row = next(r for r in _md_rows(md, "the profiles world, lm: forgetting forget10") if r[1] == "NPO")
    assert any(c.endswith("≈") for c in npo_row)
