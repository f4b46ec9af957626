"""The bench's leaderboard: a bench folder (bench.json, cells/*.json and their run folders, selection.json) read back
as tables a reader compares methods by, in Markdown and in one static HTML page, with its figures under figures/.

Per task (world or user model), family and reported target: each method's reported cells (the chosen settings, one
per seed) as mean ± std over seeds, ranked by the selection metric; the retrain reference on top, the original at the
bottom (both from the cells' metrics.json rows), and the noise floor: Retrain seed S >= 1 scored against the seed-0
reference (reference cells), shown as its own line and used to mark the gaps that are within it. A metric's direction
and column title come from its declaration in `obliviate.registry.METRICS`."""
from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.errors import ObliviateError

# the forget-utility plane each family's trade-off plot draws: (x: utility, y: forgetting)
TRADEOFF_AXES = {"lm": ("model_utility", "forget_quality"), "t2i": ("ira", "ua"),
                 "mllm": ("retain_classification_image", "forget_quality")}
FLOOR_LABEL = "retrain seed {s} vs seed 0: the noise floor"
NOISE_MARK = "≈"


@dataclass
class Cell:
    """One cell record and, when it is done, what its run folder holds."""
    record: dict
    path: Path
    folder: Path | None = None
    metrics: dict | None = None
    history: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    attacks: dict = field(default_factory=dict)
    base_model: str | None = None  # the bench spec's base model, when it names one

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def method(self) -> str:
        return str(self.record["method"])

    @property
    def seed(self):
        return self.record.get("seed")

    @property
    def reason(self) -> str | None:
        return self.record.get("reason")

    @property
    def done(self) -> bool:
        return self.record.get("status") == "done" and self.metrics is not None

    @property
    def family(self) -> str:
        return (self.record.get("config") or {}).get("family") or "lm"

    @property
    def task(self) -> str:
        """The world or user model the grid unlearns from: the spec's base model (a later sustainability request
        starts from the earlier one's export, still the same task), else the cell's world, else its model."""
        config = self.record.get("config") or {}
        model = self.base_model or (None if config.get("forgotten_before") else config.get("model"))
        if model:
            return f"your model {Path(str(model)).name}"
        world = config.get("world")
        name = world.get("name") if isinstance(world, dict) else world
        return f"the {name} world" if name else "your model"


@dataclass
class Bench:
    folder: Path
    info: dict
    cells: list[Cell]
    selection: dict

    @property
    def spec(self) -> dict:
        return self.info.get("spec") or {}


def _json(path: Path, what: str, kind: type = dict):
    from obliviate.data import read_json_file

    data = read_json_file(path, what)
    if not isinstance(data, kind):
        raise ObliviateError(f"{path}: {what} must be a JSON {'object' if kind is dict else 'array'}")
    return data


def read_bench(out_dir: Path) -> Bench:
    """The bench folder's records and each done cell's run folder; a done cell whose run folder lacks metrics.json
    reads as failed with that reason (never as a number)."""
    out_dir = Path(out_dir)
    if not (out_dir / "bench.json").is_file():
        raise ObliviateError(f"not a bench folder (no bench.json): {out_dir}")
    info = _json(out_dir / "bench.json", "bench record")
    # the grid's current cells: a changed spec leaves the cells of its older grid in cells/, not on the leaderboard
    current = set(info["cells"]) if info.get("cells") is not None else None
    cells = []
    for path in sorted((out_dir / "cells").glob("*.json")):
        if current is not None and path.stem not in current:
            continue
        record = _json(path, "cell record")
        for key in ("kind", "method", "status"):
            if key not in record:
                raise ObliviateError(f"{path}: cell record lacks the key '{key}'")
        cell = Cell(record, path, base_model=((info.get("spec") or {}).get("base") or {}).get("model"))
        if record["status"] == "done":
            cell.folder = out_dir / "cells" / str(record.get("run") or record.get("key") or path.stem)
            try:
                _read_run_folder(cell)
            except ObliviateError as e:  # one unreadable run folder is that cell's failure, not the leaderboard's
                cell.metrics = None
                cell.record = {**record, "status": "failed", "reason": f"done, but its run folder is unreadable: {e}"}
        cells.append(cell)
    selection = _json(out_dir / "selection.json", "selection") if (out_dir / "selection.json").is_file() else {}
    return Bench(out_dir, info, cells, selection)


def _read_run_folder(cell: Cell) -> None:
    """A done cell's metrics.json, history.json, evaluations.json and attacks/, each checked as the run report
    checks them (one line naming the file and the key)."""
    from obliviate.bench.report import _read, read_attacks

    folder = cell.folder
    if not (folder / "metrics.json").is_file():
        raise ObliviateError(f"no metrics.json in {folder}")
    cell.metrics = _read(folder / "metrics.json", "metrics")
    if (folder / "history.json").is_file():
        cell.history = _read(folder / "history.json", "history", list)
    if (folder / "evaluations.json").is_file():
        cell.evaluations = _json(folder / "evaluations.json", "evaluations", list)
        bad = next((i for i, e in enumerate(cell.evaluations) if not isinstance(e, dict) or not isinstance(
            e.get("step"), int) or not isinstance(e.get("metrics"), dict)), None)
        if bad is not None:
            raise ObliviateError(f"{folder / 'evaluations.json'}: row {bad + 1} is not {{'step': int, 'metrics': "
                                 "{...}}")
    if (folder / "attacks").is_dir():
        cell.attacks = read_attacks(folder)


# ---- numbers ---------------------------------------------------------------------------------------------------

def reference_row(metrics: dict, name: str) -> dict | None:
    """The original's or the retrain reference's aggregate as a run's metrics.json keeps it: a nested row
    (language and vision-language runs) or prefixed keys (text-to-image: original_ua, retrain_ua, ...)."""
    row = metrics.get(name)
    if isinstance(row, dict):
        return row
    prefix = name + "_"
    row = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and _is_number(v)}
    return row or None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def row_of(cell: Cell) -> dict:
    """A done cell's numbers, with its utility relative to its own original's (the registry's utility_ratio) when
    the run left it out."""
    row = dict(cell.metrics)
    original = reference_row(row, "original") or {}
    if row.get("utility_ratio") is None and _is_number(row.get("model_utility")) and original.get("model_utility"):
        row["utility_ratio"] = row["model_utility"] / original["model_utility"]
    return row


@dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for one value
    n: int


def stat(values: list) -> Stat | None:
    import numpy as np

    values = [float(v) for v in values if _is_number(v)]
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return Stat(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None, int(a.size))


def metric_columns(family: str, rows: list[dict]) -> list:
    """The registry's scorecard metrics of the family that any row holds, in the registry's order."""
    from obliviate.registry import scorecard_metrics

    return [m for m in scorecard_metrics() if serves(m, family) and any(_is_number(r.get(m.name)) for r in rows)]


