"""Worst-case forget sets: the people of the profiles world that are hardest to erase, as a target (`split =
"worst10"`) next to the random-like forget splits.

Paper: Fan, Liu, Hero, Liu, "Challenging Forgets: Unveiling the Worst-Case Forget Sets in Machine Unlearning", ECCV
2024. Reference code read: github.com/OPTML-Group/Unlearn-WorstCase, data-wise/ (main_selmu.py, unlearn/impl.py
`optimize_select`, unlearn/FT.py `w_FT_iter`, utils.py `bisection` and `SignSGD`, arg_parser.py's defaults).

The paper's bi-level problem: choose selection weights w over the candidates (w in [0, 1], sum w = k) that minimise
the forget set's loss left after unlearning it, sum_i w_i l_i(theta_u(w)) (+ gamma ||w||^2): the set the model still
knows best after the unlearning is the hardest to erase. The lower level theta_u(w) unlearns the original model with
the candidates weighted by w. The reference code alternates rounds (select_epochs 10): reload the original model, run
the lower level (unlearn_steps 10 epochs of sign-SGD, theta_lr 0.01, on a w-weighted loss), then one projected step
w <- P(w - w_lr (l(theta_u) + 2 gamma w)) whose gradient is the per-example loss after unlearning (first order: the
dependence of theta_u on w is not differentiated), P the projection onto {0 <= w <= 1, sum w = k} by bisection; the
chosen set is the top k of w, w starting at a random k-subset.

What obliviate runs: a cheaper approximation, the same objective evaluated at single people. Each candidate person
i is unlearned alone from the original model (w = e_i: `steps` sign-SGD steps, the paper's lower-level optimiser, of
gradient ascent on that person's training sequences), and scored by the loss left on those sequences, l_i(theta_u
(e_i)); the worst-case set of size k is the k people with the lowest scores (ties: the lower loss on the original
model, then the world's order). Summing singleton scores equals the upper objective when unlearning one person leaves
the others' losses as they are: the approximation drops those interactions, which the alternation would see. The
lower level is gradient ascent rather than the reference's default fine-tuning on the rest (w_FT): a few fine-tuning
steps on other people hardly move what a memorising language model knows of one person, while ascent on the person
is the language-model baselines' plainest unlearning. Why not the full alternation here:
  - its sets depend on k and are not nested, so each size costs a whole selection and MUSE's sequential requests
    (forget05, then the rest of forget10, ...) cannot run on them; per-person scores serve every size at once, and
    worst05 < worst10 < worst20;
  - by the arithmetic of the reference's steps (not measured here: w_lr 0.01 times loss gaps of a few nats, over 10
    rounds), w moves by well under 1 from its random binary start, so the start would largely choose the set; from a
    uniform start, a w-weighted gradient difference cancels (forget and retain terms of equal weight).
The approximation also has no randomness to pin: every step is full-batch on one person, so the choice is a function
of the world (its model and data) and the settings below.
Other differences: a candidate is a person (their ten question-answer pairs and biography, the unit a forget split
removes and the retrain reference leaves out), not one image; its loss is the mean over its training sequences of
the per-sequence mean answer-token NLL, on exactly what the world's model was trained on: the selection never reads
an evaluation set (paraphrases, perturbed answers, holdout). The candidates are the trained people outside the
validation split val10 (settings are chosen there), and k is the forget split's size of the same percentage.
Cost: per candidate, `steps` forward-backward passes and two forward passes over its ~11 sequences: for the demo
world's 90 candidates and the defaults, ~12 passes over 990 sequences, about 40 % of the sequence passes that train
one of its retrain models, once per world (cached, every size): 427 s measured there on 2 shared CPU cores, where a
retrain model took 250-490 s (docs/bench.md)."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

from obliviate.errors import ObliviateError

WORST_SPLIT = re.compile(r"worst(0[1-9]|[1-4][0-9]|50)")  # worst01 ... worst50: that percent of the trained people


def is_worst_split(split) -> bool:
    return isinstance(split, str) and WORST_SPLIT.fullmatch(split) is not None


def worst_percent(split: str) -> int:
    return int(WORST_SPLIT.fullmatch(split)[1])


@dataclass(frozen=True)
class Selection:
    """The selection's settings (the reference's names in comments); part of the selection's cache key."""
    steps: int = 10  # lower-level sign-SGD steps per person (unlearn_steps: 10 epochs there)
    theta_lr: float = 5e-4  # lower-level sign-SGD step (theta_lr; 1e-2 there, for ResNets trained by SGD at 0.1):
    # about one AdamW step at the unlearning learning rates the bench chooses on the profiles world (2.5e-4..9e-4)
    eval_batch_size: int = 64  # sequences per forward pass when scoring (no effect on the result)

    def check(self) -> "Selection":
        def bad(key, why):
            raise ObliviateError(f"worst-case selection: {key} = {getattr(self, key)!r}: {why}")
        for key, low in (("steps", 0), ("eval_batch_size", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                bad(key, f"a whole number >= {low}")
        if not isinstance(self.theta_lr, (int, float)) or isinstance(self.theta_lr, bool) or not self.theta_lr > 0:
            bad("theta_lr", "a number > 0")
        return self

    def key_data(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("eval_batch_size")
        return out


SETTINGS = Selection()


def sequence_loss(model, encoded: list, pad_id: int, batch_size: int = 64):
    """The mean over `encoded` of each sequence's mean answer-token NLL (a 0-dim tensor, with its graph)."""
    import torch

    from obliviate.models import sequences as seq

    device = seq.model_device(model)
    parts = [seq.answer_nll(model, seq.to_device(seq.collate(encoded[i:i + batch_size], pad_id), device)).sum()
             for i in range(0, len(encoded), batch_size)]
    return torch.stack(parts).sum() / len(encoded)


def score(model, examples: list[list], settings: Selection = SETTINGS, pad_id: int = 0, log=print) -> dict:
    """Per candidate (`examples[i]`: candidate i's encoded training sequences): "loss_original", its loss on the
    model, and "loss_after", its loss after `settings.steps` sign-SGD ascent steps on its sequences alone, each from
    `model` as given (which is left as it was). Also "seconds"."""
    import torch

    settings.check()
    if not examples or not all(examples):
        raise ObliviateError("worst-case selection: every candidate needs at least one training sequence")
    was_training = model.training
    model.eval()  # no dropout: the scores are a function of the model and the data
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.time()
    before, after = [], []
    try:
        for i, encoded in enumerate(examples):
            with torch.no_grad():
                before.append(float(sequence_loss(model, encoded, pad_id, settings.eval_batch_size)))
            for _ in range(settings.steps):
                grads = torch.autograd.grad(sequence_loss(model, encoded, pad_id, settings.eval_batch_size), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(settings.theta_lr * g.sign())  # ascent: the person's loss goes up
            with torch.no_grad():
                after.append(float(sequence_loss(model, encoded, pad_id, settings.eval_batch_size)))
            model.load_state_dict(original)
            if (i + 1) % 20 == 0 or i + 1 == len(examples):
                log(f"worst-case selection: {i + 1}/{len(examples)} candidates scored")
    finally:
        model.load_state_dict(original)
        model.train(was_training)
    return {"loss_original": before, "loss_after": after, "seconds": round(time.time() - t0, 1)}


def rank(scores: dict) -> list[int]:
    """Candidates hardest to erase first: the lowest loss left after unlearning, then the lowest original loss,
    then the given order."""
    after, before = scores["loss_after"], scores["loss_original"]
    return sorted(range(len(after)), key=lambda i: (after[i], before[i], i))
