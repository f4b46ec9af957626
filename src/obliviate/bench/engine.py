"""`obliviate bench SPEC`: the validation grid (every method x grid point, the first seed), a selection per method by
the spec's declared rule on the validation cells only (OUT/selection.json), then the chosen settings on the reported
target over the seeds, the retrain references of the noise floor, and MUSE's scalability and sustainability cells.
Cells run through `obliviate.bench.execute`; finished cells are skipped, so a killed or repeated bench goes on where
it stopped (docs/bench.md)."""
from __future__ import annotations

import copy
import json
import math
import re
import time
from datetime import datetime, timezone
from itertools import product
from pathlib import Path

from obliviate.bench import cells as C
from obliviate.bench.spec import BenchSpec, read_spec
from obliviate.errors import ObliviateError

POLL_S = 0.5  # how often a cell that another bench process runs is looked at


def _grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in product(*(grid[k] for k in keys))]


def _size(target: str) -> float | None:
    """forget05 or worst05 -> 5 (% of the people); None when the target names no size."""
    m = re.fullmatch(r"(?:forget|worst)0*(\d+)", target)
    return float(m[1]) if m else None


class Bench:
    """The cells a spec asks for, the selection, and where everything goes."""

    def __init__(self, spec: BenchSpec, data: dict, source: str, out: Path):
        self.spec, self.data, self.source, self.out = spec, data, source, Path(out).absolute()
        from obliviate.families import get

        self.resolved = _read_json(self.out / "resolved.json") or {}  # see _resolve
        self.resolved_changed = False
        # the family decides what a bare target names (a split, a concept); the base alone may lack that subject
        probe = C.merge(spec.base, {"method": spec.methods[0].name})
        target = spec.validation
        if isinstance(target, str):
            as_concept = self._resolve(C.merge(probe, {"concept": target}), None, quiet=True)
            target = {"concept" if as_concept and as_concept["family"] == "t2i" else "split": target}
        self.family = self._resolve(C.merge(probe, target), f"{source}: base")["family"]
        self.subject = get(self.family).subject

    # ---- targets ----
    def target(self, t) -> dict:
        return {self.subject: t} if isinstance(t, str) else dict(t)

    def label(self, t) -> str:
        t = self.target(t)
        for key in (self.subject, "forget_file", "forget_prompts"):
            if t.get(key):
                return Path(str(t[key])).name if key != self.subject else str(t[key])
        return json.dumps(t, sort_keys=True, default=str)

    def _data(self, target, method, params: dict, seed: int | None) -> dict:
        data = C.merge(self.spec.base, self.target(target))
        data = C.merge(data, method.overrides)
        data = C.merge(data, params)
        data["method"] = method.name
        if seed is not None:
            C.set_dotted(data, "train.seed", seed)
        return data

    def _resolve(self, data: dict, source: str | None, quiet: bool = False) -> dict | None:
        """The resolved run config (RunConfig.dump()) of config data. Resolving a world config imports the world's
        training code (torch: seconds), so resolutions are remembered in OUT/resolved.json, keyed by the data and
        the config code itself: a resumed bench whose cells are all done starts in well under a second."""
        key = C.content_hash(data, _config_fingerprint())
        if key not in self.resolved:
            try:
                self.resolved[key] = C.resolve(data, source or "config").dump()
            except ObliviateError:
                if quiet:
                    return None
                raise
            self.resolved_changed = True
        return copy.deepcopy(self.resolved[key])

    def save_resolved(self) -> None:
        if self.resolved_changed:
            from obliviate.runs import write_json
            write_json(self.out / "resolved.json", self.resolved)
            self.resolved_changed = False

    def _cell(self, kind, row, params, target, seed, data, **extra) -> C.Cell:
        config = self._resolve(data, f"{self.source}: {kind} cell of {row}")
        return C.make_cell(kind, row, params, self.label(target), seed, config, self.out, **extra)

    # ---- the cells ----
    def validation_cells(self) -> list[C.Cell]:
        seed = self.spec.seeds[0]
        return [self._cell("validation", m.row, p, self.spec.validation, seed,
                           self._data(self.spec.validation, m, p, seed))
                for m in self.spec.methods for p in _grid_points(m.grid)]

    def reference_targets(self) -> list:
        targets, seen = [], set()
        for t in [*self.reported_targets(), *self.spec.scalability, *self.spec.sustainability]:
            text = json.dumps(self.target(t), sort_keys=True, default=str)
            if text not in seen:
                seen.add(text)
                targets.append(t)
        return targets

    def reference_cells(self) -> list[C.Cell]:
        out = []
        for t in self.reference_targets():
            for s in self.spec.noise_floor:
                data = C.merge(self.spec.base, self.target(t))
                data.update(method="Retrain", method_args={"seed": s})
                out.append(self._cell("reference", "Retrain", {"method_args.seed": s}, t, None, data,
                                      size=_size(self.label(t))))
        return out

    def chosen(self, selection: dict) -> list[tuple]:
        """(method spec, chosen params) of every method that has a chosen setting."""
        return [(m, selection[m.row]["chosen"]) for m in self.spec.methods
                if selection.get(m.row, {}).get("chosen") is not None]

    def reported_targets(self) -> list:
        return [self.spec.reported, *self.spec.also_reported]

    def reported_cells(self, selection: dict) -> list[C.Cell]:
        return [self._cell("reported", m.row, p, t, s, self._data(t, m, p, s))
                for t in self.reported_targets() for m, p in self.chosen(selection) for s in self.spec.seeds]

    def scalability_cells(self, selection: dict) -> list[C.Cell]:
        seed = self.spec.seeds[0]
        return [self._cell("scalability", m.row, p, t, seed, self._data(t, m, p, seed), size=_size(self.label(t)))
                for m, p in self.chosen(selection) if m.scalability for t in self.spec.scalability]

    def sustainability_cells(self, selection: dict) -> list[list[C.Cell]]:
        """Per request (in order), one cell per method: request k starts from request k-1's exported model and has
        request k-1's target as `forgotten_before`; request 1 starts from the original."""
        seed, requests = self.spec.seeds[0], self.spec.sustainability
        chains = []
        for m, p in self.chosen(selection):
            if not m.sustainability:
                continue
            chain = []
            for k, t in enumerate(requests, start=1):
                data = self._data(t, m, p, seed)
                extra = {}
                if chain:
                    prev = chain[-1]
                    export = self.out / "cells" / prev.key / "export"
                    data["model"] = str(export)
                    data["forgotten_before"] = self.label(requests[k - 2])
                    extra = {"export": {"run": str(self.out / "cells" / prev.key), "to": str(export)},
                             "after": [prev.key]}
                chain.append(self._cell("sustainability", m.row, p, t, seed, data, request=k,
                                        size=_size(self.label(t)), **extra))
            chains.append(chain)
        return [list(cells) for cells in zip(*chains)] if chains else []

    # ---- selection ----
    def select(self, validation: list[C.Cell]) -> dict:
        """Per method, the candidate the rule prefers among the VALIDATION cells (reported cells are never read)."""
        rule = self.spec.select
        constraints = rule.parsed
        steps = (self.spec.base.get("train") or {}).get("eval_every") is not None
        selection = {}
        for m in self.spec.methods:
            candidates = []
            for cell in [c for c in validation if c.method == m.row]:
                record = C.read_record(self.out, cell.key)
                if record is None or record["status"] != "done":
                    candidates.append({"params": cell.params, "cell": cell.key, "score": None, "eligible": False,
                                       "status": "failed" if record else "missing",
                                       "reason": record["reason"] if record else "not run yet"})
                    continue
                for step, metrics in _points(self.out / "cells" / cell.key, steps):
                    score = metrics.get(rule.metric)
                    score = score if _finite(score) else None
                    why = [w for ok, w in (c.check(metrics) for c in constraints) if not ok]
                    if score is None:
                        why.insert(0, f"no finite {rule.metric}")
                    params = {**cell.params, **({"train.max_steps": step} if step is not None else {})}
                    candidates.append({"params": params, "cell": cell.key, "step": step, "score": score,
                                       "eligible": not why, "status": "done", "reason": "; ".join(why) or None})
            selection[m.row] = _choose(candidates, rule, steps)
        return selection


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_FINGERPRINT: list = []