def serves(metric, family: str) -> bool:
    """The metric is one of the family's (its own family, the families that also write it, or any)."""
    return family in getattr(metric, "families", (metric.family,)) or metric.family == "any"


def fmt_stat(s: Stat | None, fmt: str) -> str:
    if s is None:
        return "–"
    text = fmt.format(s.mean)
    if s.std is not None:
        text += " ± " + fmt.replace("+", "").format(s.std)
    return text


def sort_key(direction: str | None, value: float | None):
    if value is None:
        return (1, 0.0)
    return (0, {"higher": -value, "lower": value, "zero": abs(value)}.get(direction, 0.0))


def rule_direction(rule) -> str | None:
    """The direction a selection rule ranks in when it says so itself ({minimize = ...}, {maximize = ...}, "lowest
    ...", "highest ..."); None: the ranked metric's declared one (a metric declared without one, as the
    vision-language forget accuracy, is ranked the way the spec asks)."""
    if isinstance(rule, dict):
        return "lower" if rule.get("minimize") else "higher" if rule.get("maximize") else None
    found = _BEST.search(rule.lower()) if isinstance(rule, str) else None
    word = found.group(0).split()[0] if found else ""
    return "lower" if word.startswith(("lowest", "min")) else "higher" if word.startswith(("highest", "max")) else None


# ---- the rule: what ranks, and the bar a seed meets or not --------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    metric: str
    op: str  # ">=", "<=", ">", "<"
    value: float
    relative: bool  # value x the original's

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}" + ("x the original's" if self.relative else "")

    def met(self, row: dict) -> bool | None:
        v = row.get(self.metric)
        if not _is_number(v):
            return None
        limit = self.value
        if self.relative:
            base = (reference_row(row, "original") or {}).get(self.metric)
            if not _is_number(base):
                return None
            limit *= base
        return {">=": v >= limit, "<=": v <= limit, ">": v > limit, "<": v < limit}[self.op]


_CONSTRAINT = re.compile(r"([a-z_][a-z0-9_]*)\s*(>=|<=|>|<|≥|≤)\s*([0-9.eE+-]+)\s*(x|×|\*\s*original)?")
_BEST = re.compile(r"(?:best|highest|lowest|max(?:imum|imise|imize)?|min(?:imum|imise|imize)?)\s+([a-z_][a-z0-9_]*)")


def parse_rule(rule, family: str) -> tuple[str | None, list[Bar]]:
    """(the metric the rule ranks by, its constraints) from the spec's selection rule: a string ("best
    forget_quality with model_utility >= 0.9x original"), or a table {"metric": ..., "constraints": [...] | {metric:
    ">= 0.9x" | number}}; only names the registry declares count."""
    from obliviate.registry import METRICS

    metric, bars = None, []
    if isinstance(rule, dict):
        metric = rule.get("metric") or rule.get("maximize") or rule.get("minimize")
        constraints = rule.get("constraints") or rule.get("bars") or []
        if isinstance(constraints, dict):
            constraints = [f"{k} {v}" if isinstance(v, str) else
                           f"{k} {'>=' if METRICS[k].better != 'lower' else '<='} {v}"
                           for k, v in constraints.items() if k in METRICS]
        texts = [str(c) for c in constraints]
    elif isinstance(rule, str):
        found = _BEST.search(rule.lower())
        metric = found.group(1) if found else None
        texts = [rule]
    else:
        texts = []
    ours = {n for n, m in METRICS.items() if serves(m, family)}  # a rule speaks of its family's metrics
    for text in texts:
        for name, op, value, rel in _CONSTRAINT.findall(text.lower()):
            if name in ours:
                bars.append(Bar(name, {"≥": ">=", "≤": "<="}.get(op, op), float(value), bool(rel)))
    if metric not in ours:
        metric = None
    return metric, bars


def bench_rule(bench: Bench, family: str) -> tuple[str, list[Bar], str, str | None]:
    """The rank metric, the bars, the rule as written and the direction it ranks in: the spec's, else the first
    that selection.json records, else TOFU's convention for language models (forget quality >= 0.05)."""
    spec = bench.spec
    rule = spec.get("select") or spec.get("selection") or spec.get("rule")
    if isinstance(rule, dict) and family in rule and isinstance(rule[family], (dict, str)):
        rule = rule[family]
    if rule is None:
        rule = next((s.get("rule") for s in bench.selection.values() if isinstance(s, dict) and s.get("rule")), None)
    metric, bars = parse_rule(rule, family)
    text = rule if isinstance(rule, str) and (metric or bars) else ", ".join(b.text() for b in bars)
    if metric is None:
        metric = TRADEOFF_AXES.get(family, (None, "forget_quality"))[1]
    if not bars and family == "lm" and rule is None:
        bars = [Bar("forget_quality", ">=", 0.05, False)]
        text = "forget quality >= 0.05 (TOFU's convention; the spec declares no rule)"
    from obliviate.registry import METRICS

    return metric, bars, text, rule_direction(rule) or METRICS[metric].better


# ---- one leaderboard ---------------------------------------------------------------------------------------------

@dataclass
class Line:
    label: str
    kind: str  # "retrain", "floor", "method", "published", "original"
    stats: dict[str, Stat | None] = field(default_factory=dict)
    settings: str = ""
    seeds: str = ""
    rank: int | None = None
    bar: str = ""
    bar_share: float = 0.0  # the share of its seeds that meet the bar (0 without a bar): ranks first
    failed: str = ""  # the reason, when no seed is done
    near: set = field(default_factory=set)  # metrics within the noise floor of the retrain reference
    notes: dict = field(default_factory=dict)  # metric -> why the cell reads as it does


@dataclass
class Board:
    task: str
    family: str
    target: str
    metric: str
    bars: list[Bar]
    rule: str
    columns: list
    lines: list[Line]
    floor_gap: dict[str, float]
    ties: list[str]
    cells: dict[str, list[Cell]]  # method -> its reported cells
    direction: str | None = None  # how the metric ranks: the rule's own, else the metric's declared direction


def _settings(params: dict | None) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.6g}" if _is_number(v) else f"{k.split('.')[-1]}={v}"
                     for k, v in (params or {}).items())


def _target(cell: Cell) -> str:
    config = cell.record.get("config") or {}
    return str(cell.record.get("target") or config.get("split") or config.get("concept") or "")


def retrain_seed(cell: Cell) -> int:
    """The training seed of a reference cell's retrain model: its config's method_args.seed (the contract's
    surface), else the cell's seed."""
    args = (cell.record.get("config") or {}).get("method_args") or {}
    seed = args.get("seed", (cell.record.get("params") or {}).get("method_args.seed", cell.seed))
    return int(seed or 0)


def _by_definition(retrain: list[dict]) -> set[str]:
    """The metrics a retrain row scores against itself (1 or 0 by definition): those declared to need the retrain
    reference, and its retrain_comparison's keys."""
    from obliviate.registry import METRICS

    keys = {n for n, m in METRICS.items() if "retrain" in getattr(m, "needs", ())} if retrain else set()
    for row in retrain:
        comparison = row.get("retrain_comparison")
        if isinstance(comparison, dict):
            keys |= set(comparison)
    return keys


