"""One call that evaluates a causal LM the way TOFU and MUSE do, keeping every per-item value.

`evaluate_lm` runs, per question-answer set: one batched forward pass per chunk of items for all likelihood metrics,
one batched greedy generation for ROUGE-L / exact answer / KnowMem; for the forget set one more batched generation on
paraphrased questions; membership inference on forget vs holdout texts; VerbMem on forget texts.
`compare_to_retrain` adds the numbers that need the retrain model (forget quality, PrivLeak), so the retrain model
is evaluated once and every method's result is compared with it. What is computed from those shared inputs is the
language-model metrics declared in `registry.METRICS` (each with its function in `evals/lm_metrics.py`), those whose
inputs exist: adding a metric is one declaration and one function. Formulas: docs/metrics.md."""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from obliviate import distributed
from obliviate import progress as progress_bars
from obliviate import registry
from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError
from obliviate.evals import lm_metrics as LM
from obliviate.evals import metrics as M
from obliviate.evals import mia as MIA
from obliviate.evals import muse as MUSE
from obliviate.evals import tofu as TOFU
from obliviate.evals.restor import RESTOR_SET

# more greedy answers than this fraction running to max_new_tokens without an end id is warned about: the model
# likely does not stop where generation expects it to (an end-of-turn token no one declared), or the limit is short
AT_LIMIT_WARN_FRACTION = 0.05


def _scored(metrics, value, into: dict | None = None) -> dict:
    """{name: metric(value)} of declared metrics (their functions), leaving out those that answer SKIP; written into
    `into` (a run's aggregate) as they come, so a metric can read those before it."""
    out = {} if into is None else into
    for m in metrics:
        v = m.load()(value)
        if v is not LM.SKIP:
            out[m.name] = v
    return out


def _inputs_present(per_item: Mapping, aggregate: Mapping, config: Mapping) -> set[str]:
    """The shared inputs (registry.NEEDS) an evaluation's results hold, for its run metrics."""
    forget, retain = config.get("forget_set_name"), config.get("retain_set_name")
    present = {"logprobs", "generations"} if per_item else set()  # none: the harness's tasks alone (text corpora)
    present |= {"forget_set"} if forget in per_item else set()
    present |= {"retain_set"} if retain in per_item else set()
    present |= {"restor_set"} if RESTOR_SET in per_item else set()
    if isinstance(aggregate.get(forget), dict) and "paraphrased_accuracy" in aggregate[forget]:
        present.add("paraphrased_generations")
    if any(per_item.get(n) for n in config.get("utility_set_names", ())):
        present.add("utility_sets")
    present |= {"membership"} if "mia" in aggregate else set()
    return present | ({"verbmem"} if "verbmem" in aggregate else set())


