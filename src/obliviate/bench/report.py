"""HTML reports: a self-contained page (inline PNG plots) for a run folder or a demo folder."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from obliviate.bench.scorecard import cell, columns, run_rows, warnings
from obliviate.errors import ObliviateError
from obliviate.runs import atomic_write

# numbers never wrap (1.02e-13 stays on one line); free text (class "text": prompts, answers) wraps, left-aligned
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td{white-space:nowrap}td.text{white-space:normal;text-align:left;min-width:12em}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:90%}
img{max-width:100%}img.grid{image-rendering:pixelated}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _matplotlib():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def place_labels(ax, points: list[tuple[float, float]], labels: list[str]) -> list:
    """Annotate each point with its label where it overlaps no other label and no marker: candidate offsets around
    the point, nearest first, each tried against the boxes already placed (in display coordinates, as drawn).
    Returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the axes' limits and scales as drawn, so data maps to the display for real
    markers = [ax.transData.transform(p) for p in points]
    placed, annotations = [], []
    offsets = [(dx * r, dy * r) for r in (1, 2, 3, 4) for dx, dy in
               ((6, 4), (6, -12), (-6, 4), (-6, -12), (0, 10), (0, -18), (12, -4), (-12, -4))]
    for (x, y), label in zip(points, labels):
        for k, (dx, dy) in enumerate(offsets):
            left = dx < 0
            a = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                            ha="right" if left else "left",
                            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if k >= 8 else None)
            box = a.get_window_extent(renderer).expanded(1.05, 1.15)
            clear = not any(box.overlaps(b) for b in placed) and not any(
                box.contains(mx, my) for mx, my in markers)
            if clear or k == len(offsets) - 1:
                placed.append(box)
                annotations.append(a)
                break
            a.remove()
    return annotations


def tradeoff_plot(rows: dict[str, dict]) -> str | None:
    """Forget quality (log scale) against model utility, one point per model, each labelled where no other label
    is."""
    pts = {n: r for n, r in rows.items() if r.get("forget_quality") is not None and r.get("model_utility") is not None}
    if not pts:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = plt.get_cmap("tab10")
    xy = [(r["model_utility"], max(r["forget_quality"], 1e-30)) for r in pts.values()]
    for i, (name, (x, y)) in enumerate(zip(pts, xy)):
        ax.scatter(x, y, s=60, color=colours(i % 10), zorder=3)
    ax.set_yscale("log")
    ax.axhline(0.05, ls="--", c="grey", lw=0.8, label="forget quality 0.05")
    original = rows.get("original", {}).get("model_utility")
    if original:
        ax.axvline(0.9 * original, ls=":", c="grey", lw=0.8, label="0.9 x original utility")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_xlabel("model utility (TOFU harmonic mean) →")
    ax.set_ylabel("forget quality (KS p-value vs retrain) →")
    ax.set_title("Forgetting vs utility")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    place_labels(ax, xy, list(pts))
    return _png(fig)


# what a history row logs of the forget term and of the retain term, by family and method, in order of preference
FORGET_CURVE = ("forget_nll", "forget_mse", "esd_mse", "ablation_mse", "loss")
RETAIN_CURVE = ("retain_nll", "retain_mse", "retain_kl", "retain_dm", "retain_act_dist")
CURVE_LABELS = {"forget_nll": "forget NLL per answer token", "retain_nll": "retain NLL per answer token",
                "loss": "total loss", "retain_kl": "retain KL to the original", "retain_dm": "retain term",
                "retain_act_dist": "retain activation distance"}


def _curve_key(history: list[dict], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if any(x.get(k) is not None for x in history)), None)


def curves_plot(histories: dict[str, list[dict]], title: str = "Unlearning curves") -> str | None:
    fig = curves_figure(histories, title)
    return None if fig is None else _png(fig)