def board(bench: Bench, task: str, family: str, target: str, published: dict[str, Path] | None = None) -> Board:
    from obliviate.registry import METRICS

    reported = [c for c in bench.cells if c.kind == "reported" and c.task == task and c.family == family
                and _target(c) == target]
    references = [c for c in bench.cells if c.kind == "reference" and c.task == task and c.family == family
                  and _target(c) == target]
    floors = [c for c in references if c.done and retrain_seed(c) >= 1]
    metric, bars, rule, direction = bench_rule(bench, family)
    methods: dict[str, list[Cell]] = {}
    for c in sorted(reported, key=lambda c: (c.method, c.seed or 0)):
        methods.setdefault(c.method, []).append(c)
    done_rows = [row_of(c) for c in reported if c.done]
    retrain_rows = [r for r in (reference_row(row, "retrain") for row in done_rows) if r]
    original_rows = [r for r in (reference_row(row, "original") for row in done_rows) if r]
    floor_rows = [row_of(c) for c in floors]
    retrain_eval = next(((c.record.get("config") or {}).get("retrain_eval") for c in reported
                         if (c.record.get("config") or {}).get("retrain_eval")), None)
    pub_rows = {label: read_published(path, retrain_eval) for label, path in (published or {}).items()}
    columns = metric_columns(family, done_rows + retrain_rows + original_rows + floor_rows + list(pub_rows.values()))
    names = [m.name for m in columns]

    def stats(rows: list[dict]) -> dict[str, Stat | None]:
        return {k: stat([r.get(k) for r in rows]) for k in names}

    def one_model(rows: list[dict]) -> dict[str, Stat | None]:
        """The retrain reference and the original are one model each, repeated in every cell's metrics.json:
        its value, with a spread only where the cells disagree."""
        return {k: (stat(list(dict.fromkeys(r.get(k) for r in rows if _is_number(r.get(k))))) if rows else None)
                for k in names}

    lines = []
    retrain = Line("retrain (the reference, seed 0)", "retrain", one_model(retrain_rows))
    defined = _by_definition(retrain_rows)
    floor = stats(floor_rows) if floor_rows else {}
    # never "1 by definition": the retrain line shows the measured floor (in column order: the legend names them, and
    # a set's order changes between processes, which rewrote unchanged leaderboards)
    for k in (n for n in names if n in defined):
        retrain.stats[k] = floor.get(k)
        retrain.notes[k] = ("measured: retrain seed >= 1 vs seed 0" if floor.get(k) else
                            "not measured: the bench ran no retrain seed >= 1 (the noise floor)")
    lines.append(retrain)
    floor_gap: dict[str, float] = {}
    if floor_rows:
        seeds = sorted({retrain_seed(c) for c in floors})
        lines.append(Line(FLOOR_LABEL.format(s="/".join(map(str, seeds))), "floor", floor,
                          seeds=_seeds(len(floor_rows))))
        reference = {k: stat([r.get(k) for r in retrain_rows]) for k in names}
        for k in names:  # how far one retrain is from another: the gap a method may have and still be noise
            ref = reference.get(k)
            gaps = [abs(r[k] - ref.mean) for r in floor_rows if ref is not None and _is_number(r.get(k))]
            if gaps:
                floor_gap[k] = sum(gaps) / len(gaps)
    failed_floor = [c for c in references if not c.done]
    ranked = []
    for method, cells in methods.items():
        done = [c for c in cells if c.done]
        failed = [c for c in cells if not c.done]
        line = Line(method, "method", stats([row_of(c) for c in done]), _settings(cells[0].record.get("params")))
        line.seeds = f"{len(done)} of {len(cells)} seeds" if failed else _seeds(len(done))
        if failed:
            reasons = _reasons(failed)
            if not done:
                line.failed = f"failed ({reasons})"
            else:
                line.seeds += f" (failed {reasons})"
        if done and bars:
            met = [all(b.met(row_of(c)) for b in bars) for c in done]
            line.bar = f"{sum(met)} of {len(done)} seeds"
            line.bar_share = sum(met) / len(done)
        for k, s in line.stats.items():
            ref = stat([r.get(k) for r in retrain_rows])
            if s is not None and ref is not None and k in floor_gap and abs(s.mean - ref.mean) <= floor_gap[k]:
                line.near.add(k)
        ranked.append(line)
    m = METRICS[metric]
    # the rule's order: a method that keeps the bar on more of its seeds first (a score bought by breaking the bar
    # does not outrank one within it), then the score
    ranked.sort(key=lambda ln: (bool(ln.failed), -ln.bar_share, sort_key(direction, ln.stats.get(metric).mean
                                                                           if ln.stats.get(metric) else None)))
    ties = []
    previous = None
    for i, line in enumerate(ranked):
        if line.failed or line.stats.get(metric) is None:
            continue
        line.rank = i + 1
        # a pair the bar orders (more seeds within it first) is not ordered by the score
        if previous is not None and metric in floor_gap and previous.bar_share == line.bar_share and \
                abs(previous.stats[metric].mean - line.stats[metric].mean) <= floor_gap[metric]:
            ties.append(f"{previous.label} and {line.label} differ in {m.column_title} by less than the noise floor "
                        f"({m.fmt.replace('+', '').format(floor_gap[metric])}): their order is not evidence")
        previous = line
    lines += ranked
    for label, row in pub_rows.items():
        lines.append(Line(f"published: {label}", "published", {k: stat([row.get(k)]) for k in names},
                          seeds="as published"))
    lines.append(Line("original (before unlearning)", "original", one_model(original_rows)))
    if failed_floor:
        lines.insert(1, Line("retrain seed >= 1 (the noise floor)", "floor",
                             failed=f"failed ({_reasons(failed_floor)})"))
    return Board(task, family, target, metric, bars, rule, columns, lines, floor_gap, ties, methods, direction)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n > 1 else ''}"


def _reasons(failed: list[Cell]) -> str:
    """'seeds 0, 2: reason; seed 1: another': each reason once, with the seeds it stopped (a reference cell's: its
    retrain seed)."""
    by_reason: dict[str, list] = {}
    for c in failed:
        seed = retrain_seed(c) if c.kind == "reference" else c.seed
        by_reason.setdefault(c.reason or "no reason recorded", []).append(str(seed))
    return "; ".join(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {reason}"
                     for reason, seeds in by_reason.items())


def boards(bench: Bench, published: dict[str, Path] | None = None) -> list[Board]:
    keys = list(dict.fromkeys((c.task, c.family, _target(c)) for c in bench.cells if c.kind == "reported"))
    return [board(bench, *key, published=published) for key in keys]


