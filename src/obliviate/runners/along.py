"""Evaluation along the way (`train.eval_every`): the run's own evaluation of its model before the first step, every
eval_every optimiser steps and after the last, kept in the run folder as `evaluations.json`:
[{"step", "epoch", "metrics"}], "metrics" holding the aggregate keys of metrics.json's top level, so a grid can
choose the step as it chooses any other setting. The loops call `Along.bind(...)` as their `on_eval(step, epoch,
model)` in evaluation mode and without changing the training (`loops.step.evaluate_along`); each family's
factory here says how its model is evaluated, and `write` finishes the numbers once the run knows its references
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


def lm_along(config, world, qa_sets, texts, roles, device: str) -> Along | None:
    """A language-model run's evaluation (`runners.lm.evaluation_of`, the world's retrain model as the membership
    reference as at the end); None without train.eval_every."""
    if not config.train.eval_every:
        return None
    from obliviate.runners.lm import _mia_reference, evaluation_of

    reference = []  # loaded at the first evaluation, kept for the next ones

    def evaluate(model, tokenizer):
        if not reference:
            reference.append(_mia_reference(config, world, None, device))
        return evaluation_of(model, tokenizer, qa_sets, texts, config.eval, reference[0], roles)
    return Along(evaluate)


def lm_metrics(evaluation: dict, retrain_eval: dict | None, original: dict | None) -> dict:
    """metrics.json's aggregate of a language-model evaluation: compared to the retrain reference when there is one,
    its model utility relative to the original's when known."""
    from obliviate.evals.evaluate import compare_to_retrain
    from obliviate.runners.lm import with_utility_ratio

    aggregate = dict((compare_to_retrain(evaluation, retrain_eval) if retrain_eval is not None
                      else evaluation)["aggregate"])
    if original:
        with_utility_ratio({"along": aggregate}, original)
    return aggregate


def mllm_along(config, sets, pictures) -> Along | None:
    """A vision-language run's MLLMU-Bench evaluation (`runners.mllm.evaluation_of`); None without eval_every."""
    if not config.train.eval_every:
        return None
    from obliviate.runners.mllm import evaluation_of

    return Along(lambda model, processor: evaluation_of(model, processor, sets, pictures, config))


def mllm_metrics(evaluation: dict, retrain_eval: dict | None) -> dict:
    from obliviate.evals.mllmu import compare_to_retrain

    return (compare_to_retrain(evaluation, retrain_eval) if retrain_eval is not None else evaluation)["aggregate"]


def t2i_along(config, world, task, pipeline_dir, device: str, evaluators=None) -> Along | None:
    """A text-to-image run's evaluation: the canvas world's (`evaluate_erasure`), or on a user's pipeline the one
    beside its original (`evaluate_user_pipeline`, the original loaded once); None without eval_every."""
    if not config.train.eval_every:
        return None
    t = config.t2i
    only_numbers = lambda evaluation: {"aggregate": evaluation["aggregate"]}  # noqa: E731 (no images kept)
    if world is not None:
        from obliviate.evals.canvas import evaluate_erasure

        return Along(lambda pipe: evaluate_erasure(world, pipe, config.concept, t, label=config.method), only_numbers)
    import torch

    from obliviate.evals.user_pipeline import UserEvaluators, evaluate_user_pipeline
    from obliviate.models.diffusion import load_pipeline

    evaluators = evaluators or UserEvaluators(t, config.concept, device)
    original = []

    def evaluate(pipe):
        if not original:
            original.append(load_pipeline(pipeline_dir, device, getattr(torch, config.dtype)))
        return evaluate_user_pipeline(pipe, original[0], task.forget_prompts, [p.text for p in task.retain_prompts],
                                      config.concept, t, evaluators, label=config.method, log=lambda *_: None)
    return Along(evaluate, only_numbers)
