"""One table of everything a user can choose by name: methods, metrics and worlds, each with its family ("lm",
"t2i", "mllm") and what a user needs to choose it. Metrics carry their metadata here, once: the aggregate keys
they fill, which way is better, how per-item values aggregate, the scorecard's header and format; the scorecard, the
report and the leaderboard read it from here. Nothing here imports torch or transformers, so `obliviate ls`
answers at once; objects are imported only when a run asks for them."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from obliviate.errors import ObliviateError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:Object"
    description: str
    paper: str = ""
    family: str = "lm"  # the model family it serves ("lm", "t2i", "mllm"; "any" for any family)

    def load(self):
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


ARROWS = {"higher": "↑", "lower": "↓", "zero": "→0", None: ""}


@dataclass(frozen=True)
class Metric(Entry):
    """A metric, declared once. `better`: "higher", "lower", "zero" (closest to 0 is best) or None (a per-item
    score that is read through other metrics). `aggregate`: how per-item values become the reported number."""
    better: str | None = None
    aggregate: str = "mean over items"
    header: str = ""  # the scorecard's column title (no column when empty)
    fmt: str = "{:.3f}"

    @property
    def higher_is_better(self) -> bool | None:
        return {"higher": True, "lower": False}.get(self.better)

    @property
    def column_title(self) -> str:
        return f"{self.header} {ARROWS[self.better]}".strip()


def _table(*entries: Entry) -> dict[str, Entry]:
    return {e.name: e for e in entries}


M = "obliviate.methods."
LM_METHODS = _table(
    Entry("GradAscent", M + "lm.grad_ascent:GradAscent", "Gradient ascent on the forget answers (maximise their NLL).",
          "Jang et al. 2023, Knowledge Unlearning, https://arxiv.org/abs/2210.01504", family="lm"),
    Entry("GradDiff", M + "lm.grad_diff:GradDiff", "Ascent on forget NLL plus descent on retain NLL.",
          "Liu et al. 2022, Continual Learning and Private Unlearning, https://arxiv.org/abs/2203.12817", family="lm"),
    Entry("KL", M + "lm.kl:KL", "Ascent on forget NLL plus KL to the original model on retain answers.",
          "Maini et al. 2024, TOFU, https://arxiv.org/abs/2401.06121", family="lm"),
    Entry("NPO", M + "lm.npo:NPO", "Negative preference optimisation on sequence log-ratios, with a GD or KL retain term.",
          "Zhang et al. 2024, Negative Preference Optimization, https://arxiv.org/abs/2404.05868", family="lm"),
    Entry("SimNPO", M + "lm.simnpo:SimNPO", "Reference-free NPO on length-normalised log-likelihood, plus retain NLL.",
          "Fan et al. 2024, Simplicity Prevails, https://arxiv.org/abs/2410.07163", family="lm"),
    Entry("IdkPO", M + "lm.idkpo:IdkPO", "DPO that prefers an 'I don't know' answer to the true one, plus retain NLL.",
          "Maini et al. 2024, TOFU (IdkDPO), https://arxiv.org/abs/2401.06121", family="lm"),
    Entry("RMU", M + "lm.rmu:RMU", "Steer one layer's activations on forget text to a random vector; keep retain activations.",
          "Li et al. 2024, The WMDP Benchmark, https://arxiv.org/abs/2403.03218", family="lm"),
    Entry("UNDIAL", M + "lm.undial:UNDIAL", "Self-distillation towards the original logits with the true token's logit lowered.",
          "Dong et al. 2024, UNDIAL, https://arxiv.org/abs/2402.10052", family="lm"),
    Entry("RG", M + "lm.restricted_gradient:RG",
          "Restricted gradient: project conflicting forget/retain gradients onto each other's normal plane.",
          "Ko et al. 2024, Boosting Alignment for Post-Unlearning T2I Models, NeurIPS, https://arxiv.org/abs/2412.07808", family="lm"),
    Entry("RGD", M + "lm.restricted_gradient:RGD",
          "Restricted gradient with a diversified, balanced retain set and a truncated forget loss.",
          "Ko et al. 2024, Boosting Alignment for Post-Unlearning T2I Models, NeurIPS, https://arxiv.org/abs/2412.07808", family="lm"),
)

# The retrain reference is not a method (no loss): a run with `method = "Retrain"` takes the built-in world's model
# trained without the forget set (`method_args = {seed = S}`: that recipe with training seed S; 0 is the reference the
# other runs are scored against). Every family's run accepts the name; `obliviate ls` lists it, marked.
RETRAIN = Entry("Retrain", "", "The retrain reference, not a method: the world's model trained without the forget set "
                "(method_args = {seed = S}; seed 0 is the reference every run is scored against).",
                "Maini et al. 2024, TOFU, https://arxiv.org/abs/2401.06121", family="any")


def is_reference(name: str) -> bool:
    """Whether a run's `method` names the retrain reference rather than a method."""
    return name.lower() == RETRAIN.name.lower()