def read_published(path: str | Path, retrain_eval: str | Path | None = None) -> dict:
    """A published evaluation's aggregates under the registry's names: OpenUnlearning's TOFU_EVAL.json ({metric:
    {"agg_value": x}}) or TOFU_SUMMARY.json ({metric: x}), an obliviate evaluation. A file of per-item truth ratios
    (TOFU's eval_log_forget.json, a TOFU_EVAL.json without forget_quality) gets its forget quality against
    `retrain_eval` (the task's retrain evaluation, `retrain_eval` of its run config), the KS test a run uses."""
    from obliviate.registry import METRICS

    path = Path(path)
    data = _json(path, "published evaluation")
    aggregate = data["aggregate"] if isinstance(data.get("aggregate"), dict) else data  # an obliviate evaluation
    row = {}
    for name in METRICS:
        v = aggregate.get(name)
        if isinstance(v, dict):
            v = v.get("agg_value")
        if _is_number(v):
            row[name] = float(v)
    if "forget_quality" not in row and retrain_eval is not None:
        from obliviate.evals.reference_logs import read_retrain_eval
        from obliviate.evals.tofu import forget_quality

        try:
            published = read_retrain_eval(path)
        except ObliviateError:
            published = None  # no per-item truth ratios: the aggregates alone
        if published is not None:
            ours = read_retrain_eval(retrain_eval)
            row["forget_quality"] = forget_quality([r["truth_ratio"] for r in published["per_item"]["forget"]],
                                                   [r["truth_ratio"] for r in ours["per_item"]["forget"]])
    if not row:
        raise ObliviateError(f"{path}: no aggregate the leaderboard shows (e.g. forget_quality, model_utility, as "
                             "numbers or {'agg_value': x}), and no per-item truth ratios with a retrain evaluation "
                             "to score them against")
    return row


# ---- text -----------------------------------------------------------------------------------------------------------

def _cell_text(line: Line, metric) -> str:
    text = fmt_stat(line.stats.get(metric.name), metric.fmt)
    if metric.name in line.near:
        text += " " + NOISE_MARK
    if line.notes.get(metric.name) and line.stats.get(metric.name) is None:
        text = "not measured"
    return text


def _title(b: Board) -> str:
    return f"{b.task}, {b.family}: forgetting {b.target}"


def _legend(b: Board) -> list[str]:
    from obliviate.registry import METRICS

    m = METRICS[b.metric]
    notes = [f"Each method: its chosen settings on {b.target}, mean ± std (sample standard deviation, n - 1) over "
             f"its seeds; ranked by {m.column_title} ({m.name}), "
             f"{ {'higher': 'highest', 'lower': 'lowest', 'zero': 'closest to zero'}.get(b.direction, 'in no order')} "
             "first. Arrows: ↑ higher is better, ↓ lower is better, "
             "→0 closest to zero is best (each metric's declaration)."]
    has_floor = any(ln.kind == "floor" and not ln.failed for ln in b.lines)
    if has_floor and not b.floor_gap:
        notes.append("The noise floor line shows a second retrain model's scores; the reference's own row is not in "
                     "the cells' metrics.json, so no gap is marked as within it.")
    elif b.floor_gap:
        notes.append(f"{NOISE_MARK}: within the noise floor: the method is no farther from the retrain reference than "
                     "a second retrain model (another training seed) is.")
    else:
        notes.append("No noise floor: the bench ran no retrain reference with a seed >= 1 for this target, so no gap "
                     "here can be told from noise.")
    defined = [k for ln in b.lines if ln.kind == "retrain" for k in ln.notes]
    if defined:
        notes.append("The retrain line's " + ", ".join(METRICS[k].column_title for k in defined) + ": what a second "
                     "retrain model (seed >= 1) scores against the reference, not the reference against itself.")
    if b.bars:
        notes.append(f"Bar: {b.rule}; 'k of n seeds' counts the seeds that meet every part of it. The ranking puts "
                     "the methods that meet it on a larger share of their seeds first, then orders by the score.")
    few = [ln.label for ln in b.lines if ln.kind == "method" and not ln.failed and ln.stats and
           max((s.n for s in ln.stats.values() if s), default=0) < 3]
    if few:
        notes.append(f"Fewer than 3 seeds done for {', '.join(few)}: their spread is a rough estimate.")
    notes += b.ties
    accuracy = {ln.kind: ln.stats.get("retain_accuracy") for ln in b.lines if ln.kind in ("original", "retrain")}
    weak = weak_reference_note(b.target, *(accuracy.get(k) and accuracy[k].mean for k in ("original", "retrain")))
    return notes + ([weak] if weak else [])


def board_markdown(b: Board) -> str:
    cols = ["", "rank", "model", "settings", "seeds", *(m.column_title for m in b.columns)]
    if b.bars:
        cols.append("meets the bar")
    out = [f"## {_title(b)}", "", "| " + " | ".join(cols[1:]) + " |", "|" + "---|" * (len(cols) - 1)]
    for ln in b.lines:
        if ln.failed:
            cells = [ln.failed] + [""] * (len(b.columns) - 1 + bool(b.bars))
        else:
            cells = [_cell_text(ln, m) for m in b.columns] + ([ln.bar] if b.bars else [])
        out.append("| " + " | ".join(map(_md_cell, [str(ln.rank or ""), ln.label, ln.settings, ln.seeds, *cells]))
                   + " |")
    out.append("")
    out += [f"- {n}" for n in _legend(b)]
    return "\n".join(out)


