"""The bench's leaderboard read from a bench folder as the bench writes it (cell records, run folders whose
metrics.json has the key structure of a real tiny run: tests/data/lm_metrics.json is one, copied as written): mean ±
std over seeds, the retrain reference on top and the original at the bottom, directions from the registry, failed
cells shown as failed, "k of n seeds", the measured noise floor, `obliviate report A B`, and the page in Chromium."""
from __future__ import annotations

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
OOM = "out of memory | tried to allocate 2.00 GiB"  # a '|' that must not split a Markdown cell
PARAPHRASE = [0.12, 0.2]  # NPO's paraphrase-attack recall on seeds 0 and 1


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
    spec = {"name": "test grid", "select": {"maximize": "forget_quality", "constraints": [
        "forget_quality >= 0.05", "model_utility >= 0.9 * original"]}}  # the bench spec's rule, as written
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
            if method == "NPO" and seed < 2:  # attacks on two of its seeds; a relearning attack on the first
                (folder / "attacks").mkdir()
                (folder / "attacks" / "paraphrase.json").write_text(json.dumps({
                    "family": "lm", "method": "NPO", "headline": "recall", "label": "paraphrase recall",
                    "models": {"NPO": {"recall": PARAPHRASE[seed]}, "original": {"recall": 0.9},
                               "retrain": {"recall": 0.05}}}))
                if seed == 0:
                    curve = [{"step": s, "recall": r} for s, r in ((0, 0.1), (5, 0.4), (10, 0.7))]
                    (folder / "attacks" / "relearn.json").write_text(json.dumps({
                        "family": "lm", "method": "NPO", "headline": "recall", "label": "relearn recall",
                        "models": {"NPO": {"recall": 0.7}, "retrain": {"recall": 0.3}},
                        "curves": {"NPO": curve, "retrain": [{"step": 0, "recall": 0.0}, {"step": 10, "recall": 0.3}]},
                        "config": {"data": "forget", "lr": 1e-4}}))
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
        # a later request starts from the earlier one's export: still the same task (the profiles world)
        later = {"model": str(out / "cells" / "earlier" / "export"), "forgotten_before": "forget05"}
        key = _record(out, "sustainability", "NPO", 0, request=request, target="forget10",
                      config=later if request > 1 else None)
        _run_folder(out, key, lm_metrics("NPO", 0.4 / request, 0.6 - 0.03 * request, 0.1))
    _record(out, "sustainability", "NPO", 1, "failed", OOM, request=1, target="forget10")
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
                     "note": "no candidate met the rule's constraints; the best score among all was taken",
                     "candidates": [{"params": {"train.lr": 3e-5}, "cell": "dddd", "score": 0.09, "eligible": True,
                                     "status": "done"}]}}))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The bench folder and its leaderboard's tables (no figure: the tests of numbers stay fast)."""
    from obliviate.bench.leaderboard import write_leaderboard

    out = make_bench(tmp_path_factory.mktemp("lb"))
    paths = write_leaderboard(out, figures=False)
    return out, paths


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The same with every figure, as `obliviate bench` writes it, here through `obliviate report OUT`."""
    from typer.testing import CliRunner

    from obliviate.cli import app

    out = make_bench(tmp_path_factory.mktemp("lb-drawn"))
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    return out, [Path(line.removeprefix("wrote ")) for line in r.output.splitlines() if line.startswith("wrote ")]


def _md_rows(md: str, title: str) -> list[list[str]]:
    """The rows of the first table under the heading `title` (cells split at unescaped '|')."""
    rows = []
    for line in md.split(f"# {title}\n", 1)[1].splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif rows:
            break
    return rows


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
    assert "Fewer than 3 seeds done for GradDiff:" in md
    html = (bench[0] / "leaderboard.html").read_text()
    assert "class='text failed'" in html and REASON in html
    assert f"failed (seed 1: {OOM.replace('|', '[PIPE]')})".replace("[PIPE]", "\\|") in md  # sustainability


def test_bar_met_on_k_of_n_seeds(bench):
    rows = _md_rows((bench[0] / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")
    header = rows[0]
    bar = header.index("meets the bar")
    # NPO: fq >= 0.05 on all 3 seeds, utility >= 0.9 x 0.64 = 0.576 on all 3; GradDiff: fq fails seed 0, mu fails seed 1
    assert next(r for r in rows if r[1] == "NPO")[bar] == "3 of 3 seeds"
    assert next(r for r in rows if r[1] == "GradDiff")[bar] == "0 of 2 seeds"


def test_the_rule_is_read_in_each_shape_a_spec_or_selection_json_writes_it():
    from obliviate.bench.leaderboard import Bar, parse_rule

    want = ("forget_quality", [Bar("utility_ratio", ">=", 0.9, False), Bar("ira", ">=", 0.9, True)])
    assert parse_rule({"maximize": "forget_quality", "constraints": ["utility_ratio >= 0.9", "ira >= 0.9 * original"]},
                      "lm") == (want[0], want[1][:1])  # ira is not a language-model metric
    assert parse_rule({"maximize": "ua", "constraints": ["ira >= 0.9 * original"]}, "t2i") == ("ua", want[1][1:])
    assert parse_rule("the highest forget_quality on the validation target among the settings with utility_ratio "
                      "at least 0.9", "lm")[0] == "forget_quality"
    row = {"model_utility": 0.55, "original": {"model_utility": 0.64}}
    assert Bar("model_utility", ">=", 0.9, True).met(row) is False  # 0.55 < 0.576
    assert Bar("model_utility", ">=", 0.85, True).met(row) is True


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


def test_each_family_ranks_by_its_own_rule_and_shows_its_image_grid(bench):
    md = (bench[0] / "leaderboard.md").read_text()
    rows = _md_rows(md, "the canvas world, t2i: forgetting striped")
    assert rows[0][4] == "UA ↑" and "forget quality ↑" not in rows[0]
    esd = next(r for r in rows if r[1] == "ESD-x")
    assert esd[0] == "1" and esd[4] == "85.0% ± 7.1%"  # ranked by UA: the language-model rule is not its rule
    assert "meets the bar" not in rows[0]


def test_robustness_over_seeds(bench):
    md = (bench[0] / "leaderboard.md").read_text()
    rows = _md_rows(md, "Robustness: what the attacks recover (mean ± std over seeds; lower is safer)")
    assert rows[0] == ["model", "paraphrase recall", "relearn recall"]
    npo = next(r for r in rows if r[0] == "NPO")
    assert npo[1] == f"{np.mean(PARAPHRASE):.1%} ± {np.std(PARAPHRASE, ddof=1):.1%}" and npo[2] == "70.0%"
    assert next(r for r in rows if r[0] == "retrain")[1:] == ["5.0%", "30.0%"]
    assert next(r for r in rows if r[0] == "original")[1:] == ["90.0%", "–"]


def test_the_chosen_settings_their_margin_and_the_runners_up(bench):
    rows = _md_rows((bench[0] / "leaderboard.md").read_text(), "Settings chosen on the validation target")
    npo = next(r for r in rows if r[0] == "NPO")
    assert npo[1:4] == ["lr=1e-05", "0.31", "0.07"]
    assert "lr=3e-05: 0.24" in npo[4] and "lr=0.0001: failed" in npo[4]
    assert next(r for r in rows if r[0] == "GradDiff")[3] == "–"  # no runner-up, no margin
    md = (bench[0] / "leaderboard.md").read_text()
    assert "- GradDiff: no candidate met the rule's constraints" in md


def test_scalability_and_sustainability_tables(bench):
    md = (bench[0] / "leaderboard.md").read_text()
    rows = _md_rows(md, "Scalability: forget sets of growing size")
    assert rows[0][1:] == ["1", "5", "10"]
    npo = next(r for r in rows if r[0].startswith("NPO"))
    assert npo[1] == f"{np.mean([0.5, 0.51]):.3g} ± {np.std([0.5, 0.51], ddof=1):.3g}"
    rows = _md_rows(md, "Sustainability: sequential deletion requests")
    npo = next(r for r in rows if r[0].startswith("NPO"))
    floor = "noise floor: retrain seed >= 1 vs seed 0"
    # one NPO row across the chain; the retrain's forget quality against itself is no row, its utility is
    assert [r[0] for r in rows] == ["forget quality ↑ / deletion request", "NPO", floor]
    utility = md.split("| model utility ↑ / deletion request |")[1]
    assert "| retrain reference of each request | 0.620 | 0.620 | 0.620 |" in utility
    assert npo[1].startswith("0.4") and f"failed (seed 1: {OOM})" in npo[1] and npo[3].startswith("0.133")
    assert len(npo) == 4


def test_published_evaluations_are_labelled_rows(tmp_path):
    from obliviate.bench.leaderboard import write_leaderboard

    out = make_bench(tmp_path)
    openunlearning = tmp_path / "TOFU_EVAL.json"  # OpenUnlearning's shape: {metric: {"agg_value": ...}}
    openunlearning.write_text(json.dumps({"forget_quality": {"agg_value": 0.0123},
                                          "model_utility": {"agg_value": 0.591},
                                          "forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {}}}))
    write_leaderboard(out, published={"OpenUnlearning NPO (Llama-3.2-1B)": openunlearning}, figures=False)
    rows = _md_rows((out / "leaderboard.md").read_text(), "the profiles world, lm: forgetting forget10")
    header = rows[0]
    published = next(r for r in rows if r[1] == "published: OpenUnlearning NPO (Llama-3.2-1B)")
    assert published[header.index("forget quality ↑")] == "0.0123" and published[0] == ""  # not ranked
    assert published[header.index("model utility ↑")] == "0.591"
    assert rows[-1][1].startswith("original") and rows[-2] == published
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    from obliviate.errors import ObliviateError
    with pytest.raises(ObliviateError, match="bad.json: no aggregate"):
        write_leaderboard(out, published={"x": bad}, figures=False)


def test_a_published_per_item_log_is_scored_against_the_tasks_retrain_evaluation(tmp_path):
    """TOFU's eval_log_forget.json holds per-item losses, no forget quality: the leaderboard scores its truth ratios
    against the retrain evaluation the task's runs use (retrain_eval), with the same KS test."""
    from scipy.stats import ks_2samp

    from obliviate.bench.leaderboard import board, read_bench

    out = make_bench(tmp_path)
    retrain = tmp_path / "retain_TOFU_EVAL.json"  # OpenUnlearning's orientation: false/true = 1 / R
    ours = [0.5, 0.8, 1.1, 1.3, 0.9, 0.7]
    retrain.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {
        str(i): {"score": 1 / r} for i, r in enumerate(ours)}}}))
    for path in (out / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        record["config"]["retrain_eval"] = str(retrain)
        path.write_text(json.dumps(record))
    para = [2.0, 2.2, 1.9, 2.5, 2.1, 2.4]
    pert = [[2.1, 2.3], [2.0, 2.6], [2.2, 2.2], [2.4, 2.9], [2.0, 2.3], [2.8, 2.6]]
    log = tmp_path / "eval_log_forget.json"
    log.write_text(json.dumps({"avg_paraphrased_loss": {str(i): p for i, p in enumerate(para)},
                               "average_perturb_loss": {str(i): q for i, q in enumerate(pert)}}))
    b = board(read_bench(out), "the profiles world", "lm", "forget10", published={"TOFU's grad_ascent": log})
    line = next(ln for ln in b.lines if ln.label == "published: TOFU's grad_ascent")
    theirs = [np.exp(np.mean(q) - p) for p, q in zip(para, pert)]
    assert line.stats["forget_quality"].mean == pytest.approx(ks_2samp(theirs, ours).pvalue)
    assert line.rank is None and line.seeds == "as published"


def test_not_a_bench_folder_or_a_bad_cell_record_is_one_line(tmp_path):
    from obliviate.bench.leaderboard import write_leaderboard
    from obliviate.errors import ObliviateError

    with pytest.raises(ObliviateError, match="not a bench folder"):
        write_leaderboard(tmp_path)
    out = make_bench(tmp_path)
    cell = next((out / "cells").glob("*.json"))
    record = json.loads(cell.read_text())
    del record["status"]
    cell.write_text(json.dumps(record))
    with pytest.raises(ObliviateError, match=f"{cell.name}: cell record lacks the key 'status'"):
        write_leaderboard(out, figures=False)
    assert not (out / "leaderboard.md").exists()


def test_a_done_cell_whose_run_folder_is_unreadable_shows_as_failed(tmp_path):
    from obliviate.bench.leaderboard import board, read_bench

    out = make_bench(tmp_path)
    npo = _run_folders(out, "NPO")
    metrics = json.loads((npo[0] / "metrics.json").read_text())
    (npo[0] / "metrics.json").write_text(json.dumps({**metrics, "forget_quality": "high"}))
    (npo[1] / "metrics.json").unlink()
    b = board(read_bench(out), "the profiles world", "lm", "forget10")
    line = next(ln for ln in b.lines if ln.label == "NPO")
    assert line.seeds.startswith("1 of 3 seeds (failed") and "key 'forget_quality'" in line.seeds
    assert "no metrics.json" in line.seeds
    assert line.stats["forget_quality"].n == 1 and line.stats["forget_quality"].mean == LM_CELLS["NPO"][2][0]


def test_a_failed_noise_floor_is_a_failed_line_naming_its_retrain_seed(tmp_path):
    from obliviate.bench.leaderboard import board, read_bench

    out = make_bench(tmp_path)
    _record(out, "reference", "Retrain", None, "failed", "out of memory", config={"method_args": {"seed": 3}})
    b = board(read_bench(out), "the profiles world", "lm", "forget10")
    failed = [ln for ln in b.lines if ln.kind == "floor" and ln.failed]
    assert len(failed) == 1 and failed[0].failed == "failed (seed 3: out of memory)"
    assert [ln.kind for ln in b.lines[:3]] == ["retrain", "floor", "floor"]  # the measured floor stays beside it


def _run_folders(out: Path, method: str) -> list[Path]:
    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return [out / "cells" / r["run"] for r in sorted(records, key=lambda r: r["seed"]) if r["method"] == method
            and r["kind"] == "reported" and r["status"] == "done"]


def test_report_compares_run_folders_side_by_side(bench, tmp_path):
    from typer.testing import CliRunner

    from obliviate.cli import app

    npo, graddiff = _run_folders(bench[0], "NPO")[0], _run_folders(bench[0], "GradDiff")[0]
    page = tmp_path / "compare.html"
    r = CliRunner().invoke(app, ["report", str(npo), str(graddiff), "--out", str(page), "--no-figures"])
    assert r.exit_code == 0, r.output
    text = page.read_text()
    assert f"{npo.name}: NPO" in text and f"{graddiff.name}: GradDiff" in text  # both runs in one scorecard
    assert f"{npo.name}: retrain" in text and f"{graddiff.name}: original" in text
    retrain_row = text.split(f"<td>{npo.name}: retrain</td>")[1].split("</tr>")[0]
    assert "<td>1</td>" not in retrain_row and "<td>–</td>" in retrain_row  # no forget quality 1 by definition
    assert "leaves out what it would score against itself (forget_quality" in text
    assert r.output.strip() == f"wrote {page}"
    r = CliRunner().invoke(app, ["report", str(npo), str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no such folder" in r.output


def test_report_puts_bench_folders_side_by_side(bench, tmp_path):
    from obliviate.bench.leaderboard import write_comparison

    other = make_bench(tmp_path)  # a second grid, its NPO worse
    for path in (other / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        if record["method"] == "NPO" and record["status"] == "done" and record["kind"] == "reported":
            metrics = json.loads((other / "cells" / record["run"] / "metrics.json").read_text())
            metrics["forget_quality"] = 0.001
            (other / "cells" / record["run"] / "metrics.json").write_text(json.dumps(metrics))
    page = write_comparison([bench[0], other, _run_folders(bench[0], "NPO")[0]], tmp_path / "both.html",
                            figures=False)
    text = page.read_text()
    columns = text.split("<div class='side'>")[1].split("<div>")[1:]
    assert len(columns) == 2 and all("the profiles world, lm: forgetting forget10" in c for c in columns)
    assert "0.3 ± 0.1" in columns[0] and "0.001 ± 0" in columns[1]
    assert ": NPO</td>" in text.split("<div class='side'>")[0]  # the run folder in the scorecard above


@pytest.mark.slow  # draws every figure: about 10 s on 2 shared cores
def test_the_leaderboard_page_renders_whole_in_chromium(drawn):
    from browser import render

    out, paths = drawn
    grid = out / "figures" / "grid-the-canvas-world-t2i-striped-esd-x.png"
    assert {p.name for p in paths} >= {"leaderboard.md", "leaderboard.html", "tradeoff-the-profiles-world-lm-"
                                       "forget10.png", "evaluations-the-profiles-world-lm-forget10.png",
                                       "curves-the-profiles-world-lm-forget10.png", "scalability.png",
                                       "sustainability.png", grid.name}
    md = (out / "leaderboard.md").read_text()
    assert all(f"](figures/{p.name})" in md for p in paths if p.suffix == ".png")
    page = out / "leaderboard.html"
    shots = Path(os.environ.get("OBLIVIATE_SCREENSHOTS") or page.parent)
    text = page.read_text()
    seen = render(page, screenshot=shots / "leaderboard-page.png")
    assert seen["images"] == text.count("<img") >= 8 and seen["broken"] == [], seen
    assert seen["tables"] == text.count("<table") >= 6 and seen["empty_tables"] == 0, seen
    assert seen["console"] == []
    assert seen["wrapped"] == [], "numbers wrap onto a second line"
    assert "src='figures/" not in text and "src='/" not in text  # the page stands alone: its pictures inline
    assert (shots / "leaderboard-page.png").stat().st_size > 10_000


@pytest.mark.slow  # draws the plots: about 5 s on 2 shared cores
def test_the_comparison_page_renders_whole_in_chromium(drawn, tmp_path):
    from typer.testing import CliRunner

    from browser import render
    from obliviate.cli import app

    page = tmp_path / "compare.html"
    runs = [*_run_folders(drawn[0], "NPO")[:1], *_run_folders(drawn[0], "GradDiff")[:1]]
    r = CliRunner().invoke(app, ["report", *map(str, runs), str(drawn[0]), "--out", str(page)])
    assert r.exit_code == 0, r.output
    text = page.read_text()
    assert "alt='forgetting against utility'" in text and "alt='unlearning curves'" in text
    assert "alt='forget-utility trade-off'" in text  # the bench's own, in its column
    shots = Path(os.environ.get("OBLIVIATE_SCREENSHOTS") or tmp_path)
    seen = render(page, screenshot=shots / "comparison-page.png")
    assert seen["images"] == text.count("<img") >= 6 and seen["broken"] == [], seen
    assert seen["tables"] == text.count("<table") and seen["empty_tables"] == 0, seen
    assert seen["console"] == [] and seen["wrapped"] == [], seen


def test_the_trade_off_plot_marks_the_retrain_point_and_the_noise_floor(bench):
    from obliviate.bench.leaderboard import board, read_bench, tradeoff_figure
    from obliviate.bench.report import _matplotlib

    b = board(read_bench(bench[0]), "the profiles world", "lm", "forget10")
    fig = tradeoff_figure(b)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2  # NPO and GradDiff; RMU failed: no point
    npo_x, npo_y = bars[0].lines[0].get_data()
    assert npo_x[0] == pytest.approx(np.mean([s[1] for s in LM_CELLS["NPO"]]))
    assert npo_y[0] == pytest.approx(np.mean([s[0] for s in LM_CELLS["NPO"]]))
    floor = [line for line in ax.lines if "noise floor" in str(line.get_label())]
    assert floor and floor[0].get_ydata()[0] == pytest.approx(FLOOR["forget_quality"] + 0.01)
    assert ax.get_ylabel().startswith("forget quality ↑") and ax.get_xlabel().startswith("model utility ↑")
    assert any(t.get_text() == "retrain" for t in ax.texts)  # the retrain point, labelled
    _matplotlib().close(fig)


@pytest.mark.slow  # two real runs on a tiny model: about 30 s on 2 shared cores
def test_a_leaderboard_from_real_tiny_runs(tmp_path, monkeypatch, tiny_lm_dir):
    """Two seeds of a real run on a tiny user model, placed as the bench places cells: the leaderboard reads their
    metrics.json as written (the retrain and original rows, the aggregates) and history.json."""
    import shutil

    from conftest import tiny_items

    from obliviate.bench.leaderboard import board, read_bench, write_leaderboard
    from obliviate.config import build_config
    from obliviate.runners import run

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    items = tiny_items()
    forget, retain = tmp_path / "forget.json", tmp_path / "retain.json"
    for path, part in ((forget, items[:2]), (retain, items[2:])):
        path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                            "paraphrased_answer": i.paraphrased_answer,
                                            "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in part))
    out = tmp_path / "bench"
    (out / "cells").mkdir(parents=True)
    (out / "bench.json").write_text(json.dumps({"name": "real", "family": "lm", "spec": {}}))
    folders = []
    for seed in (0, 1):
        settings = {"method": "GradDiff", "model": str(tiny_lm_dir), "output_dir": str(tmp_path / "runs"),
                    "forget_file": str(forget), "retain_file": str(retain), "retrain_model": str(tiny_lm_dir),
                    "name": f"seed{seed}", "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seed": seed},
                    "eval": {"batch_size": 8}}
        folder = run(build_config(settings), log=lambda *_: None)
        key = f"{seed:016x}"
        shutil.copytree(folder, out / "cells" / key)
        config = json.loads((folder / "config.json").read_text())
        (out / "cells" / f"{key}.json").write_text(json.dumps({
            "key": key, "kind": "reported", "method": "GradDiff", "params": {"train.lr": 1e-3}, "target": "forget",
            "seed": seed, "request": None, "size": None, "status": "done", "reason": None, "seconds": 1.0,
            "host": "here", "run": key, "config": config}))
        folders.append(out / "cells" / key)
    write_leaderboard(out, figures=False)
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    b = board(read_bench(out), f"your model {tiny_lm_dir.name}", "lm", "forget")
    graddiff = next(ln for ln in b.lines if ln.label == "GradDiff")
    for name in ("forget_quality", "model_utility", "forget_accuracy"):
        values = np.array([m[name] for m in metrics])
        assert graddiff.stats[name].mean == pytest.approx(values.mean())
        assert graddiff.stats[name].std == pytest.approx(values.std(ddof=1))
    assert b.lines[0].kind == "retrain" and b.lines[-1].kind == "original"
    assert b.lines[-1].stats["model_utility"].mean == pytest.approx(metrics[0]["original"]["model_utility"])
    assert b.lines[0].stats["forget_quality"] is None  # 1 by definition in metrics.json; no floor was run
    md = (out / "leaderboard.md").read_text()
    assert "not measured" in md and "| 1 | GradDiff | lr=0.001 | 2 seeds |" in md


def test_an_unchanged_bench_keeps_its_leaderboard_and_a_changed_cell_rewrites_it(tmp_path):
    """A resumed grid whose cells were all done must finish in seconds: the leaderboard is not drawn again."""
    from obliviate.bench.leaderboard import write_leaderboard

    out = make_bench(tmp_path)
    first = write_leaderboard(out, figures=False)
    page = (out / "leaderboard.html").read_text()
    os.utime(out / "leaderboard.md", ns=(1, 1))  # a rewrite would change this
    assert write_leaderboard(out, figures=False) == first and (out / "leaderboard.md").stat().st_mtime_ns == 1
    npo = _run_folders(out, "NPO")[0]
    metrics = json.loads((npo / "metrics.json").read_text())
    (npo / "metrics.json").write_text(json.dumps({**metrics, "forget_quality": 0.9}))
    write_leaderboard(out, figures=False)
    assert (out / "leaderboard.md").stat().st_mtime_ns != 1 and (out / "leaderboard.html").read_text() != page


@pytest.mark.parametrize("goal, chosen, order", [("maximize", 3, ["lr=2", "lr=1"]), ("minimize", 1, ["lr=2", "lr=3"])])
def test_runners_up_are_listed_best_first_by_the_rules_goal(goal, chosen, order):
    from obliviate.bench.leaderboard import Bench, selection_rows

    candidates = [{"params": {"train.lr": lr}, "cell": f"c{lr}", "score": score, "eligible": True, "status": "done"}
                  for lr, score in ((1, 0.1), (2, 0.2), (3, 0.5))]
    # another step of the winner's own cell is not a runner-up
    candidates.append({"params": {"train.lr": chosen}, "cell": f"c{chosen}", "score": 0.3, "eligible": True,
                       "status": "done"})
    selection = {"NPO": {"rule": "r", "chosen": {"train.lr": chosen}, "chosen_cell": f"c{chosen}", "score": 0.1,
                         "margin": 0.1, "candidates": candidates}}
    bench = Bench(Path("."), {"spec": {"select": {goal: "forget_quality"}}}, [], selection)
    runners = selection_rows(bench)[0][4]
    assert [part.split(":")[0] for part in runners.split("; ")] == order


def test_a_rule_that_minimises_ranks_lowest_first_even_for_a_metric_declared_without_a_direction():
    """The vision-language forget accuracy is declared without a direction; the portraits spec minimises it, and its
    leaderboard ranked the methods in name order until the rule's own direction was read."""
    from obliviate.bench.leaderboard import rule_direction, sort_key
    from obliviate.registry import METRICS

    assert METRICS["forget_classification_image"].better is None
    assert rule_direction({"minimize": "forget_classification_image"}) == "lower"
    assert rule_direction({"maximize": "ua"}) == "higher"
    assert rule_direction("the lowest forget_quality among ...") == "lower"
    assert rule_direction("best forget_quality") is None and rule_direction(None) is None
    values = {"GradDiff": 0.73, "NPO": 0.13, "SimNPO": 0.37, "none": None}
    assert sorted(values, key=lambda k: sort_key("lower", values[k])) == ["NPO", "SimNPO", "GradDiff", "none"]
    assert sorted(values, key=lambda k: sort_key("higher", values[k])) == ["GradDiff", "SimNPO", "NPO", "none"]


def test_a_method_within_the_bar_ranks_above_a_higher_score_that_breaks_it(tmp_path):
    """The canvas style board ranked over-forgetting methods (UA 100 %, IRA 20-40 %) above the ones that erase within
    the bar: the rule maximises UA among settings that keep IRA and CRA, so the bar's share of seeds ranks first."""
    from obliviate.bench.leaderboard import board, read_bench

    out = tmp_path / "bench"
    out.mkdir()
    spec = {"name": "t", "select": {"maximize": "ua", "constraints": ["ira >= 0.9 * original",
                                                                     "cra >= 0.9 * original"]}}
    (out / "bench.json").write_text(json.dumps({"name": "t", "family": "t2i", "spec": spec,
                                                "created": "2026-12-03T00:00:00", "obliviate_version": "0.1.0"}))
    # (ua, ira) per seed: Over erases all but breaks IRA; Half keeps the bar on one seed of two; Within on both
    cells = {"Over": [(1.0, 0.4), (1.0, 0.3)], "Half": [(0.98, 0.95), (1.0, 0.5)], "Within": [(0.9, 0.95), (0.8, 0.94)],
             "AlsoWithin": [(0.86, 0.95), (0.84, 0.95)]}
    for method, seeds in cells.items():
        for seed, (ua, ira) in enumerate(seeds):
            key = _record(out, "reported", method, seed, target="striped", family="t2i")
            _run_folder(out, key, {"method": method, "concept": "striped", "status": "completed", "ua": ua,
                                   "ira": ira, "cra": 0.95, "original_ua": 0.0, "original_ira": 1.0,
                                   "original_cra": 1.0, "retrain_ua": 1.0, "retrain_ira": 0.95, "retrain_cra": 0.95})
    key = _record(out, "reference", "Retrain", 1, target="striped", family="t2i", config={"method_args": {"seed": 1}})
    _run_folder(out, key, {"method": "Retrain", "concept": "striped", "status": "completed", "ua": 0.8, "ira": 0.95,
                           "cra": 0.95})  # a second retrain model: a noise floor of 0.2 in UA
    b = board(read_bench(out), "the canvas world", "t2i", "striped")
    assert b.floor_gap["ua"] == pytest.approx(0.2)
    ranked = [(ln.label, ln.rank, ln.bar) for ln in b.lines if ln.kind == "method"]
    assert ranked == [("Within", 1, "2 of 2 seeds"), ("AlsoWithin", 2, "2 of 2 seeds"), ("Half", 3, "1 of 2 seeds"),
                      ("Over", 4, "0 of 2 seeds")]
    # within the floor of each other: only the pair the bar does not order is called a tie of the score
    assert b.ties == ["Within and AlsoWithin differ in UA ↑ by less than the noise floor (20.0%): their order is "
                      "not evidence"]


@pytest.mark.parametrize("retrain_retain, weak", [(0.48, True), (0.9, False)])
def test_a_weak_retrain_reference_is_named_under_its_board_and_its_selection(retrain_retain, weak, tmp_path):
    """A rebuilt MoE world's val10 reference knew 48 % of the retain answers against the original's 95 %, and every
    validation score was taken against it with nothing on the report to say so: the board of a target and the
    selection now name such a reference (more than 10 points below the original); one 5 points below is not named."""
    from obliviate.bench.leaderboard import _legend, board, read_bench, selection_notes

    out = tmp_path / "bench"
    out.mkdir()
    spec = {"name": "t", "select": {"maximize": "forget_quality", "constraints": ["utility_ratio >= 0.9"]}}
    (out / "bench.json").write_text(json.dumps({"name": "t", "family": "lm", "spec": spec,
                                                "created": "2026-12-04T00:00:00", "obliviate_version": "0.1.0"}))
    for kind, target in (("validation", "val10"), ("reported", "forget10")):
        key = _record(out, kind, "NPO", 0, target=target)
        metrics = lm_metrics("NPO", 0.3, 0.6, 0.1)
        metrics["original"]["retain_accuracy"], metrics["retrain"]["retain_accuracy"] = 0.95, retrain_retain
        _run_folder(out, key, metrics)
    selection = {"NPO": {"rule": "r", "chosen": {}, "score": 0.3, "candidates": []}}
    (out / "selection.json").write_text(json.dumps(selection))
    bench = read_bench(out)
    named = [n for n in _legend(board(bench, "the profiles world", "lm", "forget10")) if "weak reference" in n]
    chosen = [n for n in selection_notes(bench) if "weak reference" in n]
    if weak:
        assert named == ["The retrain reference of forget10 knows 48.0% of the retain answers against the original's "
                         "95.0%: a weak reference (its training fell short); the scores against it (forget quality, "
                         "PrivLeak, the noise floor's marks) are not evidence."]
        assert len(chosen) == 1 and chosen[0].startswith("The retrain reference of val10 knows 48.0%")
    else:
        assert named == chosen == []


def test_the_legend_names_the_retrain_lines_measured_metrics_in_column_order_in_every_process(bench):
    """The retrain line's measured metrics were named in a set's order, which changes with the process's hash seed:
    a re-render of an unchanged bench rewrote its leaderboard. Each of three hash seeds gives the column order."""
    import subprocess
    import sys

    show = ("import sys; from obliviate.bench.leaderboard import read_bench, board, _legend; "
            "b = board(read_bench(__import__('pathlib').Path(sys.argv[1])), 'the profiles world', 'lm', 'forget10'); "
            "print(next(n for n in _legend(b) if n.startswith(\"The retrain line's\"))); "
            "print('|'.join(m.column_title for m in b.columns))")
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", show, str(bench[0])], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.splitlines()
        named = out[0].split("The retrain line's ")[1].split(": what")[0].split(", ")
        assert len(named) >= 2 and named == [t for t in out[1].split("|") if t in named], (seed, out)