def _config_fingerprint() -> str:
    """The code that resolves a run config (its defaults): a resolution remembered under another one is not used."""
    if not _FINGERPRINT:
        import hashlib
        import importlib.util

        from obliviate import __version__
        digest = hashlib.sha256(__version__.encode())
        for module in ("obliviate.config", "obliviate.families", "obliviate.registry"):
            origin = importlib.util.find_spec(module).origin
            digest.update(Path(origin).read_bytes())
        _FINGERPRINT.append(digest.hexdigest())
    return _FINGERPRINT[0]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _points(run: Path, steps: bool) -> list[tuple[int | None, dict]]:
    """(step, metrics) of a validation cell: its final metrics, or with train.eval_every each evaluated step after
    step 0 (step 0 is the original model), the original's row kept beside for relative constraints."""
    metrics = json.loads((run / "metrics.json").read_text())
    if not steps or not (run / "evaluations.json").is_file():
        return [(None, metrics)]
    evaluations = json.loads((run / "evaluations.json").read_text())
    return [(int(e["step"]), {**e["metrics"], "original": metrics.get("original")})
            for e in evaluations if int(e["step"]) > 0]


def _choose(candidates: list[dict], rule, steps: bool) -> dict:
    better = max if rule.maximize else min
    eligible = [c for c in candidates if c["eligible"]]
    scored = [c for c in candidates if c["score"] is not None]
    pool, met = (eligible, True) if eligible else (scored, False)
    entry = {"rule": rule.words(), "chosen": None, "chosen_cell": None, "score": None, "margin": None,
             "met_rule": met and bool(pool), "candidates": candidates}
    if not pool:
        entry["note"] = "no validation cell finished: nothing to report for this method"
        return entry
    best = better(pool, key=lambda c: c["score"])  # the first in grid order on a tie
    rest = [c for c in pool if c is not best]
    runner_up = better(rest, key=lambda c: c["score"]) if rest else None
    entry.update(chosen=best["params"], chosen_cell=best["cell"], score=best["score"],
                 margin=abs(best["score"] - runner_up["score"]) if runner_up else None,
                 runner_up=runner_up["params"] if runner_up else None)
    if not met:
        entry["note"] = ("no candidate met the rule's constraints; the best score among all was taken, and its "
                         "reported cells show whether it meets them")
    if steps:
        entry["step_note"] = ("the step is a candidate too (train.eval_every): the chosen step runs on the reported "
                              "target as train.max_steps = that step; a run is deterministic for its seed, so with "
                              "no warm-up it takes the same first steps as the longer run evaluated along the way")
    return entry