def board_html(b: Board) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("rank", "model", "settings", "seeds",
                                                           *(m.column_title for m in b.columns)))
    head += "<th>meets the bar</th>" if b.bars else ""
    body = []
    width = len(b.columns) + bool(b.bars)
    for ln in b.lines:
        first = (f"<td>{ln.rank or ''}</td><td class='text'>{html.escape(ln.label)}</td><td class='text'>"
                 f"{html.escape(ln.settings)}</td><td class='text'>{html.escape(ln.seeds)}</td>")
        if ln.failed:
            cells = f"<td class='text failed' colspan='{width}'>{html.escape(ln.failed)}</td>"
        else:
            cells = "".join(
                f"<td class='{'noise' if m.name in ln.near else ''}' title='{html.escape(ln.notes.get(m.name, ''))}'>"
                f"{html.escape(_cell_text(ln, m))}</td>" for m in b.columns)
            cells += f"<td>{html.escape(ln.bar)}</td>" if b.bars else ""
        body.append(f"<tr class='{ln.kind}'>{first}{cells}</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in _legend(b))
    return (f"<h2>{html.escape(_title(b))}</h2><div class='wide'><table class='leaderboard'><tr>{head}</tr>"
            f"{''.join(body)}</table></div>" + notes)


def selection_rows(bench: Bench) -> list[tuple[str, str, str, str, str]]:
    """(method, chosen settings, score, margin over the runner-up, the runners-up) from selection.json."""
    select = bench.spec.get("select")
    minimize = isinstance(select, dict) and bool(select.get("minimize"))
    rows = []
    for method, s in bench.selection.items():
        if not isinstance(s, dict):
            continue
        chosen = _settings(s.get("chosen"))
        score = "–" if not _is_number(s.get("score")) else f"{s['score']:.3g}"
        margin = "–" if not _is_number(s.get("margin")) else f"{s['margin']:.3g}"
        # the other candidates (another setting, or with eval_every another step of the same cell), best first
        others = [c for c in s.get("candidates") or [] if c.get("params") != s.get("chosen")]
        sign = 1 if minimize else -1
        others.sort(key=lambda c: (c.get("status") != "done", not c.get("eligible"),
                                   sign * c["score"] if _is_number(c.get("score")) else 0))
        runners = "; ".join(
            f"{_settings(c.get('params'))}: " + ("failed" if c.get("status") == "failed" else
                                                 f"{c['score']:.3g}" if _is_number(c.get("score")) else "–")
            + ("" if c.get("eligible") or c.get("status") == "failed" else
               f" (not eligible: {c['reason']})" if c.get("reason") else " (not eligible)") for c in others[:3])
        rows.append((method, chosen or "(none eligible)", score, margin, runners or "–"))
    return rows


def weak_reference_note(target: str, original, retrain) -> str | None:
    """A retrain reference far below the original on the retain answers (its training fell short): the scores taken
    against it describe it more than the methods. `original` and `retrain`: their retain accuracy."""
    from obliviate.evals.references import weak_reference

    if not (_is_number(original) and _is_number(retrain)):
        return None
    return weak_reference(f"The retrain reference of {target}", original, retrain)


def selection_notes(bench: Bench) -> list[str]:
    """What selection.json says beside a choice: no candidate met the rule, the step was chosen too; and a weak
    retrain reference of the validation target, against which every candidate was scored."""
    notes = [f"{method}: {s['note']}" for method, s in bench.selection.items() if isinstance(s, dict)
             and s.get("note")]
    references = {}  # target -> (original's, retrain's retain accuracy), from its first done validation cell
    for cell in bench.cells:
        if cell.kind == "validation" and cell.done and _target(cell) not in references:
            references[_target(cell)] = tuple((reference_row(cell.metrics, name) or {}).get("retain_accuracy")
                                              for name in ("original", "retrain"))
    notes += [n for target, refs in references.items() if (n := weak_reference_note(target, *refs))]
    return notes + list(dict.fromkeys(s["step_note"] for s in bench.selection.values() if isinstance(s, dict)
                                      and s.get("step_note")))


def _selection_md(bench: Bench) -> str:
    rows = selection_rows(bench)
    if not rows:
        return ""
    rule = next((s.get("rule") for s in bench.selection.values() if isinstance(s, dict) and s.get("rule")), "")
    out = ["## Settings chosen on the validation target", "", f"Rule: {rule}", "",
           "| method | chosen | score | margin over the runner-up | runners-up |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    out += [""] + [f"- {n}" for n in selection_notes(bench)]
    return "\n".join(out)


def _selection_html(bench: Bench) -> str:
    rows = selection_rows(bench)
    if not rows:
        return ""
    rule = next((s.get("rule") for s in bench.selection.values() if isinstance(s, dict) and s.get("rule")), "")
    body = "".join("<tr>" + "".join(f"<td class='text'>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return ("<h2>Settings chosen on the validation target</h2>"
            f"<p class='note'>Rule: {html.escape(str(rule))}</p><table><tr><th>method</th><th>chosen</th>"
            f"<th>score</th><th>margin over the runner-up</th><th>runners-up</th></tr>{body}</table>"
            + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in selection_notes(bench)))


# ---- scalability and sustainability -----------------------------------------------------------------------------

def series(bench: Bench, kind: str, axis: str) -> dict[tuple[str, str, str], dict[str, dict]]:
    """{(task, family, method): {x: [rows]}} of the cells of `kind` ("scalability": x = size, "sustainability": x =
    request), with "retrain" as a method (each x's own retrain reference)."""
    out: dict = {}
    for c in bench.cells:
        if c.kind != kind or c.record.get(axis) is None:
            continue
        x = c.record[axis]
        points = out.setdefault((c.task, c.family, c.method), {})
        points.setdefault(x, []).append(c)
    return out


def floor_rows(bench: Bench, task: str, family: str, targets: set[str]) -> list[dict]:
    """The noise floor's rows on these targets: done reference cells with a retrain seed >= 1."""
    return [row_of(c) for c in bench.cells if c.kind == "reference" and c.done and retrain_seed(c) >= 1
            and c.task == task and c.family == family and _target(c) in targets]


def _series_lines(bench: Bench, kind: str, axis: str, name: str) -> tuple[list, list[tuple[str, list[Stat | None],
                                                                                            list[str]]]]:
    """(xs, [(label, a Stat per x, failure text per x)]): each method's cells of `kind` at each x, then per task the
    retrain reference of each x (where it is not the reference against itself) and the noise floor at each x."""
    data = series(bench, kind, axis)
    xs = sorted({x for points in data.values() for x in points})
    lines, tasks = [], {}
    for (task, family, method), points in data.items():
        stats, failures = [], []
        for x in xs:
            cs = points.get(x, [])
            stats.append(stat([row_of(c).get(name) for c in cs if c.done]))
            failures.append(_reasons([c for c in cs if not c.done]) if any(not c.done for c in cs) else "")
            tasks.setdefault((task, family), {}).setdefault(x, []).extend(cs)
        lines.append((method if len(data) == len({k[2] for k in data}) else f"{method} ({task})", stats, failures))
    for (task, family), by_x in tasks.items():
        done = {x: [row_of(c) for c in by_x.get(x, []) if c.done] for x in xs}
        retrain = {x: [r for r in (reference_row(row, "retrain") for row in done[x]) if r] for x in xs}
        if name not in _by_definition([r for rs in retrain.values() for r in rs]):
            stats = [stat(list(dict.fromkeys(r.get(name) for r in retrain[x] if _is_number(r.get(name)))))
                     for x in xs]
            if any(stats):
                lines.append((f"retrain reference of each {axis}", stats, [""] * len(xs)))
        floors = [stat([r.get(name) for r in floor_rows(bench, task, family, {_target(c) for c in by_x.get(x, [])})])
                  for x in xs]
        if any(floors):
            lines.append(("noise floor: retrain seed >= 1 vs seed 0", floors, [""] * len(xs)))
    return xs, lines


def _series_table(bench: Bench, kind: str, axis: str, metric_names: list[str], md: bool) -> str:
    from obliviate.registry import METRICS

    if not series(bench, kind, axis):
        return ""
    what = {"size": "forget set size (% of the people)", "request": "deletion request"}[axis]
    title = {"scalability": "Scalability: forget sets of growing size",
             "sustainability": "Sustainability: sequential deletion requests"}[kind]
    parts = [f"## {title}" if md else f"<h2>{html.escape(title)}</h2>"]
    for name in metric_names:
        m = METRICS[name]
        xs, lines = _series_lines(bench, kind, axis, name)
        header = [f"{m.column_title} / {what}", *(f"{x:g}" if _is_number(x) else str(x) for x in xs)]
        rows = [[label, *[" ".join(t for t in (fmt_stat(st, m.fmt) if st else "", f"failed ({f})" if f else "")
                                   if t) or "–" for st, f in zip(stats, failures)]]
                for label, stats, failures in lines]
        if md:
            parts += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            parts += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
        else:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td class='{'text' if i == 0 or 'failed' in c else ''}'>{html.escape(c)}</td>"
                                 for i, c in enumerate(r)) + "</tr>" for r in rows) + "</table>")
    return "\n".join(parts)