def evaluate_lm(model, tokenizer, qa_sets: Mapping[str, Sequence[QAItem]],
                forget_texts: Sequence[TextItem] | None = None, holdout_texts: Sequence[TextItem] | None = None, *,
                verbmem_texts: Sequence[TextItem] | None = None,
                forget_set_name: str = "forget", retain_set_name: str = "retain", holdout_set_name: str = "holdout",
                utility_set_names: Collection[str] | None = None, normalised_prob_sets: Collection[str] | None = None,
                reference_model=None, reference_tokenizer=None, mia_attacks: Sequence[str] | None = None,
                gradnorm: bool = False, min_k: float = M.DEFAULT_MIN_K, batch_size: int = 32,
                max_new_tokens: int = 48, verbmem_max_new_tokens: int = 128, max_length: int = 512,
                max_logit_tokens: int = M.DEFAULT_MAX_LOGIT_TOKENS, sharded: bool = False, harness=None,
                progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Evaluate `model` on question-answer sets and (optionally) forget / holdout texts. Returns a JSON-serialisable dict:

    per_item: {set: [{question, answer, generated, answer_prob, truth_ratio, rouge_l_recall, exact_answer,
               exact_memorization, extraction_strength, min_k, min_k_plus_plus, ...}]}
    per_text: membership scores of forget/holdout texts, VerbMem generations
    aggregate: {set: {means of its item metrics, its set metrics}, model_utility, model_utility_components,
                forget_truth_ratio_score, mia: {attack: AUC}, verbmem, knowmem_forget, knowmem_retain, forget_accuracy,
                retain_accuracy, ...}: the lm metrics of registry.METRICS whose inputs exist, in declaration order
    forward_passes: calls of `model` (every decoding step counts one), forward_passes_by_stage: the split.

    utility_set_names: sets in model utility (default: every set but the forget and holdout sets).
    normalised_prob_sets: sets whose probability score is P(y)/(P(y)+sum_j P(perturbed_j)) (default: the sets whose
    items come from world_facts, real_authors or general_facts). mia_attacks: default loss, zlib, min_k,
    min_k_plus_plus, plus reference when a reference_model is given; gradnorm=True adds the (slow) GradNorm attack.
    forget_texts / holdout_texts: the membership-inference members and non-members (texts, or question-answer items
    scored on their answers); verbmem_texts: texts whose prefix is continued for VerbMem (default: forget_texts).
    max_logit_tokens: no forward pass holds logits for more tokens than this (memory: about max_logit_tokens x
    vocabulary x 4 bytes at the peak, whatever the batch size). A progress bar counts the items, batch by batch;
    progress: also called as progress(stage, done, total) after each stage.
    sharded: under data parallel (obliviate.distributed), every process calls this together and scores its share of
    every set and text list; the per-item values are gathered, so each process returns the whole evaluation.
    harness: a config.HarnessConfig: lm-evaluation-harness's WMDP / MMLU tasks on local files (evals/harness.py), the
    declared metrics that need "harness" (wmdp_bio_acc, mmlu_acc, ...) and the result's "harness" (every task's
    numbers and questions); every process runs it whole."""
    sharding = sharded and distributed.active()

    def share(xs) -> list:  # this process's items: all of them, or every world_size-th from its rank
        return list(xs)[distributed.rank()::distributed.world_size()] if sharding else list(xs)
    if verbmem_texts is None:  # question-answer members have no text to continue
        verbmem_texts = [t for t in forget_texts or () if isinstance(t, TextItem)]
    unknown = [n for n in (utility_set_names or ()) if n not in qa_sets]
    if unknown:
        raise ObliviateError(f"utility set(s) {unknown} not among the QA sets {list(qa_sets)}")
    if utility_set_names is None:  # the corrupted world's right facts (RESTOR) are read by recovery, not utility
        utility_set_names = [n for n in qa_sets if n not in (forget_set_name, holdout_set_name, RESTOR_SET)]
    if normalised_prob_sets is None:
        normalised_prob_sets = [n for n, items in qa_sets.items()
                                if items and all(it.source in TOFU.NORMALISED_PROB_SOURCES for it in items)]
    attacks = list(mia_attacks) if mia_attacks is not None else list(MIA.DEFAULT_ATTACKS) + (
        ["reference"] if reference_model is not None else [])
    if gradnorm and "gradnorm" not in attacks:
        attacks.append("gradnorm")
    run_mia = bool(forget_texts) and bool(holdout_texts) and bool(attacks)

    stages = [f"{n}:{s}" for n in qa_sets for s in ("likelihood", "generation")]
    if forget_set_name in qa_sets and any(it.paraphrased_question for it in qa_sets[forget_set_name]):
        stages.append(f"{forget_set_name}:paraphrased_generation")
    stages += (["mia"] if run_mia else []) + (["verbmem"] if verbmem_texts else []) + (["harness"] if harness else [])
    by_stage: dict[str, int] = {}
    done = 0
    # the bar counts items (each set's items twice: likelihood and generation), so it moves within a long stage
    n_items = sum(2 * len(share(items)) for items in qa_sets.values()) + len(
        [it for it in share(qa_sets.get(forget_set_name, ())) if it.paraphrased_question]) + (
        len(share(forget_texts)) + len(share(holdout_texts)) if run_mia else 0) + len(share(verbmem_texts or ()))

    def stage(name: str, counter: M.ForwardCounter) -> None:
        nonlocal done
        by_stage[name] = counter.n
        done += 1
        advance(0, stage=name)
        if progress is not None:
            progress(name, done, len(stages))

    answer_metrics = registry.computed("lm", "item", ("generations",))
    inputs: dict[str, dict] = {}  # the raw results of the shared inputs the run metrics read
    was_training = model.training
    model.eval()
    per_item: dict[str, list[dict]] = {}
    per_text: dict[str, object] = {}
    aggregate: dict[str, object] = {}
    try:
        with M.count_forward_passes(model) as total, progress_bars.bar("evaluate", n_items) as advance:
            for name, items in qa_sets.items():
                items = share(items)
                with M.count_forward_passes(model) as c:
                    lik = M.likelihood_metrics(model, tokenizer, items, batch_size, k=min_k, max_length=max_length,
                                               max_logit_tokens=max_logit_tokens,
                                               progress=_stepper(advance))
                stage(f"{name}:likelihood", c)
                with M.count_forward_passes(model) as c:
                    at_limit: list[bool] = []
                    gen = M.greedy_answers(model, tokenizer, [it.question for it in items], max_new_tokens, batch_size,
                                           on_batch=advance, at_limit=at_limit)
                stage(f"{name}:generation", c)
                per_item[name] = [{"question": it.question, "answer": it.answer, "generated": g, **lik_row,
                                   **_scored(answer_metrics, LM.Generation(g, it.answer, a))}
                                  for it, g, a, lik_row in zip(items, gen, at_limit, lik)]

            forget_items = share(qa_sets.get(forget_set_name, ()))
            para = [(i, it) for i, it in enumerate(forget_items) if it.paraphrased_question]
            if para:
                with M.count_forward_passes(model) as c:
                    para_at_limit: list[bool] = []
                    pgen = M.greedy_answers(model, tokenizer, [it.paraphrased_question for _, it in para],
                                            max_new_tokens, batch_size, on_batch=advance, at_limit=para_at_limit)
                stage(f"{forget_set_name}:paraphrased_generation", c)
                para_metrics = registry.computed("lm", "item", ("paraphrased_generations",))
                for (i, it), g, a in zip(para, pgen, para_at_limit):
                    per_item[forget_set_name][i].update(
                        paraphrased_question=it.paraphrased_question, generated_paraphrased=g,
                        **_scored(para_metrics, LM.Generation(g, it.answer, a)))

            if run_mia:
                mia_args = dict(reference_model=reference_model, reference_tokenizer=reference_tokenizer, k=min_k,
                                batch_size=batch_size, max_length=max_length, max_logit_tokens=max_logit_tokens)
                with M.count_forward_passes(model) as c:
                    if not sharding:
                        res = MIA.mia_aucs(model, tokenizer, list(forget_texts), list(holdout_texts), attacks,
                                           **mia_args)
                    else:  # each process scores its share; the AUCs are taken on every score, gathered
                        members = _gathered(MIA.mia_scores(model, tokenizer, share(forget_texts), attacks, **mia_args))
                        others = _gathered(MIA.mia_scores(model, tokenizer, share(holdout_texts), attacks, **mia_args))
                        res = {"auc": {a: MIA.mia_auc(members[a], others[a]) for a in attacks}, "members": members,
                               "nonmembers": others}
                advance(len(share(forget_texts)) + len(share(holdout_texts)))
                stage("mia", c)
                inputs["membership"] = res
                per_text["mia_forget"] = res["members"]
                per_text["mia_holdout"] = res["nonmembers"]

            if verbmem_texts:
                with M.count_forward_passes(model) as c:
                    vm = MUSE.verbmem(model, tokenizer, share(verbmem_texts), verbmem_max_new_tokens, batch_size,
                                      on_batch=advance)
                    if sharding:
                        vm["per_item"] = _interleaved(vm["per_item"])
                        vm["value"] = float(np.mean([r["rouge_l_f1"] for r in vm["per_item"]]))
                stage("verbmem", c)
                inputs["verbmem"] = vm
                per_text["verbmem"] = vm["per_item"]

            if harness is not None:
                from obliviate.evals.harness import run_harness

                with M.count_forward_passes(model) as c:
                    inputs["harness"] = run_harness(model, tokenizer, harness)
                stage("harness", c)
        if sharding:
            per_item = {name: _interleaved(rows) for name, rows in per_item.items()}
    finally:
        model.train(was_training)

    config = {"forget_set_name": forget_set_name, "retain_set_name": retain_set_name,
              "holdout_set_name": holdout_set_name, "utility_set_names": list(utility_set_names),
              "normalised_prob_sets": list(normalised_prob_sets), "mia_attacks": attacks if run_mia else [],
              "min_k": min_k, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "verbmem_max_new_tokens": verbmem_max_new_tokens, "max_length": max_length,
              "max_logit_tokens": max_logit_tokens, "processes": distributed.world_size() if sharding else 1}
    # ---- aggregates: each set's block (the means of its item metrics, then its set metrics), then the run's
    for name, rows in per_item.items():
        scored = LM.SetRows(name, rows, forget=name == forget_set_name, normalised=name in normalised_prob_sets)
        present = {"logprobs", "generations"} | (
            {"paraphrased_generations"} if scored.forget and any("generated_paraphrased" in r for r in rows) else set())
        block = {m.name: LM.mean(r.get(m.name) for r in rows) for m in registry.computed("lm", "item", present)
                 if m.aggregate == registry.MEAN}
        aggregate[name] = {**block, **_scored(registry.computed("lm", "set", present), scored)}
    present = _inputs_present(per_item, aggregate, config) | set(inputs)
    _scored(registry.computed("lm", "run", present), LM.Evaluation(per_item, aggregate, config, inputs), into=aggregate)
    _warn_answers_at_limit(aggregate, max_new_tokens)

    return {
        "per_item": per_item,
        "per_text": per_text,
        "aggregate": aggregate,
        "forward_passes": total.n,  # this process's (each of several processes scores its share)
        "forward_passes_by_stage": by_stage,
        "config": config,
        **({"harness": inputs["harness"]} if "harness" in inputs else {}),
    }


def _warn_answers_at_limit(aggregate: Mapping, max_new_tokens: int) -> None:
    """More than AT_LIMIT_WARN_FRACTION of the greedy answers (every set's, the paraphrased questions' too) ran to
    max_new_tokens without an end id (aggregate.answers_at_token_limit of answers_generated): warned about, as a cut
    input is, since their ROUGE and accuracy then measure the limit, not the model."""
    n, hit = aggregate.get("answers_generated"), aggregate.get("answers_at_token_limit")
    if n and hit > AT_LIMIT_WARN_FRACTION * n and distributed.is_main():
        warnings.warn(f"{hit} of {n} greedy answers ({hit / n:.0%}) ran to max_new_tokens "
                      f"({max_new_tokens}) without an end token: the model may end its turn with a token no one "
                      "declared (prompt_format.stop_tokens in metrics.json lists those generation stops on), or "
                      "its answers are longer than the limit", stacklevel=3)


def _stepper(advance):
    """A progress(done, total) callback that advances a bar by what was done since its last call."""
    last = [0]

    def progress(done: int, _total: int) -> None:
        advance(done - last[0])
        last[0] = done
    return progress


def _interleaved(rows: list) -> list:
    """Every process's rows of a list dealt round-robin (process r had items r, r + N, ...), back in the list's order."""
    import torch.distributed as dist

    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, rows)
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(len(p) for p in parts))]


def _gathered(scores: dict[str, list[float]]) -> dict[str, list[float]]:
    return {attack: _interleaved(values) for attack, values in scores.items()}


def compare_to_retrain(result: Mapping, retrain_result: Mapping) -> dict:
    """A copy of `result` whose aggregate gains the declared metrics that need the retrain reference: forget quality
    (KS p-value of the forget-set truth ratios against the retrain model's, with its power keys), privleak (from each
    model's Min-K% AUC, MUSE convention), and a retrain_comparison block."""
    out = copy.deepcopy(dict(result))
    agg = out["aggregate"]
    present = _inputs_present(out["per_item"], agg, result["config"]) | {"retrain"}
    against = [m for m in registry.computed("lm", "run", present) if "retrain" in m.needs]
    _scored(against, LM.Evaluation(out["per_item"], agg, result["config"], retrain=retrain_result), into=agg)
    return out