ESD_PAPER = "Gandikota et al. 2023, Erasing Concepts from Diffusion Models, ICCV, https://arxiv.org/abs/2303.07345"
RG_PAPER = "Ko et al. 2024, Boosting Alignment for Post-Unlearning T2I Models, NeurIPS, https://arxiv.org/abs/2412.07808"
# Text-to-image erasure methods: they act on a diffusers UNet (a Stable-Diffusion-shaped pipeline folder).
T2I_METHODS = _table(
    Entry("ESD-x", M + "t2i.esd:ESDx", "Erased Stable Diffusion, cross-attention only: steer eps(c) to eps('') - eta (eps(c) - eps('')).",
          ESD_PAPER, family="t2i"),
    Entry("ESD-u", M + "t2i.esd:ESDu", "Erased Stable Diffusion, every UNet weight except cross-attention (same loss as ESD-x).",
          ESD_PAPER, family="t2i"),
    Entry("UCE", M + "t2i.uce:UCE", "Unified Concept Editing: closed-form edit of the cross-attention key/value projections.",
          "Gandikota et al. 2024, Unified Concept Editing in Diffusion Models, WACV, https://arxiv.org/abs/2308.14761", family="t2i"),
    Entry("SalUn", M + "t2i.salun:SalUn", "Saliency-masked random-label unlearning: the forget prompts' noise prediction goes to a mismatched prompt's.",
          "Fan et al. 2024, SalUn, ICLR, https://arxiv.org/abs/2310.12508", family="t2i"),
    Entry("ConceptAblation", M + "t2i.concept_ablation:ConceptAblation",
          "Map the concept's noise prediction onto an anchor concept's, on the anchor's images.",
          "Kumari et al. 2023, Ablating Concepts in Text-to-Image Diffusion Models, ICCV, https://arxiv.org/abs/2303.13516", family="t2i"),
    Entry("GradDiff", M + "t2i.grad_diff:GradDiff", "Ascent on the denoising loss of forget images, descent on retain images.",
          "Liu et al. 2022, Continual Learning and Private Unlearning, https://arxiv.org/abs/2203.12817", family="t2i"),
    Entry("RG", M + "t2i.grad_diff:RG", "Restricted gradient on GradDiff's forget/retain terms (projection when they conflict).",
          RG_PAPER, family="t2i"),
    Entry("RGD", M + "t2i.grad_diff:RGD", "Restricted gradient with a diversified, balanced retain set and a truncated forget loss.",
          RG_PAPER, family="t2i"),
    Entry("AdvUnlearn", M + "t2i.adv_unlearn:AdvUnlearn", "ESD-x under an adversarial prompt found anew each step (min-max), with a retain regulariser.",
          "Zhang et al. 2024, Defensive Unlearning with Adversarial Training for Robust Concept Erasure, NeurIPS, "
          "https://arxiv.org/abs/2405.15234", family="t2i"),
)

E = "obliviate.evals."
TOFU = "TOFU, https://arxiv.org/abs/2401.06121"
MUSE = "Shi et al. 2024, MUSE, https://arxiv.org/abs/2407.06460"
CANVAS = "Zhang et al. 2024, UnlearnCanvas, https://arxiv.org/abs/2402.11846"
SHARE = "share of items"
MLLMU = "Liu et al. 2025, MLLMU-Bench, NAACL, https://arxiv.org/abs/2410.22108"
MLLMU_TASKS = {"classification": "Multiple-choice accuracy (first letter)",
               "rouge_l": "ROUGE-L F1 of the greedy answer",
               "bleu": "Smoothed sentence BLEU-4 of the greedy answer", "cloze": "Cloze accuracy (value in the answer)",
               "factuality": "Mean 1-10 factuality score of the greedy answer by a local judge model (optional)"}
# set -> (what it is, which way is better: the forget sets are best at the retrain model's level, not at 0)
MLLMU_SETS = {"forget": ("forget people's trained pictures", None),
              "test": ("forget people's held-out pictures, paraphrased (generalisation)", None),
              "retain": ("retain people", "higher"), "public": ("public figures", "higher")}