# ---- running cells -------------------------------------------------------------------------------------------------

def run_cells(bench: Bench, cells: list[C.Cell], opts: dict, log, retried: set) -> None:
    """Run every cell that has no record (or a failed one, with retry_failed); each worker takes its cell's lock
    before it runs it, so that a cell another bench process holds comes back "busy" and is waited for. A failed
    earlier request fails its later ones."""
    out = bench.out
    todo = []
    for cell in cells:
        retry = opts["retry_failed"] and cell.key not in retried
        if C.settled(C.read_record(out, cell.key), retry):
            continue
        failed_before = [k for k in cell.after if (r := C.read_record(out, k)) is None or r["status"] != "done"]
        if failed_before:
            reason = (C.read_record(out, failed_before[0]) or {}).get("reason") or "did not finish"
            C.write_record(out, cell.record(status="failed", reason=f"the previous request failed: {reason}",
                                            seconds=0.0))
            continue
        retried.add(cell.key)
        todo.append((cell, retry))
    busy = _execute(bench, todo, opts, log) if todo else []
    for cell in busy:
        while C.read_record(out, cell.key) is None:
            holder = C.lock_holder(out, cell.key)
            if holder is None or C.lock_is_stale(holder):  # released without a record, or its process died
                run_cells(bench, [cell], opts, log, retried)
                break
            time.sleep(POLL_S)


