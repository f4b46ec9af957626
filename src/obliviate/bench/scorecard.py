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
    Console(width=None if sys.stdout.isatty() else 200).print(table)