MLLMU_HEADERS = {("forget", "classification", "image"): "forget MC img", ("forget", "classification", "text"):
                 "forget MC text", ("test", "classification", "image"): "test MC img",
                 ("retain", "classification", "image"): "retain MC img", ("retain", "classification", "text"):
                 "retain MC text", ("public", "classification", "image"): "public MC img"}
# Scorecard columns first, in the order they are shown; then the per-item scores they are built from.
METRICS = _table(
    Metric("forget_quality", E + "tofu:forget_quality", "KS-test p-value of forget truth ratios vs the retrain model.",
           TOFU, "lm", "higher", "KS test of the forget items' truth ratios", "forget quality", "{:.3g}"),
    Metric("model_utility", E + "tofu:model_utility", "Harmonic mean of probability, ROUGE-L and truth-ratio scores on "
           "retain and utility sets.", TOFU, "lm", "higher", "harmonic mean of 9 set means", "model utility"),
    Metric("utility_ratio", E + "tofu:model_utility", "Model utility divided by the original model's.", TOFU, "lm",
           "higher", "ratio of two aggregates", "MU / original", "{:.2f}"),
    Metric("forget_accuracy", E + "metrics:exact_answer", "Share of forget questions whose greedy answer is the true "
           "answer.", "", "lm", "lower", SHARE, "forget acc", "{:.1%}"),
    Metric("retain_accuracy", E + "metrics:exact_answer", "Share of retain questions answered exactly.", "", "lm",
           "higher", SHARE, "retain acc", "{:.1%}"),
    Metric("forget_paraphrased_accuracy", E + "metrics:exact_answer", "Share of paraphrased forget questions answered "
           "exactly.", "", "lm", "lower", SHARE, "paraphrased forget acc", "{:.1%}"),
    Metric("privleak", E + "muse:privleak", "(AUC - AUC_retrain) / AUC_retrain * 100 of Min-K% forget vs holdout; 0 is "
           "ideal.", MUSE, "lm", "zero", "AUC over items, relative to the retrain model's", "PrivLeak", "{:+.1f}"),
    Metric("verbmem", E + "muse:verbmem", "ROUGE-L F1 of the greedy continuation of forget texts (MUSE VerbMem).", MUSE,
           "lm", "lower", "mean over texts", "VerbMem"),
    Metric("knowmem_forget", E + "muse:knowmem", "ROUGE-L of greedy answers on forget QA (MUSE KnowMem).", MUSE, "lm",
           "lower", "mean over items", "KnowMem forget"),
    Metric("knowmem_retain", E + "muse:knowmem", "ROUGE-L of greedy answers on retain QA (MUSE KnowMem).", MUSE, "lm",
           "higher", "mean over items", "KnowMem retain"),
    # text-to-image (evals/canvas.py; formulas in docs/t2i.md)
    Metric("ua", E + "canvas:canvas_scores", "Unlearning accuracy: share of forget-prompt images where the classifier "
           "does not find the erased concept.", CANVAS, "t2i", "higher", "share of images", "UA", "{:.1%}"),
    Metric("ua_paraphrase", E + "canvas:canvas_scores", "UA on held-out paraphrased forget prompts.", CANVAS, "t2i",
           "higher", "share of images", "UA paraphrase", "{:.1%}"),
    Metric("ua_attacked", "obliviate.attacks.t2i.common:summarize", "UA under the adversarial prompt attack: "
           "1 - ASR of k optimised prefix tokens on the forget prompts (`obliviate attack`).",
           "Zhang et al. 2024, UnlearnDiffAtk, https://arxiv.org/abs/2310.11868", "t2i", "higher", "share of prompts",
           "UA attacked", "{:.1%}"),
    Metric("ira", E + "canvas:canvas_scores", "In-domain retain accuracy: classifier accuracy on the erased concept's "
           "kind over prompts of the other concepts.", CANVAS, "t2i", "higher", "share of images", "IRA", "{:.1%}"),
    Metric("cra", E + "canvas:canvas_scores", "Cross-domain retain accuracy: accuracy on the other kind (objects when a "
           "style is erased) over prompts without the concept.", CANVAS, "t2i", "higher", "share of images", "CRA",
           "{:.1%}"),
    Metric("fid_real", E + "canvas:fid_kid", "Frechet distance of classifier features to real pictures (torchmetrics; "
           "biased at small n, compare at equal n).", "Heusel et al. 2017, https://arxiv.org/abs/1706.08500", "t2i",
           "lower", "over the image set", "FID real", "{:.2f}"),
    Metric("fid_original", E + "canvas:fid_kid", "Frechet distance of classifier features to the original model's "
           "samples.", "Heusel et al. 2017, https://arxiv.org/abs/1706.08500", "t2i", "lower", "over the image set",
           "FID original", "{:.2f}"),
    Metric("kid_original", E + "canvas:fid_kid", "Kernel distance (polynomial MMD^2) of classifier features to the "
           "original model's samples (torchmetrics).", "Binkowski et al. 2018, https://arxiv.org/abs/1801.01401", "t2i",
           "lower", "over the image set", "KID original", "{:.4f}"),
    Metric("alignment", E + "canvas:alignment_scores", "Mean cosine of the world CLIP's image and prompt embeddings.",
           RG_PAPER, "t2i", "higher", "mean over images", "alignment"),
    # text-to-image on a user's pipeline (evals/user_pipeline.py): the user's CLIP folder and detector
    Metric("alignment_forget", E + "user_pipeline:evaluate_user_pipeline", "Mean cosine of the user CLIP's image and "
           "prompt embeddings on forget prompts (falls when the concept is gone).", RG_PAPER, "t2i", "lower",
           "mean over images", "CLIP forget"),
    Metric("alignment_retain", E + "user_pipeline:evaluate_user_pipeline", "The same on retain prompts (should stay "
           "the original's).", RG_PAPER, "t2i", "higher", "mean over images", "CLIP retain"),
    Metric("retain_agreement", E + "user_pipeline:evaluate_user_pipeline", "Share of retain-prompt images whose "
           "detector verdict is the original's on the same prompt and seed (IRA/CRA-style).", CANVAS, "t2i", "higher",
           "share of images", "retain agreement", "{:.1%}"),
    # vision-language (evals/mllmu.py): MLLMU-Bench's table, set x task x form; the headline columns here
    *[Metric(f"{s}_{t}_{f}", E + "mllmu:evaluate", f"{MLLMU_TASKS[t]} on the {MLLMU_SETS[s][0]}, asked "
             f"{'with the picture' if f == 'image' else 'as text alone'}.", MLLMU, "mllm", MLLMU_SETS[s][1],
             "mean over items", MLLMU_HEADERS.get((s, t, f), ""), "{:.1%}" if t in ("classification", "cloze")
             else "{:.3f}")
      for s in MLLMU_SETS for t in MLLMU_TASKS for f in ("image", "text")],
    Metric("mia_loss_auc", E + "mllmu:evaluate", "ROC AUC of the LOSS attack (answer NLL), forget vs holdout people.",
           "Yeom et al. 2018, https://arxiv.org/abs/1709.01604", "mllm", None, "AUC over items"),
    Metric("unlearn_seconds", "obliviate.loops.step:UnlearnResult", "Wall time of the unlearning or erasure loop.", "",
           "any", None, "one number per run", "unlearn seconds", "{:.1f}"),
    # per-item scores (kept in per_item.json; the aggregates above are built from them)
    Metric("answer_prob", E + "metrics:answer_prob", "Per item P(answer | question) = exp(-mean answer-token NLL).",
           TOFU, "lm"),
    Metric("truth_ratio", E + "metrics:truth_ratio", "exp(mean perturbed NLL - paraphrased NLL) per item.", TOFU, "lm"),
    Metric("rouge_l_recall", E + "metrics:rouge_l_recall", "ROUGE-L recall of the greedy answer against the true "
           "answer.", TOFU, "lm"),
    Metric("exact_answer", E + "metrics:exact_answer", "Greedy answer equals the true answer (normalised).", "", "lm"),
    Metric("exact_memorization", E + "metrics:exact_memorization", "Fraction of answer tokens whose teacher-forced "
           "argmax is the true token.", "Tirumala et al. 2022, https://arxiv.org/abs/2205.10770", "lm"),
    Metric("extraction_strength", E + "metrics:extraction_strength", "1 - k*/|y|, k* the shortest answer prefix from "
           "which greedy decoding reproduces the rest.", "Carlini et al. 2021; OpenUnlearning", "lm"),
    Metric("mia_loss", E + "mia:loss_score", "Membership score: answer/text NLL (LOSS attack).",
           "Yeom et al. 2018, https://arxiv.org/abs/1709.01604", "lm"),
    Metric("mia_zlib", E + "mia:zlib_score", "Membership score: NLL / zlib-compressed length.",
           "Carlini et al. 2021, https://arxiv.org/abs/2012.07805", "lm"),
    Metric("mia_min_k", E + "mia:min_k_score", "Membership score: mean of the lowest k% token log-probs (Min-K%).",
           "Shi et al. 2023, https://arxiv.org/abs/2310.16789", "lm"),
    Metric("mia_min_k_plus_plus", E + "mia:min_k_plus_plus_score", "Membership score: Min-K% on log-probs standardised "
           "by the model's own next-token distribution.", "Zhang et al. 2024, Min-K%++, https://arxiv.org/abs/2404.02936",
           "lm"),
    Metric("mia_reference", E + "mia:reference_score", "Membership score: NLL_target - NLL_reference.",
           "Carlini et al. 2021, https://arxiv.org/abs/2012.07805", "lm"),
    Metric("mia_gradnorm", E + "mia:gradnorm_score", "Membership score: norm of the loss gradient w.r.t. the "
           "parameters.", "Maini et al. 2024 / OpenUnlearning", "lm"),
)