def curves_figure(histories: dict[str, list[dict]], title: str = "Unlearning curves"):
    """One family's and world's unlearning curves: the forget term (left) and the retain term (right, which is
    what to watch for collapse) per method, a colour per method shared by both panels."""
    # closed-form edits (UCE) log no loss: no curve to draw
    histories = {k: h for k, h in histories.items() if h and _curve_key(h, FORGET_CURVE)}
    if not histories:
        return None
    plt = _matplotlib()
    with_retain = any(_curve_key(h, RETAIN_CURVE) for h in histories.values())
    fig, axes = plt.subplots(1, 2 if with_retain else 1, figsize=(11 if with_retain else 6.5, 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for panel, (ax, keys) in enumerate(zip(axes[0], (FORGET_CURVE, RETAIN_CURVE))):
        shown = set()
        for i, (name, h) in enumerate(histories.items()):
            key = _curve_key(h, keys)
            if key is None:
                continue
            shown.add(key)
            rows = [x for x in h if x.get(key) is not None]
            ax.plot([x["step"] for x in rows], [x[key] for x in rows], color=colours(i % 10), lw=1.2, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(" / ".join(CURVE_LABELS.get(k, k.replace("_", " ")) for k in sorted(shown)))
        ax.set_title(("forget term" if panel == 0 else "retain term (watch it for collapse)"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def relearn_figure(results: dict[str, dict]):
    """Recall of the measured forget items after each relearning step: one line per method's unlearned model, the
    retrain reference (dashed: it learns from scratch, so the gap above it is hidden knowledge), the original
    (dotted). `results`: {method: relearn result}."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    references: dict[str, list[dict]] = {}
    first = next(iter(results.values()))
    key = first.get("headline", "recall")  # recall (language models); a vision-language run's accuracy
    for method, result in results.items():
        for model, curve in result["curves"].items():
            steps, recall = [p["step"] for p in curve], [_or_nan(p[key]) for p in curve]
            if model == result["method"]:
                ax.plot(steps, recall, marker="o", ms=3, label=method)
            else:
                references.setdefault(model, curve)
    for model, curve in references.items():
        ax.plot([p["step"] for p in curve], [_or_nan(p[key]) for p in curve], ls="--" if model == "retrain" else ":",
                c="black" if model == "retrain" else "grey", label=f"{model} (same fine-tuning)")
    ax.set_xlabel(f"relearning step (data: {first['config']['data']}, lr {first['config']['lr']:g})")
    what = "recall" if key == "recall" else key.replace("_", " ")
    ax.set_ylabel(f"forget {what} ({first.get('measured', 'forget questions')})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Relearning: does the forgotten come back?")
    return fig


def _or_nan(value) -> float:
    """A curve's point, NaN where the measured items carry no such score (a gap in the line)."""
    return float("nan") if value is None else value


def save_relearn_plot(path: Path, results: dict[str, dict]) -> None:
    """The relearning curves as a PNG file (written atomically)."""
    buf = io.BytesIO()
    fig = relearn_figure(results)
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _matplotlib().close(fig)
    atomic_write(path, buf.getvalue())


# what a robustness cell means, by the attacks' family
ROBUSTNESS_CAPTIONS = {
    "lm": "Each cell: the attack's headline on the forget set (recall: share of forget facts in the answers; "
          "accuracy: share chosen or read right), lower is safer. The retrain row is the floor: a model that never "
          "saw the forget set, attacked the same way.",
    "mllm": "Each cell: the attack's headline on the forget set, MLLMU-Bench's multiple-choice accuracy with the "
            "picture (relearning: after fine-tuning, on forget people it did not fine-tune on; in-context: with the "
            "person's profile in the prompt), lower is safer. The retrain row is the floor: a model that never saw "
            "the forget people, attacked the same way.",
    "t2i": "Each cell: the attack's success rate (ASR) on the forget prompts, the share whose picture shows the "
           "erased concept with or without the attack, as the detector reads it; lower is safer. The retrain row, "
           "where there is one, is the floor: a pipeline that never learnt the concept, attacked the same way.",
}


def robustness_html(results: dict[str, dict[str, dict]]) -> str:
    """{method: {attack: result}} as a table: attacks as columns (their headline), methods and references as rows,
    with the caption of the attacks' family."""
    from obliviate.bench.scorecard import robustness_rows

    if not results:
        return ""
    labels, rows = robustness_rows(results)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels.values())
    body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{cell(r, a, '{:.1%}')}</td>"
                                                                     for a in labels) + "</tr>"
                   for m, r in rows.items())
    relearn = {m: r[a] for m, r in results.items() for a in r if "curves" in r[a]}
    plot = f"<p><img alt='relearning curves' src='{_png(relearn_figure(relearn))}'></p>" if relearn else ""
    family = next((r.get("family") for by_attack in results.values() for r in by_attack.values()), "lm")
    return (f"<h2>Robustness: what the attacks recover</h2><table><tr><th>model</th>{head}</tr>{body}</table>"
            f"<p class='note'>{html.escape(ROBUSTNESS_CAPTIONS.get(family, ROBUSTNESS_CAPTIONS['lm']))}</p>" + plot)


def adversarial_prompts_html(name: str, result: dict, shown: int = 8) -> str:
    """The run's adversarial prompts under one attack: the forget prompt, what the attack made of it and whether the
    concept came back, successes first (text-to-image attacks' rows carry `adversarial_prompt`)."""
    rows = result.get("per_item", {}).get(result["method"], [])
    rows = sorted((r for r in rows if r.get("adversarial_prompt")), key=lambda r: not r.get("success"))[:shown]
    if not rows:
        return ""
    body = "".join(f"<tr><td class='text'>{html.escape(str(r.get('text', '')))}</td><td class='text'>"
                   f"{html.escape(r['adversarial_prompt'])}</td><td>{'concept back' if r.get('success') else 'held'}"
                   "</td></tr>" for r in rows)
    return (f"<h3>{html.escape(name)}: adversarial prompts</h3><table><tr><th>forget prompt</th><th>adversarial "
            f"prompt</th><th>outcome</th></tr>{body}</table>")


def read_attacks(folder: Path) -> dict[str, dict]:
    """{attack: result} of a run folder's attacks/*.json (those in the shared format)."""
    results = {}
    for path in sorted((Path(folder) / "attacks").glob("*.json")):
        result = _read(path, "attack result", keys=("models", "headline", "method"))
        if not isinstance(result["models"], dict) or not all(isinstance(m, dict) for m in result["models"].values()):
            raise ObliviateError(f"{path}: 'models' must map each model to its aggregate")
        results[path.stem] = result
    return results


def scorecard_html(rows: dict[str, dict]) -> str:
    if not rows:
        return ""
    present = [c for c in columns() if any(c[0] in r for r in rows.values())]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in present)
    body = "".join("<tr><td>" + html.escape(n) + "</td>" + "".join(
        f"<td>{cell(r, k, f)}</td>" for k, _, f in present) + "</tr>" for n, r in rows.items())
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


def page(title: str, rows: dict[str, dict], histories: dict[str, list[dict]], notes: list[str],
         grids: dict[str, str] | None = None, sections: list[str] = (),
         curves_title: str = "Unlearning curves") -> str:
    """`grids`: caption -> a PNG file (relative to the page's folder; embedded inline so the page stands alone)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", scorecard_html(rows)]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in [*warnings(rows), *notes]]
    for caption, uri in (grids or {}).items():
        parts.append(f"<h2>{html.escape(caption)}</h2><p><img class='grid' alt='{html.escape(caption)}' "
                     f"src='{uri}'></p>")
    for alt, img in (("forgetting against utility", tradeoff_plot(rows)),
                     ("unlearning curves", curves_plot(histories, curves_title))):
        if img:
            parts.append(f"<p><img alt='{alt}' src='{img}'></p>")
    parts += sections
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(folder: Path, grids: dict[str, str] | None) -> dict[str, str]:
    return {caption: "data:image/png;base64," + base64.b64encode((folder / name).read_bytes()).decode()
            for caption, name in (grids or {}).items() if (folder / name).is_file()}


def write_run_report(folder: Path, metrics: dict, history: list[dict], grids: dict[str, str] | None = None,
                     notes: list[str] | None = None) -> Path:
    """The run's page; with the run's attacks (attacks/*.json) as a robustness table, their pictures and curves."""
    folder = Path(folder)
    path = folder / "report.html"
    attacks = read_attacks(folder) if (folder / "attacks").is_dir() else {}
    sections = [robustness_html({metrics.get("method", "run"): attacks})] if attacks else []
    sections += [adversarial_prompts_html(name, result) for name, result in attacks.items()]
    grids = {**(grids or {}), **{f"under the {name} attack": f"attacks/{name}.png" for name in attacks
                                 if "curves" not in attacks[name] and (folder / "attacks" / f"{name}.png").is_file()}}
    subject = metrics.get("forget_set") or metrics.get("split") or f"concept '{metrics.get('concept')}'"
    rows = run_rows(metrics)  # the original and the retrain reference beside the unlearned model
    if "forget_classification_image" in metrics:  # vision-language: MLLMU-Bench's table too
        sections.insert(0, mllmu_table_html(rows))
    # atomically: a full disk while rewriting a finished run's page must not truncate the good one
    return atomic_write(path, page(f"obliviate run: {metrics.get('method')} on {subject}",
                                   rows, {metrics.get("method", "run"): history},
                                   [f"status: {metrics.get('status')}", *guard_note(metrics), *(notes or [])],
                                   _inline(folder, grids), sections))


def guard_note(metrics: dict) -> list[str]:
    """A generation-time guard's run: one line saying that no weight changed and how the guard was set."""
    guard = metrics.get("guard")
    if not isinstance(guard, dict):
        return []
    from obliviate.guards import LOAD_CALL
    settings = ", ".join(f"{k} {v}" for k, v in (guard.get("config") or {}).items() if v not in ("", None))
    if guard.get("family") in ("lm", "mllm"):
        return [f"{guard.get('guard')} is a generation-time guard: no weight changed; the run's answers and "
                f"likelihoods were computed through it ({settings}); an export loads with {LOAD_CALL}(folder)"]
    return [f"{guard.get('guard')} is a generation-time guard: no weight changed; the run's pictures were sampled "
            f"through it against {guard.get('concept')!r} ({settings}); an export loads with {LOAD_CALL}(folder)"]


def write_demo_report(folder: Path, summary: dict, histories: dict[str, list[dict]],
                      mllm_histories: dict[str, list[dict]] | None = None) -> Path:
    """The demo's page. `histories`: the profiles part's methods; `mllm_histories`: the portraits part's (each
    world's curves are drawn apart: their losses are not on one scale)."""
    folder = Path(folder)
    notes = summary.get("notes", [])
    path = folder / "report.html"
    title = "obliviate demo: unlearning forget10 of the profiles world" if summary["scorecard"] else "obliviate demo"
    body = page(title, summary["scorecard"], histories, notes,
                sections=[robustness_html(summary["robustness"])] if summary.get("robustness") else [],
                curves_title="Unlearning curves: the profiles world's language model")
    for section in summary.get("t2i", []):  # one section per erased concept of the canvas world
        body = body.replace("</body></html>", "") + _t2i_section(folder, section) + "</body></html>"
    if summary.get("mllm"):
        body = (body.replace("</body></html>", "") + _mllm_section(folder, summary["mllm"], mllm_histories or {})
                + "</body></html>")
    return atomic_write(path, body)


def mllmu_table_html(rows: dict[str, dict]) -> str:
    """MLLMU-Bench's table, models as columns, each cell "with the picture / as text"."""
    from obliviate.bench.scorecard import mllmu_rows

    head = "".join(f"<th>{html.escape(n)}</th>" for n in rows)
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                   for label, cells in mllmu_rows(rows))
    return f"<table><tr><th>set, task (picture / text)</th>{head}</tr>{body}</table>"


def _mllm_section(folder: Path, part: dict, histories: dict[str, list[dict]]) -> str:
    parts = [f"<h1>Unlearning {html.escape(part['split'])} from the portraits world's LLaVA (MLLMU-Bench)</h1>",
             mllmu_table_html(part["scorecard"])]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in part.get("notes", [])]
    curves = curves_plot(histories, "Unlearning curves: the portraits world's LLaVA")
    if curves:
        parts.append(f"<p><img alt='unlearning curves' src='{curves}'></p>")
    if part.get("examples"):
        parts.append("<h2>Before and after: each model asked about the portrait</h2>")
    for ex in part.get("examples", []):
        picture = _inline(folder, {ex["person"]: ex.get("picture", "")}).get(ex["person"])
        img = f"<img alt='{html.escape(ex['person'])}' src='{picture}'>" if picture else ""
        answers = "".join(f"<tr><td>{html.escape(m)}</td><td class='text'>{html.escape(a['generated'])}</td>"
                          f"<td class='text'>{html.escape(a['chosen'])}</td></tr>" for m, a in ex["answers"].items())
        parts.append(f"<h3>{html.escape(ex['person'])} ({ex['role']} person)</h3><p>{img}</p>"
                     f"<p class='note'>{html.escape(ex['question'])} True answer: {html.escape(ex['truth'])} "
                     f"(multiple choice: {ex['correct']})</p><table><tr><th>model</th><th>free answer</th>"
                     f"<th>multiple-choice answer</th></tr>{answers}</table>")
    return "\n".join(parts)


def _t2i_section(folder: Path, section: dict) -> str:
    grids = _inline(folder, {section["title"]: section["grid"]})
    parts = [f"<h1>{html.escape(section['title'])}</h1>", scorecard_html(section["scorecard"])]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in section.get("notes", [])]
    for caption, uri in grids.items():
        parts.append(f"<p><img class='grid' alt='{html.escape(caption)}' src='{uri}'></p>")
    if section.get("robustness"):
        parts.append(robustness_html(section["robustness"]))
    return "\n".join(parts)


def _read(path: Path, what: str, kind: type = dict, keys: tuple[str, ...] = ()):
    """A file of a run folder: missing, truncated or non-JSON, or not the shape the report needs, is one line naming
    the file."""
    from obliviate.data import read_json_file

    data = read_json_file(path, what)
    if not isinstance(data, kind):
        raise ObliviateError(f"{path}: {what} must be a JSON {'object' if kind is dict else 'array'}, "
                             f"got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ObliviateError(f"{path}: {what} lacks the key(s) {', '.join(missing)}")
    if kind is list:  # a history: one object per step
        bad = next((i for i, row in enumerate(data) if not isinstance(row, dict) or "step" not in row), None)
        if bad is not None:
            raise ObliviateError(f"{path}: {what} row {bad + 1} is not an object with a 'step'")
    from obliviate.bench.report_inputs import check_report_input

    check_report_input(path, what, data)  # the keys the page reads hold what it formats
    return data


def rewrite_report(folder: Path) -> Path:
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        summary = _read(folder / "summary.json", "demo summary", keys=("scorecard",))
        if not isinstance(summary["scorecard"], dict):
            raise ObliviateError(f"{folder / 'summary.json'}: 'scorecard' must be a JSON object")
        histories = {m: _read(folder / m / "history.json", "history", list)
                     for m in summary["scorecard"] if (folder / m / "history.json").is_file()}
        mllm = summary.get("mllm") or {}
        mllm_histories = {m: _read(folder / "mllm" / m / "history.json", "history", list)
                          for m in mllm.get("scorecard", {}) if (folder / "mllm" / m / "history.json").is_file()}
        return write_demo_report(folder, summary, histories, mllm_histories)
    if (folder / "metrics.json").is_file():
        metrics = _read(folder / "metrics.json", "metrics")
        history = _read(folder / "history.json", "history", list) if (folder / "history.json").is_file() else []
        grids = {caption: name for caption, name in (("image grid", "grid.png"),) if (folder / name).is_file()} or None
        notes = metrics.get("notes")  # what the run's evaluation left out or found meaningless, one line each
        notes = [str(n) for n in notes] if isinstance(notes, list) else []
        return write_run_report(folder, metrics, history, grids, notes)
    raise ObliviateError(f"not a run, demo or bench folder (no metrics.json, summary.json or bench.json): {folder}")