# ---- figures ------------------------------------------------------------------------------------------------------

def _fig_bytes(fig) -> bytes:
    from obliviate.bench.report import _matplotlib

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _matplotlib().close(fig)
    return buf.getvalue()


def tradeoff_figure(b: Board):
    """Each method a point at its mean with error bars (std over seeds), the retrain reference and the original
    marked, and the noise floor: the band a second retrain model spans around the reference."""
    from obliviate.registry import METRICS

    x_name, y_name = TRADEOFF_AXES.get(b.family, (None, None))
    if not any(m.name == x_name for m in b.columns) or not any(m.name == y_name for m in b.columns):
        return None
    from obliviate.bench.report import _matplotlib, place_labels

    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = plt.get_cmap("tab10")
    points, labels = [], []
    log = y_name == "forget_quality"
    for i, ln in enumerate(x for x in b.lines if x.kind == "method" and not x.failed):
        sx, sy = ln.stats.get(x_name), ln.stats.get(y_name)
        if sx is None or sy is None:
            continue
        y = max(sy.mean, 1e-30) if log else sy.mean
        ax.errorbar(sx.mean, y, xerr=sx.std or 0, yerr=(sy.std or 0) if not log else
                    [[min(sy.std or 0, y - 1e-30)], [sy.std or 0]], fmt="o", ms=6, capsize=3,
                    color=colours(i % 10), zorder=3)
        points.append((sx.mean, y))
        labels.append(ln.label)
    for ln in b.lines:
        sx, sy = ln.stats.get(x_name), ln.stats.get(y_name)
        if ln.kind in ("retrain", "original", "published") and sx is not None and sy is not None:
            y = max(sy.mean, 1e-30) if log else sy.mean
            ax.scatter(sx.mean, y, marker={"retrain": "*", "original": "s", "published": "D"}[ln.kind], s=90,
                       color="black" if ln.kind == "retrain" else "grey", zorder=4)
            points.append((sx.mean, y))
            labels.append(ln.label.split(" (")[0])
    floor = next((ln for ln in b.lines if ln.kind == "floor" and not ln.failed), None)
    if floor is not None and floor.stats.get(y_name) is not None:
        fy = floor.stats[y_name]
        ax.axhline(max(fy.mean, 1e-30) if log else fy.mean, ls="--", c="black", lw=0.9,
                   label=f"noise floor ({METRICS[y_name].header}: retrain seed >= 1 vs 0)")
        if floor.stats.get(x_name) is not None:
            ax.axvline(floor.stats[x_name].mean, ls=":", c="black", lw=0.8,
                       label=f"noise floor ({METRICS[x_name].header})")
    if log:
        ax.set_yscale("log")
    if not points:
        _matplotlib().close(fig)
        return None
    ax.set_xlabel(f"{METRICS[x_name].column_title} ({x_name})")
    ax.set_ylabel(f"{METRICS[y_name].column_title} ({y_name})")
    ax.set_title(f"Forgetting vs utility: {b.task}, {b.target}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    place_labels(ax, points, labels)
    return fig


def series_figure(bench: Bench, kind: str, axis: str, metric_names: list[str]):
    """Each metric against forget size or request: each method's mean with error bars over seeds, the retrain
    reference of each point (dashed) and the noise floor at each point (dotted)."""
    from obliviate.bench.report import _matplotlib
    from obliviate.registry import METRICS

    drawn = [(name, *_series_lines(bench, kind, axis, name)) for name in metric_names]
    drawn = [(name, xs, lines) for name, xs, lines in drawn if any(any(st) for _, st, _ in lines)]
    if not drawn:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (name, xs, lines) in zip(axes[0], drawn):
        for i, (label, stats, _) in enumerate(lines):
            keep = [(x, st) for x, st in zip(xs, stats) if st is not None]
            if not keep:
                continue
            style = ({"ls": "--", "c": "black", "lw": 0.9} if label.startswith("retrain") else
                     {"ls": ":", "c": "grey", "lw": 1.2} if label.startswith("noise floor") else
                     {"marker": "o", "capsize": 3, "color": colours(i % 10)})
            ax.errorbar([x for x, _ in keep], [st.mean for _, st in keep], yerr=[st.std or 0 for _, st in keep],
                        label=label, **style)
        ax.set_xlabel({"size": "forget set size (% of the people)", "request": "deletion request"}[axis])
        ax.set_ylabel(METRICS[name].column_title)
        if name == "forget_quality":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle({"scalability": "Metrics against forget size", "sustainability":
                  "Metrics over sequential deletion requests"}[kind])
    return fig


def evaluations_figure(b: Board):
    """The selection metric along the unlearning (evaluations.json), each method's seeds as one mean line."""
    from obliviate.bench.report import _matplotlib
    from obliviate.registry import METRICS

    curves = {}
    for method, cells in b.cells.items():
        runs = [c.evaluations for c in cells if c.done and c.evaluations]
        if runs:
            steps = sorted({e["step"] for r in runs for e in r if isinstance(e, dict) and "step" in e})
            means = [stat([e.get("metrics", {}).get(b.metric) for r in runs for e in r if e.get("step") == s])
                     for s in steps]
            curves[method] = [(s, m) for s, m in zip(steps, means) if m is not None]
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method, points in curves.items():
        ax.errorbar([s for s, _ in points], [m.mean for _, m in points], yerr=[m.std or 0 for _, m in points],
                    marker="o", ms=3, capsize=2, label=method)
    floor = next((ln for ln in b.lines if ln.kind == "floor" and not ln.failed), None)
    if floor is not None and floor.stats.get(b.metric) is not None:
        ax.axhline(floor.stats[b.metric].mean, ls="--", c="black", lw=0.9, label="noise floor")
    if b.metric == "forget_quality":
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(METRICS[b.metric].column_title)
    ax.set_title(f"{METRICS[b.metric].header} along the unlearning (evaluations every eval_every steps)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


# ---- the page ------------------------------------------------------------------------------------------------------

LEADERBOARD_STYLE = ("tr.retrain td{font-weight:600;border-top:2px solid #333}tr.floor td{background:#f6f6ff;"
                     "font-style:italic}tr.original td{border-top:2px solid #333;color:#555}"
                     "td.noise{background:#eef6ee}td.failed{color:#b00020}tr.published td{color:#345}"
                     "table.leaderboard th:nth-child(-n+4){text-align:left}"
                     ".side{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}"
                     ".side>div{flex:1;min-width:420px;overflow-x:auto}.wide{overflow-x:auto}")


class Figures:
    """Figures written once under OUT/figures/ (Markdown links them) and inlined in the HTML (it stands alone)."""

    def __init__(self, folder: Path | None):
        self.folder = folder  # None: inline only (a comparison page writes no figure files)
        self.written: list[Path] = []

    def add(self, name: str, png: bytes) -> tuple[str, str]:
        from obliviate.runs import atomic_write

        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.written.append(atomic_write(self.folder / name, png))
        return (f"figures/{name}", "data:image/png;base64," + base64.b64encode(png).decode())


def _slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:80]


def _board_figures(b: Board, figures: Figures, md: list[str], page: list[str]) -> None:
    """A leaderboard's trade-off plot, its metrics along the unlearning, its unlearning curves (the first seed's
    history) and, for text-to-image, each method's image grid (the first seed's)."""
    from obliviate.bench.report import curves_figure

    slug = _slug(b.task, b.family, b.target)
    for name, alt, fig in ((f"tradeoff-{slug}.png", "forget-utility trade-off", tradeoff_figure(b)),
                           (f"evaluations-{slug}.png", "metrics along the unlearning", evaluations_figure(b))):
        if fig is not None:
            rel, uri = figures.add(name, _fig_bytes(fig))
            md.append(f"\n![{alt}]({rel})")
            page.append(f"<p><img alt='{alt}' src='{uri}'></p>")
    histories = {m: next((c.history for c in cells if c.done and c.history), []) for m, cells in b.cells.items()}
    fig = curves_figure(histories, f"Unlearning curves: {b.task}, {b.target} (first seed)")
    if fig is not None:
        rel, uri = figures.add(f"curves-{slug}.png", _fig_bytes(fig))
        md.append(f"\n![unlearning curves]({rel})")
        page.append(f"<p><img alt='unlearning curves' src='{uri}'></p>")
    for method, cells in b.cells.items():
        grid = next((c.folder / "grid.png" for c in cells if c.done and (c.folder / "grid.png").is_file()), None)
        if grid is not None:
            rel, uri = figures.add(f"grid-{slug}-{_slug(method)}.png", grid.read_bytes())
            caption = f"{method} on {b.target}: original, retrain, {method} (first seed)"
            md.append(f"\n![{caption}]({rel})")
            page.append(f"<h3>{html.escape(caption)}</h3><p><img class='grid' alt='{html.escape(caption)}' "
                        f"src='{uri}'></p>")


def sections(bench: Bench, figures: Figures | None, published: dict[str, Path] | None = None
             ) -> tuple[list[str], list[str]]:
    """(Markdown parts, HTML parts) of a bench's leaderboards, choices, figures, robustness and image grids; with
    `figures` None, the tables alone."""
    md, page = [], []
    bs = boards(bench, published)
    if not bs:
        md.append("No reported cell yet: the grid has not reached its reported targets.")
        page.append("<p class='note'>No reported cell yet: the grid has not reached its reported targets.</p>")
    for b in bs:
        md.append(board_markdown(b))
        page.append(board_html(b))
        if figures is not None:
            _board_figures(b, figures, md, page)
        if any(c.done and c.attacks for cells in b.cells.values() for c in cells):
            md.append(robustness_table(b, md=True))
            page.append(robustness_table(b, md=False))
            first = {m: next((c.attacks for c in cells if c.done and c.attacks), {}) for m, cells in b.cells.items()}
            relearn = {m: r for m, by_attack in first.items() for r in by_attack.values() if "curves" in r}
            if relearn and figures is not None:  # the first seed's relearning curves
                from obliviate.bench.report import relearn_figure
                rel, uri = figures.add(f"relearn-{_slug(b.task, b.family, b.target)}.png",
                                       _fig_bytes(relearn_figure(relearn)))
                md.append(f"\n![relearning curves]({rel})")
                page.append(f"<p><img alt='relearning curves' src='{uri}'></p>")
    md.append(_selection_md(bench))
    page.append(_selection_html(bench))
    for kind, axis in (("scalability", "size"), ("sustainability", "request")):
        family = next((c.family for c in bench.cells if c.kind == kind), None)
        if family is None:
            continue
        names = [n for n in TRADEOFF_AXES.get(family, ())[::-1]]
        md.append(_series_table(bench, kind, axis, names, md=True))
        page.append(_series_table(bench, kind, axis, names, md=False))
        fig = series_figure(bench, kind, axis, names) if figures is not None else None
        if fig is not None:
            rel, uri = figures.add(f"{kind}.png", _fig_bytes(fig))
            md.append(f"\n![{kind}]({rel})")
            page.append(f"<p><img alt='{kind}' src='{uri}'></p>")
    return [p for p in md if p], [p for p in page if p]


def robustness_table(b: Board, md: bool) -> str:
    """What the attacks recover, per method mean ± std over its seeds' attacks (each attack's headline), then the
    original and the retrain reference as the attacks measured them (the first result that has them)."""
    from obliviate.bench.report import ROBUSTNESS_CAPTIONS

    labels: dict[str, str] = {}
    values: dict[str, dict[str, list]] = {}
    references: dict[str, dict[str, float]] = {}
    family = b.family
    for method, cells in b.cells.items():
        for c in cells:
            for attack, result in (c.attacks if c.done else {}).items():
                labels.setdefault(attack, result.get("label") or attack)
                family = result.get("family", family)
                for model, aggregate in result["models"].items():
                    value = aggregate.get(result["headline"])
                    if model == result["method"]:
                        values.setdefault(method, {}).setdefault(attack, []).append(value)
                    else:
                        references.setdefault(model, {}).setdefault(attack, value)
    rows = [(m, [fmt_stat(stat(v.get(a, [])), "{:.1%}") for a in labels]) for m, v in values.items()]
    rows += [(m, [fmt_stat(stat([v.get(a)]), "{:.1%}") for a in labels]) for m, v in references.items()]
    title = "Robustness: what the attacks recover (mean ± std over seeds; lower is safer)"
    caption = ROBUSTNESS_CAPTIONS.get(family, ROBUSTNESS_CAPTIONS["lm"])
    if md:
        out = [f"### {title}", "", "| model | " + " | ".join(labels.values()) + " |", "|---|" + "---|" * len(labels)]
        out += ["| " + " | ".join(_md_cell(x) for x in (m, *cells)) + " |" for m, cells in rows]
        return "\n".join(out + ["", caption])
    body = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>"
                   for m, cells in rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels.values())
    return (f"<h3>{html.escape(title)}</h3><table><tr><th>model</th>{head}</tr>{body}</table>"
            f"<p class='note'>{html.escape(caption)}</p>")