def _execute(bench: Bench, todo: list[tuple[C.Cell, bool]], opts: dict, log) -> list[C.Cell]:
    """Run the cells through obliviate.bench.execute; returns those another process holds."""
    import secrets

    from obliviate.bench.execute import execute

    out, by_key, seen, busy = bench.out, {c.key: c for c, _ in todo}, set(), []
    token = secrets.token_hex(8)  # marks this run's locks: a lock left by a worker that died is removed
    log(f"running {len(todo)} cell(s): " + ", ".join(f"{c.kind} {c.method} {c.target}" for c, _ in todo[:4])
        + (" ..." if len(todo) > 4 else ""))
    tasks = [{**c.task(out), "retry": retry, "token": token} for c, retry in todo]
    for result in execute(tasks, C.run_one, workers=opts["workers"], ray_address=opts["ray_address"],
                          use_ray=opts["use_ray"], threads=opts["threads"]):
        key = (result.get("key") or (result.get("task") or {}).get("key")) if isinstance(result, dict) else None
        cell = by_key.get(key)
        if cell is None:
            continue
        seen.add(key)
        if result.get("status") == "busy":
            busy.append(cell)
            continue
        record = C.read_record(out, key)
        if record is None:  # the worker died before it wrote the record: the result says why
            record = cell.record(status="failed", reason=result.get("reason") or "the cell's worker ended "
                                 "without a result", seconds=result.get("seconds"))
            C.write_record(out, record)
            C.remove_lock_of(out, key, token)
        log(f"  {record['status']:<6} {cell.kind:<14} {cell.method:<12} {cell.target:<10} {cell.params}"
            + (f": {record['reason']}" if record["reason"] else ""))
    for key in by_key.keys() - seen:  # execute ended without a result for these: their workers died
        if C.read_record(out, key) is None:
            C.write_record(out, by_key[key].record(status="failed", reason="the cell's worker ended without a "
                                                                            "result"))
            C.remove_lock_of(out, key, token)
    return busy


def attack_one(task: dict) -> dict:
    """The spec's attacks on one reported cell (obliviate attack), each once; returns {key, attacks: {name: status}}."""
    from obliviate.run_actions import attack_run

    run = Path(task["out"]) / "cells" / task["key"]
    status = {}
    for name, options in task["attacks"].items():
        if (run / "attacks" / f"{name}.json").is_file():
            status[name] = "done"
            continue
        try:
            attack_run(run, [name], dict(options), log=lambda *_: None)
            status[name] = "done"
        except Exception as e:  # recorded, the grid goes on
            status[name] = f"failed: {C.one_line(e)}"
    return {"key": task["key"], "attacks": status}


def _run_attacks(bench: Bench, reported: list[C.Cell], opts: dict, log) -> None:
    from obliviate.bench.execute import execute

    out, attacks = bench.out, bench.spec.attacks
    todo = []
    for cell in reported:
        record = C.read_record(out, cell.key)
        if record is None or record["status"] != "done":
            continue
        done = record.get("attacks") or {}
        if all(done.get(a) == "done" or (done.get(a, "").startswith("failed") and not opts["retry_failed"])
               for a in attacks):
            continue
        if C.try_lock(out, cell.key + "-attacks"):
            todo.append({"key": cell.key, "out": str(out), "attacks": attacks})
    if not todo:
        return
    log(f"attacking {len(todo)} reported cell(s): {', '.join(attacks)}")
    try:
        for result in execute(todo, attack_one, workers=opts["workers"], ray_address=opts["ray_address"],
                              use_ray=opts["use_ray"], threads=opts["threads"]):
            if isinstance(result, dict) and result.get("attacks"):
                record = C.read_record(out, result["key"])
                C.write_record(out, {**record, "attacks": result["attacks"]})
    finally:
        for task in todo:
            C.unlock(out, task["key"] + "-attacks")


# ---- the command ---------------------------------------------------------------------------------------------------

def default_out(spec: BenchSpec, path: Path) -> Path:
    return Path("runs") / f"bench-{spec.name or path.stem}"


