"""Hazardous knowledge and utility through lm-evaluation-harness (EleutherAI), on local files in the published formats.

WMDP (Li et al. 2024, https://arxiv.org/abs/2403.03218; `cais/wmdp`: question, choices, answer) and MMLU (Hendrycks
et al. 2021; `cais/mmlu`: question, subject, choices, answer), each a zero-shot four-way multiple choice: the harness
scores the log-likelihood of " A" ... " D" after the question and its lettered choices, and `acc` is the share of
questions whose most likely letter is the answer (acc_norm too, for a task that reports it).

The tasks are the harness's own. For each one this writes a YAML that includes the shipped task's YAML
(lm_eval/tasks/wmdp/wmdp_bio.yaml, lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml: its prompt, description, choices,
metrics and version) and replaces only where the data comes from (`dataset_path: parquet` or `json` with
`data_files`), and the groups (wmdp; mmlu over its four categories, each weighted by size as the harness weighs them)
over the tasks whose files exist. So a user who downloaded `cais/wmdp` and `cais/mmlu` gets the numbers that
`lm_eval --tasks wmdp,mmlu` gives with the hub's copies, and nothing is fetched from a hub.

The harness runs on the model already in memory (its `HFLM` wraps the model and tokenizer: the run's device and
dtype, no second copy); its per-question log-likelihoods are kept. The files are read and checked (the schema, every
row) before the harness is imported, so a bad file is one line naming it and its row, at once.
Numbers in the run: metrics.json's `harness` block (task -> acc, acc_stderr, n, ...) and the declared headline keys
(wmdp_acc, wmdp_bio_acc, wmdp_chem_acc, wmdp_cyber_acc, mmlu_acc); the questions' scores in harness.json."""
from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.evals.lm_metrics import SKIP, Evaluation

WMDP_SUBSETS = ("bio", "chem", "cyber")  # cais/wmdp's configs wmdp-bio, wmdp-chem, wmdp-cyber
SCHEMA = ("question", "choices", "answer")  # cais/wmdp's and cais/mmlu's columns the tasks read
LETTERS = 4  # the shipped templates ask A-D
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # file suffix -> the datasets builder


@dataclass
class Task:
    """One harness task on local files: its name, the shipped YAML it includes, its files per split, its tag."""
    name: str
    shipped: Path
    files: dict[str, list[Path]]
    tag: str | None = None


@dataclass
class Plan:
    """What one harness evaluation runs: the tasks with their files, the groups over them, the names asked for."""
    tasks: dict[str, Task] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)  # name -> the group's YAML
    selected: list[str] = field(default_factory=list)


def shipped_tasks() -> Path:
    """lm_eval/tasks of the installed harness (found without importing it)."""
    from obliviate.families import require_extra

    require_extra("lmeval", "lm_eval")
    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def split_files(folder: Path, config: str, split: str) -> list[Path]:
    """A dataset config's files of one split in `folder`: the hub's layout (CONFIG/SPLIT-00000-of-00001.parquet), the
    hub's parquet conversion (CONFIG/SPLIT/0000.parquet), CONFIG/SPLIT.parquet|jsonl|json, or for the test split
    CONFIG.parquet|jsonl|json; [] when none."""
    for suffix in FORMATS:
        found = sorted((folder / config).glob(f"{split}-*{suffix}")) or sorted(
            (folder / config / split).glob(f"*{suffix}")) or [
            p for p in [folder / config / f"{split}{suffix}"] if p.is_file()]
        if found:
            return found
    if split == "test":
        return [p for p in (folder / f"{config}{s}" for s in FORMATS) if p.is_file()][:1]
    return []


