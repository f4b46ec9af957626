"""Evaluation along the way (`train.eval_every`): the run's own evaluation of its model before the first step, every
eval_every optimiser steps and after the last, kept in the run folder as `evaluations.json`:
[{"step", "epoch", "metrics"}], "metrics" holding the aggregate keys of metrics.json's top level, so a grid can
choose the step as it chooses any other setting. The loops call `Along.bind(...)` as their `on_eval(step, epoch,
model)` in evaluation mode and without changing the training (`loops.step.evaluate_along`); each family's runner
says how its model is evaluated (`lm_along`, `mllm_along`, `t2i_along`, beside its own evaluation), and `write` finishes the numbers once the run knows its references
(the retrain comparison, the utility ratio), as the run finishes its own. Methods without optimiser steps (closed-form
edits, Retrain) have nothing to evaluate along the way."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


class Along:
    """The evaluations of one run, in the order the loop made them."""

    def __init__(self, evaluate: Callable, keep: Callable = lambda evaluation: evaluation):
        self.evaluate, self.keep = evaluate, keep  # keep: what of an evaluation `write` needs (not its images)
        self.entries: list[tuple[int, float, dict]] = []

    def bind(self, *context) -> Callable:
        """The loop's `on_eval(step, epoch, model)`: `evaluate(model, *context)` (a tokenizer, a processor)."""
        def on_eval(step: int, epoch: float, model) -> None:
            self.entries.append((step, epoch, self.keep(self.evaluate(model, *context))))
        return on_eval

    def write(self, folder: Path, finish: Callable = lambda evaluation: evaluation["aggregate"]) -> None:
        """evaluations.json in the run's (temporary) folder; `finish(evaluation)` gives its metrics. Nothing when the
        loop made no evaluation (a method without optimiser steps)."""
        from obliviate.runs import write_json

        if not self.entries:
            return

        write_json(Path(folder) / "evaluations.json", [{"step": step, "epoch": round(epoch, 4),
                                                        "metrics": finish(evaluation)}
                                                       for step, epoch, evaluation in self.entries])