def _md_cell(text: str) -> str:
    """A Markdown table cell: a '|' in a reason or a label would split it."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _html_page(title: str, body: list[str]) -> str:
    from obliviate.bench.report import STYLE

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{LEADERBOARD_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(body) + "\n</body></html>")


def _published(folder: Path, spec: dict, published: dict | None) -> dict[str, Path]:
    """The spec's published rows and the caller's (the caller's win), paths relative to the bench folder."""
    merged = {**(spec.get("published") or {}), **(published or {})}
    out = {}
    for label, path in merged.items():
        path = Path(path)
        out[str(label)] = path if path.is_absolute() or path.exists() else folder / path
    return out


def write_leaderboard(out_dir: Path, published: dict[str, str | Path] | None = None, figures: bool = True
                      ) -> list[Path]:
    """OUT/leaderboard.md, OUT/leaderboard.html (static, its figures inlined) and OUT/figures/*.png from a bench
    folder; returns their paths. `published`: {label: path} of published evaluations to place as labelled rows
    (besides the spec's "published"). `figures` False: the tables alone (seconds faster: no plot is drawn). When
    nothing it reads changed since it last wrote them (a resumed grid whose cells were all done), they stay as
    they are."""
    from obliviate.runs import atomic_write

    out_dir = Path(out_dir)
    if not (out_dir / "bench.json").is_file():
        raise ObliviateError(f"not a bench folder (no bench.json): {out_dir}")
    extra = _published(out_dir, _json(out_dir / "bench.json", "bench record").get("spec") or {}, published)
    stamp = f"<!-- obliviate leaderboard inputs {_fingerprint(out_dir, extra, figures)} -->"
    unchanged = _unchanged(out_dir, stamp)
    if unchanged is not None:
        return unchanged
    bench = read_bench(out_dir)
    drawn = Figures(out_dir / "figures") if figures else None
    md, page = sections(bench, drawn, extra)
    title = f"obliviate bench: {bench.info.get('name') or out_dir.name}"
    head = _header(bench)
    md_path = atomic_write(out_dir / "leaderboard.md", "\n\n".join([f"# {title}", head, *md]) + "\n")
    html_path = atomic_write(out_dir / "leaderboard.html",
                             _html_page(title, [f"<p class='note'>{html.escape(head)}</p>", *page]) + "\n" + stamp)
    return [md_path, html_path, *(drawn.written if drawn else [])]


def _fingerprint(out_dir: Path, published: dict[str, Path], figures: bool) -> str:
    """What the leaderboard is made of, as file sizes and times: the bench's records, each done cell's run folder
    files, the published files, this module and the flags."""
    import hashlib
    import json

    def seen(path: Path):
        try:
            st = path.stat()
            return [str(path), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(path), None]

    files = [out_dir / "bench.json", out_dir / "selection.json", Path(__file__), *published.values()]
    for record in sorted((out_dir / "cells").glob("*.json")):
        files.append(record)
        run = out_dir / "cells" / record.stem
        files += [run / name for name in ("metrics.json", "history.json", "evaluations.json", "grid.png")]
        files += sorted((run / "attacks").glob("*.json")) if (run / "attacks").is_dir() else []
    data = [figures, sorted(published), [seen(f) for f in files]]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:32]


