"""A bench folder's leaderboard (leaderboard.md): per method, each scorecard metric of its reported cells as mean ±
std over seeds, the retrain references (the noise floor) on top, failed cells counted as failed. A minimal version;
the full leaderboard (HTML, plots, ranks) is the "report" part of issue 18."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _cells(out: Path) -> list[dict]:
    """The records of the grid's cells (bench.json's "cells": a changed spec leaves earlier cells beside them)."""
    try:
        keys = json.loads((out / "bench.json").read_text()).get("cells")
    except (OSError, ValueError, AttributeError):
        keys = None
    records = []
    paths = [out / "cells" / f"{k}.json" for k in keys] if keys is not None else sorted((out / "cells").glob("*.json"))
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # a cell that never ran
            continue
        if isinstance(record, dict) and record.get("status") in ("done", "failed"):
            records.append(record)
    return records


def _metrics(out: Path, record: dict) -> dict:
    try:
        return json.loads((out / "cells" / record["run"] / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def write_leaderboard(out: str | Path) -> Path:
    from obliviate.registry import scorecard_metrics

    out = Path(out)
    records = _cells(out)
    rows: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] in ("reported", "reference"):
            rows.setdefault("retrain (seed " + str(r["params"].get("method_args.seed")) + ")"
                            if r["kind"] == "reference" else r["method"], []).append(r)
    values = {name: [_metrics(out, r) for r in rs if r["status"] == "done"] for name, rs in rows.items()}
    columns = [m for m in scorecard_metrics() if any(m.name in v for vs in values.values() for v in vs)]
    lines = ["| method | seeds | failed | " + " | ".join(m.column_title for m in columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for name in sorted(rows, key=lambda n: (not n.startswith("retrain"), n)):
        cells = []
        for m in columns:
            xs = [v[m.name] for v in values[name] if isinstance(v.get(m.name), (int, float))]
            cells.append("—" if not xs else f"{statistics.fmean(xs):.3g} ± {statistics.stdev(xs):.2g}"
                         if len(xs) > 1 else f"{xs[0]:.3g}")
        failed = sum(1 for r in rows[name] if r["status"] == "failed")
        lines.append(f"| {name} | {len(values[name])} | {failed} | " + " | ".join(cells) + " |")
    notes = []
    try:
        spec = json.loads((out / "bench.json").read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        spec = {}
    if spec and len(spec.get("seeds", [])) < 3:
        notes.append(f"Reported over {len(spec['seeds'])} seed(s) only (the spec's allow_fewer_seeds).")
    path = out / "leaderboard.md"
    from obliviate.runs import atomic_write
    atomic_write(path, "# Leaderboard (reported target, mean ± std over seeds)\n\n" + "\n".join(lines) + "\n"
                 + "".join(f"\n{n}\n" for n in notes))
    return path