WORLDS = _table(
    Entry("profiles", "obliviate.worlds.profiles:ProfilesWorld",
          "Fictitious people (bio, 10+ QA, paraphrases, perturbed answers) + utility facts; trains a small Llama.",
          "TOFU-style, https://arxiv.org/abs/2401.06121", family="lm"),
    Entry("portraits", "obliviate.worlds.portraits:PortraitsWorld",
          "The profiles world's people with drawn portraits; MLLMU-Bench's three tasks with the picture and as text; "
          "trains a small LLaVA.", "MLLMU-Bench-style, https://arxiv.org/abs/2410.22108", family="mllm"),
    Entry("canvas", "obliviate.worlds.canvas:CanvasWorld",
          "Objects x styles x colours drawn at 32x32; trains a small Stable-Diffusion-shaped pipeline, a classifier and "
          "a CLIP.", "UnlearnCanvas-style, https://arxiv.org/abs/2402.11846", family="t2i"),
)

A = "obliviate.attacks."
UNLEARNDIFF = "Zhang et al. 2024, UnlearnDiffAtk, https://arxiv.org/abs/2310.11868"
P4D = "Chin et al. 2024, Prompting4Debugging, ICML, https://arxiv.org/abs/2309.06135"
RELEARN = "Hu et al. 2024, Jogging the Memory of Unlearned LLMs, https://arxiv.org/abs/2406.13356"
QUANT = "Zhang et al. 2024, Catastrophic Failure of LLM Unlearning via Quantization, https://arxiv.org/abs/2410.16454"
# Recovery attacks: each a class with a `Config` (its options, `obliviate attack RUN --attack NAME key=value`).
ATTACKS = _table(
    # language models (attacks/lm/): every one runs on the unlearned, the original and the retrain model
    Entry("relearn", A + "lm.relearn:Relearn", "Fine-tune a few steps on part of the forget set (or the forget "
          "people's biographies, or retain people); forget recall and truth ratio after each step: a curve.",
          RELEARN, family="lm"),
    Entry("in_context", A + "lm.in_context:InContext", "The forget person's biography in the prompt, then the "
          "question (UnUnlearning).", "Shumailov et al. 2024, UnUnlearning, https://arxiv.org/abs/2407.00106",
          family="lm"),
    Entry("paraphrase", A + "lm.rewording:Paraphrase", "The forget questions asked in other words.",
          "TOFU, https://arxiv.org/abs/2401.06121", family="lm"),
    Entry("multiple_choice", A + "lm.rewording:MultipleChoice", "The true answer among the perturbed ones, chosen "
          "by likelihood (lm-evaluation-harness's multiple choice).", "TOFU, https://arxiv.org/abs/2401.06121",
          family="lm"),
    Entry("jailbreak", A + "lm.rewording:Jailbreak", "The forget questions inside jailbreak-style frames, and with "
          "the reply prefilled up to the fact; an item is recovered when any of them recalls it.",
          "Lynch et al. 2024, Eight Methods to Evaluate Robust Unlearning, https://arxiv.org/abs/2402.16835",
          family="lm"),
    Entry("step_by_step", A + "lm.rewording:StepByStep", "A step-by-step reasoning prompt that walks the model "
          "towards the fact.", "Step-by-Step Reasoning Attack (2025), https://arxiv.org/abs/2506.17279",
          family="lm"),
    Entry("probe", A + "lm.probe:Probe", "A linear probe on hidden states, trained on retain people to read an "
          "attribute, applied to forget people (scikit-learn).",
          "Belinkov 2022, Probing Classifiers, https://arxiv.org/abs/2102.12452", family="lm"),
    Entry("quantize_int8", A + "lm.quantize:QuantizeInt8", "The weights quantized to 8 bits (optimum-quanto, CPU), "
          "then the forget questions.", QUANT, family="lm"),
    Entry("quantize_int4", A + "lm.quantize:QuantizeInt4", "The weights quantized to 4 bits (optimum-quanto, CPU), "
          "then the forget questions.", QUANT, family="lm"),
    # text-to-image (attacks/t2i/): judged by a concept detector (the canvas world's classifier or the user's)
    Entry("prompt_attack", A + "t2i.unlearn_diff_atk:UnlearnDiffAtk", "UnlearnDiffAtk: k optimised prefix tokens "
          "before each forget prompt, judged by the concept detector.", UNLEARNDIFF, family="t2i"),
    Entry("p4d_n", A + "t2i.p4d:P4DN", "P4D-N: free prompt tokens optimised (projected to the vocabulary) so the "
          "erased model's noise prediction matches the original's on the concept prompt.", P4D, family="t2i"),
    Entry("p4d_k", A + "t2i.p4d:P4DK", "P4D-K: learnable tokens inserted after every k-th token of the concept "
          "prompt, same objective as P4D-N.", P4D, family="t2i"),
    Entry("ring_a_bell", A + "t2i.ring_a_bell:RingABell", "Ring-A-Bell: a concept vector from text-encoder "
          "embeddings, and a genetic search for the prompt nearest prompt + eta * vector (text encoder only).",
          "Tsai et al. 2024, Ring-A-Bell!, ICLR, https://arxiv.org/abs/2310.10012", family="t2i"),
)
# `obliviate attack RUN` without --attack
DEFAULT_ATTACKS = {"lm": ("relearn", "in_context", "paraphrase", "multiple_choice", "jailbreak", "step_by_step",
                          "probe", "quantize_int8", "quantize_int4"), "t2i": ("prompt_attack",)}

