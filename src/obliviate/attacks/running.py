"""What every family's attack runner shares: the attacks' base class (`Attack`), running the attacks on a target's
models (each checked first, then run, timed and put in the shared result format of `obliviate.attacks`), and a guard
run's unguarded row. Family-neutral: the language-model and vision-language attack runners (`runners/lm_attack.py`,
`runners/mllm_attack.py`) both call it."""
from __future__ import annotations

import time

from obliviate.errors import ObliviateError


class Attack:
    """The shape every language-model and vision-language attack fills: `run(target, log)` returns {"models": {name:
    aggregate}, "per_item": {name: rows}} (and optionally "curves"); `headline` is the aggregate key the robustness
    tables show, `columns` the keys `obliviate attack` prints. `target` is the family's (attacks/lm/common.py,
    attacks/mllm/common.py)."""
    Config: type
    headline = "recall"
    label = "recall"
    better = "lower"
    columns: tuple[str, ...] = ("recall_plain", "recall", "asr")
    percent: tuple[str, ...] = ("recall_plain", "recall", "asr")

    def __init__(self, config):
        self.config = config

    def check(self, target) -> None:
        """Refuse, in one line, a run the attack cannot serve: called for every attack before any of them runs."""

    def result_name(self, name: str) -> str:
        """The name its result is kept under (RUN_DIR/attacks/<it>.json): the registered name, unless a setting
        makes it another attack."""
        return name

    def run(self, target, log=print) -> dict:
        raise NotImplementedError


def with_unguarded_row(result: dict, method: str) -> None:
    """A guard run's attack result gains "<method> (unguarded)": the run's weights without the guard. A language-model
    or vision-language guard changes no weight and its run starts from the original's, so the row is the original's,
    said in the caption (`obliviate.guards.SAME_WEIGHTS`); the robustness tables show it under the method's row."""
    from obliviate.guards import SAME_WEIGHTS, unguarded_row

    row = unguarded_row(method)
    for key in ("models", "per_item", "curves"):
        if key in result and "original" in result[key]:
            result[key][row] = result[key]["original"]
    result["caption"] = f"{result['caption']}; {SAME_WEIGHTS}" if result.get("caption") else SAME_WEIGHTS


def run_attacks(attacks: dict, target, log=print, announce: bool = False, after_each=None,
                skip_inapplicable: bool = False, family: str = "lm") -> dict:
    """{result name: result} of each attack ({registered name: instance}) on the target's models; what an attack
    cannot serve fails, in one line, before any attack runs, or with `skip_inapplicable` is left out with its reason
    logged ("skipped NAME: reason"; an error when none is left). `after_each(name, result)` keeps each as it
    comes."""
    skipped = {}
    for name, attack in attacks.items():
        try:
            attack.check(target)
        except ObliviateError as e:
            if not skip_inapplicable:
                raise
            skipped[name] = str(e)
    if skipped and len(skipped) == len(attacks):
        raise ObliviateError(f"no attack applies to this run: {'; '.join(skipped.values())}")
    for name, reason in skipped.items():
        log(f"skipped {name}: {reason}")
    attacks = {name: attack for name, attack in attacks.items() if name not in skipped}
    results = {}
    for registered, attack in attacks.items():
        name = attack.result_name(registered)
        if announce:
            log(f"{name}: attacking {', '.join(target.models)}")
        results[name] = run_attack(name, attack, target, log=log if announce else lambda *_: None,
                                   family=family)
        if after_each is not None:
            after_each(name, results[name])
    return results


def with_references(own: dict, references: dict) -> dict:
    """An attack's result on one model joined with the same attack's result on the reference models (run once and
    shared by every method of a demo): the references' rows follow the model's."""
    joined = {**own}
    for key in ("models", "per_item", "curves"):
        if key in own:
            joined[key] = {**own[key], **references.get(key, {})}
    joined["seconds"] = round(own["seconds"] + references["seconds"], 2)
    joined["items_per_second"] = own["items"] * len(joined["models"]) / joined["seconds"] if joined["seconds"] else None
    return joined


def run_attack(name: str, attack, target, log=print, family: str = "lm") -> dict:
    """One attack on the target's models, in the shared result format (obliviate.attacks); `family`: the attacked
    run's."""
    from dataclasses import asdict

    t0 = time.time()
    result = attack.run(target, log=log)
    seconds = time.time() - t0
    n = next(iter(result["models"].values())).get("n", len(target.forget))
    attacked = n * len(target.models)
    return {"attack": name, "family": family, "method": target.method, "config": asdict(attack.config),
            "headline": attack.headline, "label": attack.label, "better": attack.better,
            "columns": list(attack.columns), "percent": list(attack.percent), **result,
            "seconds": round(seconds, 2), "items": n, "items_per_second": attacked / seconds if seconds else None}


def attack_folder(run_dir, config, attacks: dict, target_of, log=print, skip_inapplicable: bool = False,
                  family: str = "lm", guarded_relearn_caption: str | None = None) -> dict:
    """Each attack of `attacks` ({name: instance}) on a run folder's models (`target_of(run_dir, config, log)` builds
    the family's target), each result written to RUN_DIR/attacks/<name>.json (a relearning curve also as a .png, a
    guard run's unguarded row added) and the run's page rewritten; returns {name: result}. With `skip_inapplicable`
    (the default set) an attack the run cannot serve is skipped, with its reason logged. `guarded_relearn_caption`:
    what a relearning result on a guard run says first."""
    from pathlib import Path

    from obliviate.guards import GUARD_FILE
    from obliviate.registry import is_reference
    from obliviate.runs import write_json

    if is_reference(config.method):
        raise ObliviateError("a Retrain run is the retrain reference itself: attack an unlearned run")
    target = target_of(run_dir, config, log)
    out = Path(run_dir) / "attacks"
    out.mkdir(exist_ok=True)
    guarded = (Path(run_dir) / GUARD_FILE).is_file()  # a guard run: its weights without the guard are a row too

    def save(name: str, result: dict) -> None:
        if guarded:
            with_unguarded_row(result, config.method)
            if guarded_relearn_caption and "curves" in result:  # relearning changes weights, with the guard on
                result["caption"] = f"{guarded_relearn_caption}; {result['caption']}"
        write_json(out / f"{name}.json", result)
        if "curves" in result:
            from obliviate.bench.report import save_relearn_plot
            save_relearn_plot(out / f"{name}.png", {config.method: result})

    results = run_attacks(attacks, target, log, announce=True, after_each=save, skip_inapplicable=skip_inapplicable,
                          family=family)
    from obliviate.bench.report import rewrite_report
    rewrite_report(run_dir)  # the run's page shows the attacks
    return results
