"""The scorecard: one row per model, the numbers that decide whether unlearning worked."""
from __future__ import annotations


def columns() -> list[tuple[str, str, str]]:
    """(key in the aggregate, header, format) of each scorecard column: the metrics' own declarations."""
    from obliviate.registry import scorecard_metrics

    return [(m.name, m.column_title, m.fmt) for m in scorecard_metrics()]


def cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return fmt.format(v)


REFERENCE_ROWS = ("original", "retrain")


def run_rows(metrics: dict) -> dict[str, dict]:
    """A run's scorecard rows: the original model and the retrain reference that its metrics.json holds (when it
    holds them), then the unlearned model."""
    rows = {k: metrics[k] for k in REFERENCE_ROWS if isinstance(metrics.get(k), dict)}
    return {**rows, metrics.get("method") or "run": metrics}


def warnings(rows: dict[str, dict]) -> list[str]:
    """What the rows' numbers need said beside them (forget quality on too few items), each line once."""
    from obliviate.evals.tofu import forget_quality_warning

    return list(dict.fromkeys(w for w in map(forget_quality_warning, rows.values()) if w))


def print_scorecard(rows: dict[str, dict], title: str = "scorecard") -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    present = [c for c in columns() if any(c[0] in r for r in rows.values())]
    for _, header, _ in present:
        table.add_column(header, justify="right")
    for name, row in rows.items():
        table.add_row(name, *[cell(row, k, f) for k, _, f in present])
    # Not a terminal (a CI log, a file): rich would squeeze the table into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    for line in warnings(rows):
        console.print(line, style="yellow", highlight=False, markup=False)


def mllmu_rows(rows: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """MLLMU-Bench's table turned so that models are columns: one line per (set, task), each cell "image / text"."""
    from obliviate.registry import METRICS, MLLMU_SETS, MLLMU_TASKS

    lines = []
    for s in MLLMU_SETS:
        for t in MLLMU_TASKS:
            fmt = "{:.0%}" if t in ("classification", "cloze") else "{:.2f}"
            if all(r.get(f"{s}_{t}_image") is None and r.get(f"{s}_{t}_text") is None for r in rows.values()):
                continue
            label = f"{s} {t.replace('_', '-')}"
            lines.append((label, [f"{cell(r, f'{s}_{t}_image', fmt)} / {cell(r, f'{s}_{t}_text', fmt)}"
                                  for r in rows.values()]))
    original = rows.get("original")
    for s in ("retain", "public") if original else ():  # utility relative to the original model's
        keys = [f"{s}_classification_{form}" for form in ("image", "text")]
        if any(original.get(k) for k in keys):
            ratios = [{k: r[k] / original[k] for k in keys if r.get(k) is not None and original.get(k)}
                      for r in rows.values()]
            lines.append((f"{s} MC / original", [" / ".join(cell(r, k, "{:.2f}") for k in keys) for r in ratios]))
    for key in ("forget_quality", "privleak", "mia_loss_auc"):  # titled and formatted as declared
        if any(key in r for r in rows.values()):
            lines.append((METRICS[key].column_title, [cell(r, key, METRICS[key].fmt) for r in rows.values()]))
    return lines


def print_mllmu_table(rows: dict[str, dict], title: str = "MLLMU-Bench") -> None:
    """Models as columns; each set x task line shows the score with the picture / as text alone."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="each cell: with the picture / as text alone")
    table.add_column("set, task")
    for name in rows:
        table.add_column(name, justify="right")
    for label, cells in mllmu_rows(rows):
        table.add_row(label, *cells)
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    for line in warnings(rows):
        console.print(line, style="yellow", highlight=False, markup=False)


def print_attack(name: str, result: dict) -> None:
    """One attack's models as rows (the run's method, the original, the retrain reference), its columns as declared
    by the attack's result, and its cost."""
    import sys

    from rich.console import Console
    from rich.table import Table

    models = result["models"]
    keys = result.get("columns") or [result["headline"]]
    speed = f", {result['items_per_second']:.1f}/s" if result.get("items_per_second") else ""
    table = Table(title=f"{name} on {result['method']}: {result['items']} items{speed}", caption=result.get("caption"))
    table.add_column("model")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for model, row in models.items():
        table.add_row(model, *[cell(row, k, "{:.1%}" if k in result.get("percent", keys) else "{:.3g}")
                               for k in keys])
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def robustness_rows(results: dict[str, dict[str, dict]]) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """{method: {attack: result}} -> ({attack: its column title}, {model: {attack: headline value}}): one row per
    method, then the original's and the retrain reference's rows (the same in every method's result: taken from the
    first)."""
    attacks: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    for method, by_attack in results.items():
        for attack, result in by_attack.items():
            if attack not in attacks:
                attacks.append(attack)
            for model, aggregate in result["models"].items():
                name = method if model == result["method"] else model
                rows.setdefault(name, {}).setdefault(attack, aggregate.get(result["headline"]))
    # a guard's weights without the guard ("SLD (unguarded)") under its method, then the references
    order = [m for m in results] + [m for m in rows if m not in results and m not in REFERENCE_ROWS] + \
        [m for m in REFERENCE_ROWS if m in rows]
    labels = {a: next(r[a].get("label", a) for r in results.values() if a in r) for a in attacks}
    return labels, {m: rows[m] for m in order if m in rows}


def print_robustness_table(results: dict[str, dict[str, dict]], title: str = "robustness") -> None:
    """Attacks as columns (each its headline: recovered share, lower is safer), methods and the references as rows."""
    import sys

    from rich.console import Console
    from rich.table import Table

    labels, rows = robustness_rows(results)
    table = Table(title=title, caption="each cell: what the attack recovers on the forget set (lower is safer); "
                                       "retrain = the floor")
    table.add_column("model")
    for label in labels.values():
        table.add_column(label, justify="right")
    for model, row in rows.items():
        table.add_row(model, *[cell(row, a, "{:.1%}") for a in labels])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