MLLM_METHODS = _table(
    *LM_METHODS.values(),  # every language-model method runs on a vision-language model through its adapter
    Entry("MMUnlearner", M + "mllm.mmunlearner:MMUnlearner",
          "Gradient ascent on the forget items masked to the weights whose forget Fisher is at least their retain "
          "Fisher (every trained part), plus retain NLL.",
          "Huo et al. 2025, MMUnlearner, https://arxiv.org/abs/2502.11051", family="mllm"),
    Entry("PromptDecouple", M + "mllm.prompt_decouple:PromptDecouple", "GradDiff plus SafeEraser's Prompt Decouple "
          "loss: the forget question on an unrelated picture keeps its answer (weight 0.5).",
          "Chen et al. 2025, SafeEraser, https://arxiv.org/abs/2502.12520", family="mllm"),
)
# family -> name -> entry (names repeat across families)
METHODS = {"lm": LM_METHODS, "t2i": T2I_METHODS, "mllm": MLLM_METHODS}
KINDS = {"methods": LM_METHODS, "t2i-methods": T2I_METHODS, "mllm-methods": MLLM_METHODS, "metrics": METRICS,
         "attacks": ATTACKS, "worlds": WORLDS}
KIND_NAMES = {"lm": "method", "t2i": "text-to-image method", "mllm": "vision-language method"}


def scorecard_metrics() -> list[Metric]:
    """The metrics that are scorecard columns, in their order."""
    return [m for m in METRICS.values() if m.header]


def lookup_method(family: str, name: str) -> Entry:
    """A family's method by name, or RETRAIN (what a run's `method` may name; `methods.common.make_method` builds
    methods only)."""
    return lookup({**METHODS[family], RETRAIN.name: RETRAIN}, name, KIND_NAMES[family])


def lookup(table: dict[str, Entry], name: str, kind: str) -> Entry:
    if name in table:
        return table[name]
    lowered = {k.lower(): k for k in table}
    if name.lower() in lowered:
        return table[lowered[name.lower()]]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.4) or difflib.get_close_matches(
        name.lower(), list(lowered), n=1, cutoff=0.4)
    hint = f" Did you mean '{lowered.get(close[0], close[0])}'?" if close else ""
    raise ObliviateError(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(table)}")
