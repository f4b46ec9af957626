"""One table of everything a user can choose by name: methods, metrics and worlds, each with its family ("lm",
"t2i", "mllm") and what a user needs to choose it. Metrics are declared here, once: the aggregate key each fills,
the function that computes it, what it needs, which way is better, how per-item values aggregate, the scorecard's
header and format; the language-model evaluation computes through these declarations, and the scorecard, the report
and the leaderboard read directions and titles from them. Nothing here imports torch or transformers, so `obliviate ls`
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

    guard = False  # a generation-time guard (GuardEntry), not a dataclass field: Metric's positional fields stay

    def load(self):
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class GuardEntry(Entry):
    """A generation-time guard (obliviate.guards): a method whose result is a recorded configuration, applied while
    the model generates, not changed weights."""
    guard = True


ARROWS = {"higher": "↑", "lower": "↓", "zero": "→0", None: ""}
MEAN = "mean over items"  # an item metric with this aggregation has its mean (None and NaN left out) in its set's block
PER_ITEM = "per item only"  # kept in per_item.json, not averaged
SCOPES = ("item", "set", "run")
# The shared inputs a metric can need; an evaluation computes each once and only the metrics whose inputs all exist.
NEEDS = {"logprobs": "the one likelihood pass over each item's answer, paraphrase and perturbed answers",
         "generations": "one greedy answer per question",
         "paraphrased_generations": "greedy answers to the forget set's paraphrased questions",
         "forget_set": "the forget question-answer set", "retain_set": "the retain question-answer set",
         "utility_sets": "the sets in model utility (retain and utility sets)",
         "membership": "membership scores of forget (member) vs holdout texts",
         "reference_model": "a reference model for the Reference attack",
         "verbmem": "greedy continuations of the forget texts' prefixes",
         "retrain": "the retrain reference's evaluation (compare_to_retrain)",
         "original": "the original model's evaluation (the runner)",
         "harness": "lm-evaluation-harness's tasks on local files (the run's `harness` keys; evals/harness.py)",
         "restor_set": "the corrupted world's right answers to the corrupted questions (RESTOR; evals/restor.py)",
         "routing": "a mixture-of-experts model's routing of the forget and retain tokens before and after unlearning "
                    "(the runner; evals/routing.py)"}
# A reference model's value of a metric, written beside the run's own (t2i: original_ua, retrain_ira, ...).
REFERENCE_PREFIXES = ("original_", "retrain_")


@dataclass(frozen=True)
class Metric(Entry):
    """A metric, declared once. `better`: "higher", "lower", "zero" (closest to 0 is best) or None (a per-item
    score that is read through other metrics, a count or a setting). `aggregate`: how per-item values become the
    reported number. `target` is the function that computes it; a language-model metric is computed by calling it
    (`evals/lm_metrics.py`: an item metric takes the item's share of an input, a set metric the set's rows, a run
    metric the evaluation); the text-to-image and vision-language aggregates are written by their protocol's function,
    which `target` names. `scope`: "item" (a value per question-answer item, in per_item.json), "set" (a value per
    set, in the set's block) or "run" (a top-level key of the aggregate, of metrics.json). `needs`: the inputs it
    reads (NEEDS). `also`: other families whose evaluation writes the same key."""
    better: str | None = None
    aggregate: str = MEAN
    header: str = ""  # the scorecard's column title (no column when empty)
    fmt: str = "{:.3f}"
    scope: str = "run"
    needs: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    label: str = ""  # its name where it is shown outside the scorecard's columns (default: the header)

    @property
    def higher_is_better(self) -> bool | None:
        return {"higher": True, "lower": False}.get(self.better)

    @property
    def column_title(self) -> str:
        return f"{self.header or self.label} {ARROWS[self.better]}".strip()

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family, *self.also)


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
    Entry("UOE", M + "lm.uoe:UOE",
          "Mixture-of-experts models: any base method trains only the expert the forget set's routing favours, with a router anchor loss.",
          "Zhuang et al. 2025, UOE: Unlearning One Expert Is Enough for MoE LLMs (ACL: SEUF), https://arxiv.org/abs/2411.18797", family="lm"),
    Entry("RG", M + "lm.restricted_gradient:RG",
          "Restricted gradient: project conflicting forget/retain gradients onto each other's normal plane.",
          "Ko et al. 2024, Boosting Alignment for Post-Unlearning T2I Models, NeurIPS, https://arxiv.org/abs/2412.07808", family="lm"),
    Entry("RGD", M + "lm.restricted_gradient:RGD",
          "Restricted gradient with a diversified, balanced retain set and a truncated forget loss.",
          "Ko et al. 2024, Boosting Alignment for Post-Unlearning T2I Models, NeurIPS, https://arxiv.org/abs/2412.07808", family="lm"),
    Entry("WAGLE", M + "lm.wagle:WAGLE",
          "Any base method trained only on the weights with the largest forget/retain attribution score (top 95 %).",
          "Jia et al. 2024, WAGLE, NeurIPS, https://arxiv.org/abs/2410.17509", family="lm"),
    Entry("FLAT", M + "lm.flat:FLAT",
          "Maximise an f-divergence between a template ('I don't know') and the forget answer; no retain data, no reference.",
          "Wang et al. 2025, LLM Unlearning via Loss Adjustment with Only Forget Data, ICLR, https://arxiv.org/abs/2410.11143", family="lm"),
    Entry("WGA", M + "lm.wga:WGA", "Gradient ascent with each forget token weighted by its probability p^beta, plus retain NLL.",
          "Wang et al. 2025, Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond, ICLR, "
          "https://arxiv.org/abs/2502.19301", family="lm"),
    Entry("SatImp", M + "lm.satimp:SatImp", "Gradient ascent with each forget token weighted by p^beta1 (1-p)^beta2 "
          "(saturation x importance), plus retain NLL.",
          "Yang et al. 2025, Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning, ICML, "
          "https://arxiv.org/abs/2505.11953", family="lm"),
    Entry("CEU", M + "lm.ceu:CEU", "Cross-entropy towards the model's own next-token distribution with the true token "
          "removed (CE-U), on the forget answers.",
          "Yang 2025, CE-U: Cross Entropy Unlearning, https://arxiv.org/abs/2503.01224", family="lm"),
    Entry("AltPO", M + "lm.altpo:AltPO", "DPO that prefers a plausible alternate answer (method_args.alternates) to the "
          "true one, plus retain NLL.",
          "Mekala et al. 2025, Alternate Preference Optimization for Unlearning Factual Knowledge in Large Language "
          "Models, COLING, https://arxiv.org/abs/2409.13474", family="lm"),
    Entry("PDU", M + "lm.pdu:PDU", "Flatten the forget answers' logits towards uniform under a retain-loss bound, "
          "by primal-dual steps on the retain weight.",
          "Entesari et al. 2025, Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models, "
          "https://arxiv.org/abs/2506.05314", family="lm"),
    GuardEntry("ICU", "obliviate.guards.lm.icu:ICU", "In-context unlearning: each question is asked after the forget "
               "items nearest to it with wrong answers and a few retain items with true ones (no weight changes).",
               "Pawelczyk et al. 2024, In-Context Unlearning: Language Models as Few-Shot Unlearners, ICML, "
               "https://arxiv.org/abs/2310.07579", family="lm"),
    GuardEntry("GUARD", "obliviate.guards.lm.guard:GUARD", "Generation-time restriction: once a text names a forget "
               "subject, the tokens that would spell its forget answers' key words are held at probability ~0 "
               "(no weight changes).",
               "Deng et al. 2025, GUARD: Generation-time LLM Unlearning via Adaptive Restriction and Detection, "
               "https://arxiv.org/abs/2505.13312", family="lm"),
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


# World recipes: a run's `method` may name them, but they are no loss over forget and retain batches. DP2Unlearning
# answers a deletion request by fine-tuning the world's DP-trained base model on the retained data (the profiles
# world's DP2 variant, `world.dp2`); `obliviate ls` lists it, marked.
WORLD_RECIPES = {"lm": {"DP2Unlearning": Entry(
    "DP2Unlearning", "obliviate.worlds.profiles_dp2:DP2ProfilesWorld",
    "World recipe, not a loss: a DP-SGD base model (Opacus, stated epsilon) fine-tuned on the retained data only "
    "(needs world.dp2).",
    "Al Mahmud et al. 2025, DP2Unlearning, https://arxiv.org/abs/2504.13774", family="lm")}}


def is_world_recipe(family: str, name: str) -> bool:
    """Whether a run's `method` names one of the family's world recipes rather than a method."""
    return name.lower() in {k.lower() for k in WORLD_RECIPES.get(family, {})}

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
    Entry("RECE", M + "t2i.rece:RECE", "UCE, then rounds that derive in closed form an embedding the edited model still maps to the concept, and erase it too.",
          "Gong et al. 2024, Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models, ECCV, "
          "https://arxiv.org/abs/2407.12383", family="t2i"),
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
    Entry("SPM", M + "t2i.spm:SPM", "A rank-1 adapter on the UNet's transformer blocks: ESD-style erasure towards the anchor prompt, "
          "latent anchoring on random text states; facilitated transport scales it per prompt at generation.",
          "Lyu et al. 2024, One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing "
          "Applications, CVPR, https://arxiv.org/abs/2312.16145", family="t2i"),
    Entry("Co-Erasing", M + "t2i.co_erasing:CoErasing",
          "ESD's negative guidance under the text plus the concept's own pictures as image tokens, refined by the concept's text.",
          "Li et al. 2025, One Image is Worth a Thousand Words: A Usability Preservable Text-Image Collaborative Erasing "
          "Framework, ICML, https://arxiv.org/abs/2505.11131", family="t2i"),
    Entry("TRCE", M + "t2i.trce:TRCE",
          "Closed-form cross-attention edit mapping the forget prompts' [EoT] states to the safe prompts', then "
          "contrastive steering of the early denoising steps towards the safe prediction and away from the unsafe one.",
          "Chen et al. 2025, TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion Models, ICCV, "
          "https://arxiv.org/abs/2503.07389", family="t2i"),
    Entry("MACE", M + "t2i.mace:MACE", "Closed-form refinement of the cross-attention keys/values, one LoRA per concept "
          "emptying the concept's cross-attention maps, the LoRAs fused in closed form.",
          "Lu et al. 2024, MACE: Mass Concept Erasure in Diffusion Models, CVPR, https://arxiv.org/abs/2403.06135",
          family="t2i"),
    Entry("Receler", M + "t2i.receler:Receler", "A lightweight eraser after every cross-attention, trained with ESD's target "
          "under adversarially learned prompt states and kept off everything outside the concept's attention region "
          "(the result needs the erasers).",
          "Huang et al. 2024, Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via Lightweight "
          "Erasers, ECCV, https://arxiv.org/abs/2311.17717", family="t2i"),
    Entry("ANT", M + "t2i.ant:ANT", "Trajectory-aware fine-tuning: the concept's guidance direction kept in the early "
          "denoising steps and reversed in the later ones, the unconditional prediction held, on a saliency-masked UNet.",
          "Li et al. 2025, Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted Concepts, "
          "ACM MM, https://arxiv.org/abs/2504.12782", family="t2i"),
    Entry("DoCo", M + "t2i.doco:DoCo",
          "A discriminator tells the concept's predictions from the anchor's and the denoiser learns to fool it, its "
          "gradient stripped of the part that conflicts with preserving the anchor (concept-preserving gradient).",
          "Wu et al. 2025, Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept "
          "Preserving Gradient, AAAI, https://arxiv.org/abs/2405.15304", family="t2i"),
    Entry("ForgetMeNot", M + "t2i.forget_me_not:ForgetMeNot",
          "Attention re-steering: minimise the norm of the cross-attention maps of the concept's tokens on its pictures.",
          "Zhang et al. 2024, Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models, CVPR Workshops, "
          "https://arxiv.org/abs/2303.17591", family="t2i"),
    Entry("EraseDiff", M + "t2i.erasediff:EraseDiff",
          "Constrained erasure to first order: descend the retain denoising loss plus lambda x the forget pictures' "
          "denoising towards uniform noise, less its minimum estimated by a few inner descent passes.",
          "Wu et al. 2024, EraseDiff: Erasing Data Influence in Diffusion Models, https://arxiv.org/abs/2401.05779",
          family="t2i"),
    Entry("RealEra", M + "t2i.realera:RealEra", "A LoRA on the cross-attention key/value maps: ESD's anchored target "
          "for the concept and random neighbours of its text states, the original's prediction kept beyond them.",
          "Liu et al. 2024, RealEra: Semantic-level Concept Erasure via Neighbor-Concept Mining, "
          "https://arxiv.org/abs/2410.09140", family="t2i"),
    Entry("FewShotUnlearning", M + "t2i.few_shot:FewShotUnlearning", "The text encoder (feed-forward layers and the "
          "last self-attention) trained by gradient ascent on the denoising loss of a few pictures of the concept; "
          "the UNet frozen.",
          "Fuchi and Takagi 2024, Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning, BMVC, "
          "https://arxiv.org/abs/2405.07288", family="t2i"),
    Entry("ScissorHands", M + "t2i.scissorhands:ScissorHands",
          "Re-initialise the weights most connected to the concept's images (SNIP sensitivity |g * theta|), then repair: "
          "descend on retain, ascend on forget, each step projected (GEM) so the forgetting holds.",
          "Wu and Harandi 2024, Scissorhands: Scrub Data Influence via Connection Sensitivity in Networks, ECCV, "
          "https://arxiv.org/abs/2401.06187", family="t2i"),
    Entry("SelectiveAmnesia", M + "t2i.selective_amnesia:SelectiveAmnesia",
          "Continual learning towards forgetting: the concept's prompts learn the anchor's images, with generative "
          "replay of the retain prompts and an EWC penalty (Fisher from the original model's own samples).",
          "Heng and Soh 2023, Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative "
          "Models, NeurIPS, https://arxiv.org/abs/2305.10120", family="t2i"),
    GuardEntry("SLD", "obliviate.guards.t2i.sld:SLD", "Safe Latent Diffusion: each sampling step guided away from the "
               "concept's noise prediction where the prompt's is close to it (no weight changes).",
               "Schramowski et al. 2023, Safe Latent Diffusion, CVPR, https://arxiv.org/abs/2211.05105",
               family="t2i"),
    GuardEntry("NegToMe", "obliviate.guards.t2i.negtome:NegToMe", "Negative token merging: each image's attention "
               "outputs pushed away from a concept image sampled alongside (no weight changes).",
               "Singh et al. 2024, Negative Token Merging, https://arxiv.org/abs/2412.01339", family="t2i"),
    GuardEntry("GoG", "obliviate.guards.t2i.guardians:Guardians", "Guardians of Generation: a prompt that names the "
               "concept (or is close to it) is sampled with guidance blended between it and its rewrite without the "
               "concept (no weight changes).",
               "Roy et al. 2025, Guardians of Generation: Dynamic Inference-Time Copyright Shielding with Adaptive "
               "Guidance for AI Image Generation, ICCV Workshops, https://arxiv.org/abs/2503.16171", family="t2i"),
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
L = "obliviate.evals.lm_metrics:"
FROM_RETRAIN = ("retrain",)
MIA_DOC = "obliviate.evals.mia:"
H = "obliviate.evals.harness:"
WMDP = "Li et al. 2024, The WMDP Benchmark, https://arxiv.org/abs/2403.03218"
MMLU = "Hendrycks et al. 2021, Measuring Massive Multitask Language Understanding, https://arxiv.org/abs/2009.03300"
RS = "obliviate.evals.restor:"
RT = "obliviate.evals.routing:"
UOE = "Zhuang et al. 2025, UOE: Unlearning One Expert Is Enough for MoE LLMs, https://arxiv.org/abs/2411.18797"
RESTOR = "Rezaei et al. 2025, RESTOR: Knowledge Recovery through Machine Unlearning, https://arxiv.org/abs/2411.00204"
HARNESS_MC = ("four-way multiple choice by the log-likelihood of each answer letter (lm-evaluation-harness's task "
              "on local files; zero-shot unless harness.num_fewshot)")
# Scorecard columns first, in the order they are shown; then the other aggregates, the set and the per-item scores.
# A language-model evaluation computes the lm metrics in this order (`evals/evaluate.py`): items, then sets, then the
# run's, then (compare_to_retrain) those that need the retrain reference.
METRICS = _table(
    Metric("forget_quality", L + "forget_quality", "KS-test p-value of forget truth ratios vs the retrain model.",
           TOFU, "lm", "higher", "KS test of the forget items' truth ratios", "forget quality", "{:.3g}",
           needs=FROM_RETRAIN, also=("mllm",)),
    Metric("model_utility", L + "model_utility", "Harmonic mean of probability, ROUGE-L and truth-ratio scores on "
           "retain and utility sets.", TOFU, "lm", "higher", "harmonic mean of 9 set means", "model utility",
           needs=("utility_sets",)),
    Metric("utility_ratio", "obliviate.runners.lm:with_utility_ratio", "Model utility divided by the original "
           "model's.", TOFU, "lm", "higher", "ratio of two aggregates", "MU / original", "{:.2f}", needs=("original",)),
    Metric("forget_accuracy", L + "forget_accuracy", "Share of forget questions whose greedy answer is the true "
           "answer.", "", "lm", "lower", SHARE, "forget acc", "{:.1%}", needs=("forget_set", "generations")),
    Metric("retain_accuracy", L + "retain_accuracy", "Share of retain questions answered exactly.", "", "lm",
           "higher", SHARE, "retain acc", "{:.1%}", needs=("retain_set", "generations")),
    Metric("forget_paraphrased_accuracy", L + "forget_paraphrased_accuracy", "Share of paraphrased forget questions "
           "answered exactly.", "", "lm", "lower", SHARE, "paraphrased forget acc", "{:.1%}",
           needs=("forget_set", "paraphrased_generations")),
    Metric("privleak", L + "privleak", "(AUC - AUC_retrain) / AUC_retrain * 100 of Min-K% forget vs holdout; 0 is "
           "ideal.", MUSE, "lm", "zero", "AUC over items, relative to the retrain model's", "PrivLeak", "{:+.1f}",
           needs=FROM_RETRAIN, also=("mllm",)),
    Metric("verbmem", L + "verbmem", "ROUGE-L F1 of the greedy continuation of forget texts (MUSE VerbMem).", MUSE,
           "lm", "lower", "mean over texts", "VerbMem", needs=("verbmem",)),
    Metric("knowmem_forget", L + "knowmem_forget", "ROUGE-L of greedy answers on forget QA (MUSE KnowMem).", MUSE,
           "lm", "lower", "mean over items", "KnowMem forget", needs=("forget_set", "generations")),
    Metric("knowmem_retain", L + "knowmem_retain", "ROUGE-L of greedy answers on retain QA (MUSE KnowMem).", MUSE,
           "lm", "higher", "mean over items", "KnowMem retain", needs=("retain_set", "generations")),
    # lm-evaluation-harness on local WMDP / MMLU files (evals/harness.py; docs/harness.md); WMDP's chance is 25 %
    Metric("wmdp_bio_acc", H + "wmdp_bio_acc", f"WMDP-Bio accuracy, {HARNESS_MC}.", WMDP, "lm", "lower", SHARE,
           "WMDP-Bio acc", "{:.1%}", needs=("harness",)),
    Metric("wmdp_cyber_acc", H + "wmdp_cyber_acc", f"WMDP-Cyber accuracy, {HARNESS_MC}.", WMDP, "lm", "lower",
           SHARE, "WMDP-Cyber acc", "{:.1%}", needs=("harness",)),
    Metric("mmlu_acc", H + "mmlu_acc", f"MMLU accuracy over every question (the harness's mmlu group), {HARNESS_MC}.",
           MMLU, "lm", "higher", SHARE, "MMLU acc", "{:.1%}", needs=("harness",)),
    # RESTOR on the corrupted profiles world (world.corrupt; evals/restor.py, docs/restor.md): the forget set is the
    # wrong facts, so forget acc there is the share still answered wrong; these read the right facts beside it
    Metric("restor_accuracy", RS + "restor_accuracy", "Corrupted world: share of the corrupted questions answered with "
           "the right fact.", RESTOR, "lm", "higher", SHARE, "right facts acc", "{:.1%}",
           needs=("restor_set", "generations")),
    Metric("restor_recovery", RS + "with_recovery", "Corrupted world: (right-fact accuracy - the corrupted model's) / "
           "(the clean model's - the corrupted model's); 1 is the clean model's, 0 the corrupted model's.", RESTOR,
           "lm", "higher", "ratio of differences of aggregates", "recovery", "{:.2f}", needs=("original", "retrain")),
    Metric("restor_forgetting", RS + "with_recovery", "Corrupted world: 1 - (share still answered with the wrong "
           "fact) / (the corrupted model's share).", RESTOR, "lm", "higher", "ratio of two aggregates",
           "wrong forgotten", "{:.2f}", needs=("original",)),
    # a mixture-of-experts model, or a vision-language model with one as its language model (evals/routing.py,
    # docs/moe.md): how far unlearning moved its routers. The forget tokens' shift describes a method (UOE's anchor
    # holds it near 0 by design); the retain tokens' should stay small
    Metric("forget_routing_shift", RT + "routing_metrics", "Mixture-of-experts model: total variation between the "
           "forget tokens' expert shares before and after unlearning, mean over the sparse blocks (0: same routing).",
           UOE, "lm", None, "mean over sparse blocks", "forget routing shift", "{:.3f}", needs=("routing",),
           also=("mllm",)),
    Metric("retain_routing_shift", RT + "routing_metrics", "Mixture-of-experts model: total variation between the "
           "retain tokens' expert shares before and after unlearning, mean over the sparse blocks (0: same routing).",
           UOE, "lm", "lower", "mean over sparse blocks", "retain routing shift", "{:.3f}", needs=("routing",),
           also=("mllm",)),
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
           "Yeom et al. 2018, https://arxiv.org/abs/1709.01604", "mllm", None, "AUC over items", label="MIA AUC (LOSS)"),
    Metric("unlearn_seconds", "obliviate.loops.step:UnlearnResult", "Wall time of the unlearning or erasure loop.", "",
           "any", None, "one number per run", "unlearn seconds", "{:.1f}"),
    Metric("eval_seconds", "obliviate.runs:write_run_record", "Wall time of the run's evaluation.", "", "any", None,
           "one number per run", fmt="{:.1f}"),

    # ---- the other language-model aggregates (top-level keys of the evaluation's aggregate), in computing order
    Metric("mia", L + "mia", "ROC AUC of each membership attack (mia_*), forget texts (members) vs holdout texts "
           "(non-members), member-positive.", "", "lm", None, "AUC over texts, per attack", needs=("membership",)),
    Metric("privleak_auc", L + "privleak_auc", "1 - the Min-K% attack's AUC (MUSE's convention), for PrivLeak.", MUSE,
           "lm", None, "AUC over texts", needs=("membership",)),
    Metric("model_utility_components", L + "model_utility_components", "The numbers model utility is the harmonic "
           "mean of: {set/prob, set/rouge, set/truth_ratio}.", TOFU, "lm", None, "set scores",
           needs=("utility_sets",)),
    Metric("model_utility_error", L + "model_utility_error", "Why model utility is None (e.g. a set without "
           "perturbed answers has no truth ratio).", TOFU, "lm", None, "one line", needs=("utility_sets",)),
    Metric("forget_truth_ratio_score", L + "forget_truth_ratio_score", "The forget set's truth-ratio score, "
           "mean(min(R, 1/R)).", TOFU, "lm", None, "mean over items", needs=("forget_set", "logprobs")),
    Metric("forget_paraphrased_rouge_l_recall", L + "forget_paraphrased_rouge_l_recall", "ROUGE-L recall of the "
           "greedy answers to the paraphrased forget questions.", TOFU, "lm", "lower", "mean over items",
           needs=("forget_set", "paraphrased_generations")),
    Metric("answers_generated", L + "answers_generated", "Greedy answers generated (every set's and the paraphrased "
           "questions').", "", "lm", None, "count", needs=("generations",)),
    Metric("answers_at_token_limit", L + "answers_at_token_limit", "Greedy answers that ran to max_new_tokens "
           "without an end id (warned of above 5 %).", "", "lm", None, "count", needs=("generations",)),
    Metric("forget_quality_items", L + "forget_quality_items", "The forget items forget quality rests on (the "
           "smaller of the two models').", TOFU, "lm", None, "count", needs=FROM_RETRAIN, also=("mllm",)),
    Metric("forget_quality_low_power", L + "forget_quality_low_power", "Present (true) when forget quality rests on "
           "fewer than 25 items (docs/metrics.md, 'Few forget items').", TOFU, "lm", None, "flag",
           needs=FROM_RETRAIN, also=("mllm",)),
    Metric("forget_quality_min_pvalue", L + "forget_quality_min_pvalue", "The smallest p-value the KS test can give "
           "at these sizes (with the low-power flag).", TOFU, "lm", None, "one number", needs=FROM_RETRAIN,
           also=("mllm",)),
    Metric("retrain_comparison", L + "retrain_comparison", "The retrain reference's numbers beside the model's: "
           "forget quality, the PrivLeak AUCs, <metric>_retrain.", "", "lm", None, "one block", needs=FROM_RETRAIN),
    Metric("wmdp_acc", H + "wmdp_acc", f"WMDP accuracy over every question of its subsets (the harness's wmdp "
           f"group), {HARNESS_MC}.", WMDP, "lm", "lower", SHARE, fmt="{:.1%}", label="WMDP acc", needs=("harness",)),
    Metric("wmdp_chem_acc", H + "wmdp_chem_acc", f"WMDP-Chem accuracy, {HARNESS_MC}.", WMDP, "lm", "lower", SHARE,
           fmt="{:.1%}", label="WMDP-Chem acc", needs=("harness",)),
    Metric("harness", H + "harness", "lm-evaluation-harness's numbers of every task and group run: {task: {acc, "
           "acc_stderr, acc_norm (where the task reports it), n}}.", "", "lm", None, "one block",
           needs=("harness",)),
    # ---- per question-answer set (each set's block of the aggregate), beside the means of the item metrics
    Metric("n_items", L + "n_items", "Items in the set.", "", "lm", None, "count", scope="set"),
    Metric("normalised_prob", L + "normalised_prob", "Whether the set's probability score is normalised against "
           "the perturbed answers (TOFU's world facts / real authors).", TOFU, "lm", None, "setting", scope="set"),
    Metric("probability_score", L + "probability_score", "Mean P(y|x), or mean normalised probability.", TOFU, "lm",
           "higher", "mean over items", scope="set", needs=("logprobs",)),
    Metric("truth_ratio_score", L + "truth_ratio_score", "Forget set: mean(min(R, 1/R)); other sets: "
           "mean(max(0, 1 - 1/R)).", TOFU, "lm", None, "mean over items", scope="set", needs=("logprobs",)),
    Metric("paraphrased_rouge_l_recall", L + "paraphrased_rouge_l_recall", "ROUGE-L recall of the answers to the "
           "paraphrased questions.", TOFU, "lm", None, "mean over items", scope="set",
           needs=("paraphrased_generations",)),
    Metric("paraphrased_accuracy", L + "paraphrased_accuracy", "Share of paraphrased questions answered exactly.", "",
           "lm", None, SHARE, scope="set", needs=("paraphrased_generations",)),
    # ---- per item (kept in per_item.json); MEAN: the set's block holds the mean
    Metric("answer_nll", L + "answer_nll", "Mean negative log-likelihood of the answer (and end) tokens.", TOFU, "lm",
           scope="item", needs=("logprobs",)),
    Metric("answer_prob", L + "answer_prob", "Per item P(answer | question) = exp(-mean answer-token NLL).",
           TOFU, "lm", scope="item", needs=("logprobs",)),
    Metric("paraphrase_nll", L + "paraphrase_nll", "NLL of the paraphrased answer (the answer's when it has none).",
           TOFU, "lm", aggregate=PER_ITEM, scope="item", needs=("logprobs",)),
    Metric("perturbed_nlls", L + "perturbed_nlls", "NLL of each perturbed answer.", TOFU, "lm", aggregate=PER_ITEM,
           scope="item", needs=("logprobs",)),
    Metric("truth_ratio", L + "truth_ratio", "exp(mean perturbed NLL - paraphrased NLL) per item.", TOFU, "lm",
           scope="item", needs=("logprobs",)),
    Metric("answer_prob_normalised", L + "answer_prob_normalised", "P(y) / (P(y) + sum_j P(perturbed_j)).", TOFU,
           "lm", scope="item", needs=("logprobs",)),
    Metric("exact_memorization", L + "exact_memorization", "Fraction of answer tokens whose teacher-forced "
           "argmax is the true token.", "Tirumala et al. 2022, https://arxiv.org/abs/2205.10770", "lm", scope="item",
           needs=("logprobs",)),
    Metric("extraction_strength", L + "extraction_strength", "1 - k*/|y|, k* the shortest answer prefix from "
           "which greedy decoding reproduces the rest.", "Carlini et al. 2021; OpenUnlearning", "lm", scope="item",
           needs=("logprobs",)),
    Metric("min_k", L + "min_k", "Mean of the lowest k% answer-token log-probs (Min-K% of the answer).",
           "Shi et al. 2023, https://arxiv.org/abs/2310.16789", "lm", scope="item", needs=("logprobs",)),
    Metric("min_k_plus_plus", L + "min_k_plus_plus", "Min-K% of the answer on log-probs standardised by the model's "
           "next-token distribution.", "Zhang et al. 2024, Min-K%++, https://arxiv.org/abs/2404.02936", "lm",
           scope="item", needs=("logprobs",)),
    Metric("n_answer_tokens", L + "n_answer_tokens", "Answer tokens scored (end tokens left out).", "", "lm",
           aggregate=PER_ITEM, scope="item", needs=("logprobs",)),
    Metric("n_end_tokens", L + "n_end_tokens", "The format's end tokens scored after the answer.", "", "lm",
           aggregate=PER_ITEM, scope="item", needs=("logprobs",)),
    Metric("at_token_limit", L + "at_token_limit", "The greedy answer ran to max_new_tokens without an end id.", "",
           "lm", scope="item", needs=("generations",)),
    Metric("rouge_l_recall", L + "rouge_l_recall", "ROUGE-L recall of the greedy answer against the true "
           "answer.", TOFU, "lm", scope="item", needs=("generations",)),
    Metric("rouge_l_f1", L + "rouge_l_f1", "ROUGE-L F1 of the greedy answer (MUSE's scorer, no stemming).", MUSE,
           "lm", scope="item", needs=("generations",)),
    Metric("exact_answer", L + "exact_answer", "Greedy answer equals the true answer (normalised).", "", "lm",
           scope="item", needs=("generations",)),
    Metric("at_token_limit_paraphrased", L + "at_token_limit", "at_token_limit of the paraphrased question's answer.",
           "", "lm", aggregate=PER_ITEM, scope="item", needs=("paraphrased_generations",)),
    Metric("rouge_l_recall_paraphrased", L + "rouge_l_recall", "ROUGE-L recall of the paraphrased question's "
           "answer.", TOFU, "lm", aggregate=PER_ITEM, scope="item", needs=("paraphrased_generations",)),
    Metric("exact_answer_paraphrased", L + "exact_answer", "Exact answer to the paraphrased question.", "", "lm",
           aggregate=PER_ITEM, scope="item", needs=("paraphrased_generations",)),
    # membership scores of texts (per_text.json's mia_forget / mia_holdout; evals/mia.py, attack by attack)
    Metric("mia_loss", MIA_DOC + "loss_score", "Membership score: answer/text NLL (LOSS attack).",
           "Yeom et al. 2018, https://arxiv.org/abs/1709.01604", "lm", scope="item", needs=("membership",)),
    Metric("mia_zlib", MIA_DOC + "zlib_score", "Membership score: NLL / zlib-compressed length.",
           "Carlini et al. 2021, https://arxiv.org/abs/2012.07805", "lm", scope="item", needs=("membership",)),
    Metric("mia_min_k", MIA_DOC + "min_k_score", "Membership score: mean of the lowest k% token log-probs (Min-K%).",
           "Shi et al. 2023, https://arxiv.org/abs/2310.16789", "lm", scope="item", needs=("membership",)),
    Metric("mia_min_k_plus_plus", MIA_DOC + "min_k_plus_plus_score", "Membership score: Min-K% on log-probs "
           "standardised by the model's own next-token distribution.",
           "Zhang et al. 2024, Min-K%++, https://arxiv.org/abs/2404.02936", "lm", scope="item", needs=("membership",)),
    Metric("mia_reference", MIA_DOC + "reference_score", "Membership score: NLL_target - NLL_reference.",
           "Carlini et al. 2021, https://arxiv.org/abs/2012.07805", "lm", scope="item",
           needs=("membership", "reference_model")),
    Metric("mia_gradnorm", MIA_DOC + "gradnorm_score", "Membership score: norm of the loss gradient w.r.t. the "
           "parameters.", "Maini et al. 2024 / OpenUnlearning", "lm", scope="item", needs=("membership",)),

    # ---- the other text-to-image aggregates (evals/canvas.py: evaluate_samples, evaluate_erasure; user_pipeline.py)
    Metric("object_accuracy", E + "canvas:attribute_accuracy", "Classifier accuracy on the object over all images.",
           CANVAS, "t2i", "higher", "share of images"),
    Metric("style_accuracy", E + "canvas:attribute_accuracy", "Classifier accuracy on the style over all images.",
           CANVAS, "t2i", "higher", "share of images"),
    Metric("ira_vs_original", E + "canvas:evaluate_erasure", "IRA divided by the original pipeline's.", CANVAS, "t2i",
           "higher", "ratio of two aggregates"),
    Metric("cra_vs_original", E + "canvas:evaluate_erasure", "CRA divided by the original pipeline's.", CANVAS, "t2i",
           "higher", "ratio of two aggregates"),
    Metric("kid_real", E + "canvas:fid_kid", "Kernel distance of classifier features to real pictures.",
           "Binkowski et al. 2018, https://arxiv.org/abs/1801.01401", "t2i", "lower", "over the image set"),
    Metric("kid_real_std", E + "canvas:fid_kid", "Spread of kid_real over the KID subsets.", "", "t2i", None,
           "over the KID subsets"),
    Metric("kid_original_std", E + "canvas:fid_kid", "Spread of kid_original over the KID subsets.", "", "t2i", None,
           "over the KID subsets"),
    Metric("kid_subset_size", E + "user_pipeline:evaluate_user_pipeline", "Images per KID subset.", "", "t2i", None,
           "setting"),
    Metric("n_images", E + "canvas:evaluate_samples", "Images scored per pipeline.", "", "t2i", None, "count"),
    Metric("n_forget", E + "canvas:canvas_scores", "Forget-prompt images UA is taken over.", "", "t2i", None, "count"),
    Metric("n_forget_paraphrase", E + "canvas:canvas_scores", "Paraphrased forget-prompt images.", "", "t2i", None,
           "count"),
    Metric("n_retain", E + "canvas:canvas_scores", "Retain-prompt images IRA and CRA are taken over.", "", "t2i",
           None, "count"),
    Metric("eval_prompts_forget", E + "user_pipeline:evaluate_user_pipeline", "Forget prompts sampled.", "", "t2i",
           None, "setting"),
    Metric("eval_prompts_retain", E + "user_pipeline:evaluate_user_pipeline", "Retain prompts sampled.", "", "t2i",
           None, "setting"),
    Metric("eval_seeds", E + "user_pipeline:evaluate_user_pipeline", "Seeds per prompt.", "", "t2i", None, "setting"),
    Metric("detector", E + "user_pipeline:evaluate_user_pipeline", "What judged whether the concept is in a picture.",
           "", "t2i", None, "a description"),
    # ---- the other vision-language aggregates (evals/mllmu.py)
    Metric("forget_truth_ratio", E + "mllmu:truth_ratios", "Mean truth ratio of the forget items asked with their "
           "picture (the cloze sentence filled with the true vs the wrong options).", TOFU, "mllm", None,
           "mean over items"),
)


def declaration(key: str, family: str, scopes: tuple[str, ...] = ("run",)) -> Metric | None:
    """The declaration of an aggregate key that `family` writes at one of `scopes` (a reference model's value,
    "original_ua", is its metric's), or None."""
    for name in (key, *(key[len(p):] for p in REFERENCE_PREFIXES if key.startswith(p))):
        m = METRICS.get(name)
        if m is not None and m.scope in scopes and (family in m.families or m.family == "any"):
            return m
    return None


def undeclared(aggregate, family: str, sets=()) -> list[str]:
    """The keys of an evaluation's aggregate (a run's metrics.json numbers) without a declaration of `family`; the
    blocks named in `sets` (a language model's question-answer sets) are checked key by key against the set and
    averaged item metrics."""
    out = []
    for key, value in aggregate.items():
        if key in sets and isinstance(value, dict):
            out += [f"{key}.{k}" for k in value if not _in_set_block(k)]
        elif declaration(key, family) is None:
            out.append(key)
    return out


def _in_set_block(key: str) -> bool:
    m = METRICS.get(key)
    return m is not None and (m.scope == "set" or (m.scope == "item" and m.aggregate == MEAN))


def computed(family: str, scope: str, available) -> list[Metric]:
    """The metrics that `family`'s evaluation computes through their functions at `scope`, those whose inputs are
    all in `available`, in declaration order (only the language-model evaluation does so today)."""
    return [m for m in METRICS.values() if m.family == family and m.scope == scope and set(m.needs) <= set(available)]


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
    Entry("concept_arithmetic", A + "t2i.concept_arithmetic:ConceptArithmetic", "Concept arithmetic: the erased "
          "concept composed back during sampling from other prompts' noise predictions (the prompt's parts, "
          "paraphrases, the prompt as a negative prompt, or your own), eps_u + g sum_i w_i (eps_i - eps_u).",
          "Petsiuk and Saenko 2024, Concept Arithmetics for Circumventing Concept Inhibition in Diffusion Models, "
          "ECCV, https://arxiv.org/abs/2404.13706", family="t2i"),
    # vision-language models (attacks/mllm/): scored with MLLMU-Bench's protocol, on the unlearned, original and
    # retrain model (names of their own: an attack's name says its family)
    Entry("mllm_relearn", A + "mllm.relearn:Relearn", "Fine-tune a few steps on some forget people's questions with "
          "their pictures (or on retain people), then MLLMU-Bench's scores of the other forget people after each "
          "step: a curve.", RELEARN, family="mllm"),
    Entry("mllm_in_context", A + "mllm.in_context:InContext", "The forget person's profile text in the prompt "
          "before each MLLMU-Bench question, with the picture and as text (UnUnlearning).",
          "Shumailov et al. 2024, UnUnlearning, https://arxiv.org/abs/2407.00106", family="mllm"),
)
# `obliviate attack RUN` without --attack
DEFAULT_ATTACKS = {"lm": ("relearn", "in_context", "paraphrase", "multiple_choice", "jailbreak", "step_by_step",
                          "probe", "quantize_int8", "quantize_int4"), "t2i": ("prompt_attack",),
                   "mllm": ("mllm_relearn", "mllm_in_context")}

MLLM_METHODS = _table(
    # every language-model method runs on a vision-language model through its adapter; the guards (ICU, GUARD) are
    # the family's own entries (guards/mllm/: the same guards on the model and its processor; docs/lm_guards.md)
    *(e for e in LM_METHODS.values() if not e.guard),
    Entry("MMUnlearner", M + "mllm.mmunlearner:MMUnlearner",
          "Gradient ascent on the forget items masked to the weights whose forget Fisher is at least their retain "
          "Fisher (every trained part), plus retain NLL.",
          "Huo et al. 2025, MMUnlearner, https://arxiv.org/abs/2502.11051", family="mllm"),
    Entry("PromptDecouple", M + "mllm.prompt_decouple:PromptDecouple", "GradDiff plus SafeEraser's Prompt Decouple "
          "loss: the forget question on an unrelated picture keeps its answer (weight 0.5).",
          "Chen et al. 2025, SafeEraser, https://arxiv.org/abs/2502.12520", family="mllm"),
    GuardEntry("ICU", "obliviate.guards.mllm.icu:ICU", "In-context unlearning: each question (its picture kept) is "
               "asked after text turns of the forget items nearest to it with wrong answers and a few retain items "
               "with true ones (no weight changes).", LM_METHODS["ICU"].paper, family="mllm"),
    GuardEntry("GUARD", "obliviate.guards.mllm.guard:GUARD", "Generation-time restriction: once a question holds "
               "a picture or names a forget person, the tokens that would spell the forget answers' key words are "
               "held at probability ~0 (no weight changes).", LM_METHODS["GUARD"].paper, family="mllm"),
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
    return lookup({**METHODS[family], RETRAIN.name: RETRAIN, **WORLD_RECIPES.get(family, {})}, name,
                  KIND_NAMES[family])


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