def run_bench(spec_path: str | Path, out: str | Path | None = None, *, workers: int = 1, use_ray: bool = False,
              ray_address: str | None = None, threads: int | None = None, retry_failed: bool = False,
              dry_run: bool = False, overrides: list[str] = (), log=print) -> dict:
    """Run (or with dry_run, list) a bench spec's cells into `out`; returns {"out", "cells": [records or plans],
    "selection"}."""
    spec_path = Path(spec_path)
    spec, data = read_spec(spec_path, list(overrides))
    out = Path(out) if out is not None else default_out(spec, spec_path)
    if out.exists() and not out.is_dir():
        raise ObliviateError(f"--out {out} is not a folder")
    bench = Bench(spec, data, str(spec_path), out)
    opts = {"workers": workers, "use_ray": use_ray, "ray_address": ray_address, "threads": threads,
            "retry_failed": retry_failed}
    validation, references = bench.validation_cells(), bench.reference_cells()
    if dry_run:
        return _dry_run(bench, validation, references, log)
    (bench.out / "cells").mkdir(parents=True, exist_ok=True)
    bench.save_resolved()
    _write_bench_json(bench)
    retried: set = set()
    run_cells(bench, validation + references, opts, log, retried)
    selection = bench.select(validation)
    from obliviate.runs import write_json
    write_json(bench.out / "selection.json", selection)
    for row, entry in selection.items():
        log(f"selected for {row}: {entry['chosen']} (score {entry['score']}, margin {entry['margin']})"
            + ("" if entry["met_rule"] else f" — {entry.get('note')}"))
    reported = bench.reported_cells(selection)
    requests = bench.sustainability_cells(selection)
    bench.save_resolved()
    run_cells(bench, reported + bench.scalability_cells(selection) + (requests[0] if requests else []), opts, log,
              retried)
    for later in requests[1:]:
        run_cells(bench, later, opts, log, retried)
    if spec.attacks:
        _run_attacks(bench, reported, opts, log)
    every = validation + references + reported + bench.scalability_cells(selection) + [c for r in requests for c in r]
    # the cells of this grid: a changed spec leaves its earlier cells in cells/ (a spec changed back reuses them),
    # and the leaderboard must not count them
    _write_bench_json(bench, [c.key for c in every])
    from obliviate.bench.leaderboard import write_leaderboard
    write_leaderboard(bench.out)
    records = [C.read_record(bench.out, c.key) for c in every]
    failed = sum(1 for r in records if r and r["status"] == "failed")
    log(f"bench {bench.out}: {len(records)} cells, {failed} failed; leaderboard {bench.out / 'leaderboard.md'}")
    return {"out": bench.out, "cells": records, "selection": selection}


def _write_bench_json(bench: Bench, cells: list[str] | None = None) -> None:
    from obliviate import __version__
    from obliviate.runs import write_json

    path = bench.out / "bench.json"
    created = None
    if path.is_file():
        try:
            created = json.loads(path.read_text()).get("created")
        except (OSError, ValueError):
            pass
    write_json(path, {"name": bench.spec.name or Path(bench.source).stem, "family": bench.family,
                      "spec": bench.spec.model_dump(), "source": bench.source,
                      "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "obliviate_version": __version__, "cells": cells})


def _dry_run(bench: Bench, validation: list, references: list, log) -> dict:
    def status(cell):
        record = C.read_record(bench.out, cell.key)
        return record["status"] if record else "to run"

    plan = []

    def show(cells):
        for c in cells:
            plan.append({"key": c.key, "kind": c.kind, "method": c.method, "params": c.params, "target": c.target,
                         "seed": c.seed, "request": c.request, "status": status(c)})
            log(f"{c.key}  {status(c):<7} {c.kind:<14} {c.method:<12} {c.target:<10} seed {c.seed} "
                + (f"request {c.request} " if c.request else "") + json.dumps(c.params, default=str))
    show(validation + references)
    selection = None
    if all(status(c) != "to run" for c in validation):
        selection = bench.select(validation)
        requests = bench.sustainability_cells(selection)
        show(bench.reported_cells(selection) + bench.scalability_cells(selection) + [c for r in requests for c in r])
    else:
        n = sum(len(bench.spec.seeds) * len(bench.reported_targets()) + len(bench.spec.scalability) * m.scalability
                + len(bench.spec.sustainability) * m.sustainability for m in bench.spec.methods)
        log(f"(after the validation grid and selection: up to {n} reported, scalability and sustainability cells)")
    done = sum(1 for p in plan if p["status"] == "done")
    log(f"{len(plan)} cells listed, {done} done")
    return {"out": bench.out, "cells": plan, "selection": selection}