def _unchanged(out_dir: Path, stamp: str) -> list[Path] | None:
    """The paths of a leaderboard written from the same inputs, all still there; else None."""
    md, page = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    try:
        if not page.read_text(encoding="utf-8").endswith("\n" + stamp):
            return None
        figures = [out_dir / f for f in re.findall(r"\]\((figures/[^)]+\.png)\)", md.read_text(encoding="utf-8"))]
    except OSError:
        return None
    return [md, page, *figures] if all(f.is_file() for f in figures) else None


def _header(bench: Bench) -> str:
    counts: dict[str, int] = {}
    for c in bench.cells:
        counts[c.record["status"]] = counts.get(c.record["status"], 0) + 1
    info = bench.info
    return (f"{len(bench.cells)} cells ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); family "
            f"{info.get('family', '?')}; obliviate {info.get('obliviate_version', '?')}; created "
            f"{info.get('created', '?')}.")


# ---- several folders side by side -----------------------------------------------------------------------------------

def write_comparison(folders: list[Path], out: Path, figures: bool = True) -> Path:
    """One page with several run folders and bench folders side by side: the run folders' models in one scorecard
    (each labelled by its folder) with one trade-off plot and their curves; each bench's leaderboards in a column."""
    from obliviate.bench.report import _read, curves_plot, scorecard_html, tradeoff_plot
    from obliviate.bench.scorecard import run_rows
    from obliviate.runs import atomic_write

    folders = [Path(f) for f in folders]
    labels = _labels(folders)
    rows: dict[str, dict] = {}
    histories: dict[str, list] = {}
    columns, notes = [], set()
    for folder, label in zip(folders, labels):
        if (folder / "bench.json").is_file():
            _, page = sections(read_bench(folder), Figures(None) if figures else None)
            columns.append(f"<div><h2>{html.escape(label)} (bench)</h2>" + "\n".join(page) + "</div>")
        elif (folder / "metrics.json").is_file():
            metrics = _read(folder / "metrics.json", "metrics")
            for name, row in run_rows(metrics).items():
                if name == "retrain":  # the reference against itself is no result: 1 and 0 by definition
                    defined = _by_definition([row])
                    row = {k: v for k, v in row.items() if k not in defined}
                    notes.add("A retrain row leaves out what it would score against itself (" + ", ".join(
                        sorted(defined)) + "); a bench's noise floor measures it with a second retrain seed.")
                rows[f"{label}: {name}"] = row
            if (folder / "history.json").is_file():
                histories[f"{label}: {metrics.get('method')}"] = _read(folder / "history.json", "history", list)
        else:
            raise ObliviateError(f"not a run folder or a bench folder (no metrics.json or bench.json): {folder}")
    body = []
    if rows:
        body += ["<h2>Run folders</h2>", scorecard_html(rows), *(f"<p class='note'>{html.escape(n)}</p>"
                                                                 for n in sorted(notes))]
        for alt, img in () if not figures else (("forgetting against utility", tradeoff_plot(rows)),
                         ("unlearning curves", curves_plot(histories, "Unlearning curves"))):
            if img:
                body.append(f"<p><img alt='{alt}' src='{img}'></p>")
    if columns:
        body.append("<div class='side'>" + "".join(columns) + "</div>")
    return atomic_write(out, _html_page("obliviate: " + " vs ".join(labels), body))


def _labels(folders: list[Path]) -> list[str]:
    """Each folder's name, or its last two parts where names repeat."""
    names = [f.resolve().name for f in folders]
    if len(set(names)) == len(names):
        return names
    return ["/".join(f.resolve().parts[-2:]) for f in folders]