def _rows(path: Path) -> list[dict]:
    """The rows of a parquet, JSON-lines or JSON-array file, with the schema's columns checked first."""
    where = f"{path}"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            missing = [c for c in SCHEMA if c not in names]
            if missing:
                raise ObliviateError(f"{where}: no column {missing[0]!r} (the published schema: "
                                     f"{', '.join(SCHEMA)}; this file has {', '.join(names)})")
            return pq.read_table(path, columns=list(SCHEMA)).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ObliviateError(f"{where}: not a readable parquet file ({e})") from None
    from obliviate.data import read_text_file

    text = read_text_file(path, "multiple-choice file")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    where = f"{path}:{n}"
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise ObliviateError(f"{where}: malformed JSON ({e.msg})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ObliviateError(f"{path}: row {n}: expected a JSON object with {', '.join(SCHEMA)}")
        missing = [c for c in SCHEMA if c not in row]
        if missing:
            raise ObliviateError(f"{path}: row {n}: no key {missing[0]!r} (the published schema: {', '.join(SCHEMA)})")
    return rows


def check_file(path: Path) -> int:
    """Every row of a multiple-choice file in the published schema: a question, four choices, the answer's index.
    Returns the number of rows."""
    rows = _rows(path)
    if not rows:
        raise ObliviateError(f"{path}: no questions")
    for n, row in enumerate(rows, 1):
        q, choices, answer = (row[c] for c in SCHEMA)
        if not isinstance(q, str):
            raise ObliviateError(f"{path}: row {n}: 'question' must be a string, got {type(q).__name__}")
        if not (isinstance(choices, list) and len(choices) == LETTERS and all(isinstance(c, str) for c in choices)):
            raise ObliviateError(f"{path}: row {n}: 'choices' must be a list of {LETTERS} strings (the tasks ask "
                                 f"A-D), got {choices!r:.80}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < LETTERS:
            raise ObliviateError(f"{path}: row {n}: 'answer' must be the index of the right choice (0-{LETTERS - 1}), "
                                 f"got {answer!r}")
    return len(rows)


def _one_format(task: str, files: dict[str, list[Path]]) -> str:
    kinds = {FORMATS[p.suffix] for ps in files.values() for p in ps}
    if len(kinds) > 1:
        names = ", ".join(str(p) for ps in files.values() for p in ps)
        raise ObliviateError(f"{task}: its files mix parquet and JSON ({names}); give one format")
    return kinds.pop()


def _safe_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def plan(config) -> Plan:
    """The tasks of a HarnessConfig with their files, every file checked; the groups over the tasks found; the tasks
    asked for (default: the wmdp and mmlu groups). Imports nothing of the harness."""
    root = shipped_tasks()
    out = Plan()
    if config.wmdp_dir:
        folder = Path(config.wmdp_dir)
        if not folder.is_dir():
            raise ObliviateError(f"harness.wmdp_dir: folder not found: {folder}")
        for subset in WMDP_SUBSETS:
            test = split_files(folder, f"wmdp-{subset}", "test")
            if test:
                out.tasks[f"wmdp_{subset}"] = Task(f"wmdp_{subset}", root / "wmdp" / f"wmdp_{subset}.yaml",
                                                   {"test": test})
        if not out.tasks:
            raise ObliviateError(f"harness.wmdp_dir {folder}: no WMDP files (cais/wmdp's layout: "
                                 "wmdp-bio/test-00000-of-00001.parquet, ...; or wmdp-bio.parquet|jsonl|json, ...)")
        group = _safe_yaml(root / "wmdp" / "_wmdp.yaml")
        group["task"] = [t for t in group["task"] if t in out.tasks]
        out.groups["wmdp"] = group
    if config.mmlu_dir:
        folder = Path(config.mmlu_dir)
        if not folder.is_dir():
            raise ObliviateError(f"harness.mmlu_dir: folder not found: {folder}")
        default = root / "mmlu" / "default"
        found = 0
        for shipped in sorted(default.glob("mmlu_*.yaml")):
            spec = _safe_yaml(shipped)
            test = split_files(folder, spec["dataset_name"], "test")
            if test:
                dev = split_files(folder, spec["dataset_name"], "dev")
                out.tasks[spec["task"]] = Task(spec["task"], shipped, {"test": test, **({"dev": dev} if dev else {})},
                                               spec.get("tag"))
                found += 1
        if not found:
            raise ObliviateError(f"harness.mmlu_dir {folder}: no MMLU subject files (cais/mmlu's layout: "
                                 "<subject>/test-00000-of-00001.parquet, e.g. anatomy/test-00000-of-00001.parquet)")
        tags = {t.tag for t in out.tasks.values()}
        top = _safe_yaml(default / "_mmlu.yaml")
        top["task"] = []
        for category in _safe_yaml(default / "_mmlu.yaml")["task"]:  # mmlu_stem, ...: their subjects by tag
            group = _safe_yaml(default / f"_{category}.yaml")
            if set(group["task"]) & tags:
                out.groups[category] = group
                top["task"].append(category)
        out.groups["mmlu"] = top
    fewshot = config.num_fewshot or 0
    for task in out.tasks.values():
        _one_format(task.name, task.files)
        for split, paths in task.files.items():
            for p in paths:
                check_file(p)
        if fewshot and task.name.startswith("mmlu_") and "dev" not in task.files:
            raise ObliviateError(f"{task.name}: num_fewshot = {fewshot} takes its examples from the dev split; no "
                                 f"dev file next to {task.files['test'][0]} (cais/mmlu: <subject>/dev-*.parquet)")
    names = list(out.tasks) + list(out.groups)
    out.selected = list(config.tasks) if config.tasks else [g for g in ("wmdp", "mmlu") if g in out.groups]
    for name in out.selected:
        if name not in names:
            raise ObliviateError(f"harness.tasks: {name!r} has no files here; valid: {', '.join(sorted(names))}")
    return out


def _write_yamls(p: Plan, folder: Path, cache: Path) -> None:
    """One YAML per task (the shipped one, included, with the local files as its data) and per group."""
    import yaml

    for task in p.tasks.values():
        spec = {"include": str(task.shipped), "task": task.name, "dataset_path": _one_format(task.name, task.files),
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {s: [str(f) for f in fs] for s, fs in task.files.items()},
                                   "cache_dir": str(cache)}}
        if task.name.startswith("mmlu_") and "dev" not in task.files:  # zero-shot needs none (checked in plan)
            spec["fewshot_split"] = None
        (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for name, group in p.groups.items():
        (folder / f"_{name}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


@contextmanager
def _quiet_harness():
    """The harness logs every task's set-up at INFO and warns that the model came already loaded (as meant here);
    with obliviate's progress bars off (--quiet), the datasets library's bars go too."""
    import datasets

    from obliviate import progress

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if not progress.enabled():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _numbers(results: dict) -> dict[str, dict]:
    """{task or group: {metric: value, metric_stderr: value, n: questions}} from the harness's results: its
    "metric,filter" keys with the default filter "none" become "metric"; its sample_len becomes n."""
    out: dict[str, dict] = {}
    for name, row in {**results.get("results", {}), **results.get("groups", {})}.items():
        block = {}
        for key, value in row.items():
            metric, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len":
                block[metric if kind in ("none", "") else key] = float(value)
        if isinstance(row.get("sample_len"), (int, float)):
            block["n"] = int(row["sample_len"])
        out[name] = block
    counts = {name: n.get("effective", n.get("original")) for name, n in results.get("n-samples", {}).items()}
    subtasks = results.get("group_subtasks", {})

    def size(name: str) -> int:  # before sample_len (lm-eval < 0.4.12): a task's questions, a group's tasks' sum
        return counts.get(name) or sum(size(s) for s in subtasks.get(name, ()))
    for name, block in out.items():
        block.setdefault("n", size(name))
    return out


def _sample_rows(samples: dict) -> dict[str, list[dict]]:
    """Each task's questions as the harness scored them: the answer's index, the log-likelihood of each letter, and
    the metrics' values (acc, ...)."""
    out = {}
    for task, rows in samples.items():
        kept = []
        for r in rows:
            lls = [float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in r.get("filtered_resps", [])]
            kept.append({"doc_id": r.get("doc_id"), "question": (r.get("doc") or {}).get("question"),
                         "answer": r.get("target"), "loglikelihoods": lls,
                         **{m: float(r[m]) for m in r.get("metrics", ()) if isinstance(r.get(m), (int, float))}})
        out[task] = kept
    return out


def run_harness(model, tokenizer, config) -> dict:
    """lm-evaluation-harness on `model` (already loaded) for a HarnessConfig. Returns {"tasks": {task or group:
    {acc, acc_stderr, n, ...}}, "samples": {task: [per question]}, "selected", "files", "num_fewshot", "limit",
    "lm_eval_version"}."""
    p = plan(config)  # the files first: a bad one fails before the harness's slow import
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="obliviate-harness-") as tmp, _quiet_harness():
            tasks_dir = Path(tmp) / "tasks"
            tasks_dir.mkdir()
            _write_yamls(p, tasks_dir, Path(tmp) / "datasets")
            manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
            wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
            results = lm_eval.simple_evaluate(model=wrapped, tasks=p.selected, task_manager=manager,
                                              num_fewshot=config.num_fewshot, limit=config.limit, log_samples=True)
    except ObliviateError:
        raise
    except Exception as e:  # the harness's own failure on files that passed the checks: one line, its words
        raise ObliviateError(f"lm-evaluation-harness failed on {', '.join(p.selected)}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        model.train(was_training)
    return {"tasks": _numbers(results), "samples": _sample_rows(results.get("samples", {})),
            "selected": p.selected, "files": {t.name: {s: [str(f) for f in fs] for s, fs in t.files.items()}
                                              for t in p.tasks.values()},
            "num_fewshot": config.num_fewshot, "limit": config.limit,
            "lm_eval_version": getattr(lm_eval, "__version__", None)}


def settings(config) -> dict:
    """What a harness evaluation depends on besides the model (for caches): the config and its files' sizes and
    times."""
    def stamp(folder):
        if not folder or not Path(folder).is_dir():
            return None
        return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in Path(folder).rglob("*") if p.suffix in FORMATS)
    return {**config.model_dump(), "files": [stamp(config.wmdp_dir), stamp(config.mmlu_dir)]}


# ---- the declared metrics (registry.METRICS, needs "harness"): functions of an evaluation's harness results --------

def _task(e: Evaluation, task: str, metric: str = "acc"):
    block = (e.inputs.get("harness") or {}).get("tasks", {}).get(task)
    return SKIP if not block or metric not in block else block[metric]


def harness(e: Evaluation):
    tasks = (e.inputs.get("harness") or {}).get("tasks")
    return tasks if tasks else SKIP


def wmdp_acc(e: Evaluation):
    return _task(e, "wmdp")


def wmdp_bio_acc(e: Evaluation):
    return _task(e, "wmdp_bio")


def wmdp_chem_acc(e: Evaluation):
    return _task(e, "wmdp_chem")


def wmdp_cyber_acc(e: Evaluation):
    return _task(e, "wmdp_cyber")


def mmlu_acc(e: Evaluation):
    return _task(e, "mmlu")


def evaluate_harness(model, tokenizer, config) -> dict:
    """The harness's tasks alone (`obliviate eval MODEL --wmdp-dir ...` without question-answer sets): {"aggregate":
    the declared metrics that need "harness", "harness": run_harness's result}."""
    from obliviate import registry

    result = run_harness(model, tokenizer, config)
    e = Evaluation({}, {}, {}, {"harness": result})
    aggregate = {}
    for metric in registry.computed("lm", "run", ("harness",)):
        value = metric.load()(e)
        if value is not SKIP:
            aggregate[metric.name] = value
    return {"aggregate": aggregate, "harness": result}
